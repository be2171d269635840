"""tools/report.py: run directories in the real on-disk format -> grouped, averaged tables.

The fake sweep below plants known accuracies; every expected figure is computed here again from
the planted numbers with `statistics`, not with the code under test.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distill import report

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "tools" / "report.py"
PAIRS = {"resnet32 -> resnet8": ("resnet32", "resnet8"), "resnet56 -> resnet20": ("resnet56", "resnet20")}
# (pair, method) -> per-seed (best, last); methods as the table labels them
PLANTED = {
    ("resnet32 -> resnet8", "none"): [(70.1, 69.5), (71.3, 70.2), (69.8, 69.0)],
    ("resnet32 -> resnet8", "kd"): [(73.4, 72.9), (74.0, 73.1), (72.8, 72.2)],
    ("resnet32 -> resnet8", "dkd (beta=2)"): [(74.5, 74.0), (75.1, 74.6), (74.2, 73.3)],
    ("resnet32 -> resnet8", "dkd (beta=8)"): [(73.0, 72.0), (73.6, 73.1), (72.5, 71.9)],
    ("resnet56 -> resnet20", "none"): [(69.1, 68.6), (68.7, 68.1), (69.9, 69.2)],
    ("resnet56 -> resnet20", "kd"): [(71.2, 70.7), (70.9, 70.5), (71.8, 71.0)],
    ("resnet56 -> resnet20", "dkd (beta=2)"): [(72.0, 71.6), (71.7, 71.5), (72.4, 72.1)],
    ("resnet56 -> resnet20", "dkd (beta=8)"): [(70.8, 70.1), (71.5, 70.9), (70.2, 70.0)],
}
TEACHER_TOP1 = {"resnet32": 71.5, "resnet56": 72.3}
EPOCHS = 4
PREVIOUS = Path("previous") / "20260101-120000"   # where trainer.resume=false moves a run


def config(teacher: str, student: str, method: str, seed: int, run_dir: Path) -> dict:
    """The resolved config a run saves in .hydra/config.yaml (the keys a real one has)."""
    name, _, beta = method.partition(" (beta=")
    distiller = {"name": name, "ce_weight": 1.0}
    if name == "kd":
        # a per-pair value, as experiment files tune them: it must not split the kd row
        distiller.update(kd_weight=0.9, temperature=4.0 if student == "resnet8" else 2.0)
    if name == "dkd":
        distiller.update(alpha=1.0, beta=float(beta.rstrip(")")), temperature=4.0, warmup_epochs=20)
    return {
        "dataset": {"name": "cifar100", "root": "data", "download": True, "augment": True,
                    "train_fraction": 1.0,
                    "recipe": {"epochs": EPOCHS, "batch_size": 64, "lr": 0.05,
                               "weight_decay": 0.0005, "milestones": [2, 3]}},
        "teacher": {"name": teacher, "pretrained": False, "checkpoint": None, "auto_train": False,
                    "auto_train_epochs": None},
        "student": {"name": student, "pretrained": False},
        "distiller": distiller,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005,
                      "nesterov": False},
        "scheduler": {"name": "multistep", "milestones": [2, 3], "gamma": 0.1,
                      "warmup_epochs": 0.0, "min_lr_ratio": 0.0},
        "trainer": {"epochs": EPOCHS, "batch_size": 64, "eval_batch_size": 256, "max_steps": None,
                    "num_workers": seed, "log_every": 20, "precision": "fp32", "resume": True,
                    "progress": seed == 0, "sync_bn": False, "data_path": "auto",
                    "channels_last": True, "compile": "none", "compile_backend": "inductor"},
        "logger": {"tensorboard": {"flush_secs": 30}},
        "zoo": {"root": "zoo", "publish": True},
        "seed": seed, "device": "auto", "tag": f"t{seed}", "tuned": {"dkd": {"beta": 2.0}},
        "run_dir": str(run_dir),
    }


def curve(last: float, epochs: int = EPOCHS) -> list[float]:
    return [last * (e + 1) / epochs for e in range(epochs)]


def write_run(run_dir: Path, cfg: dict, best: float | None, last: float | None,
              teacher_top1: float | None, epochs_done: int = EPOCHS, summary: bool = True,
              stopped_early: bool = False, skipped_steps: int = 0) -> None:
    """A run directory as distill writes it: .hydra/config.yaml, metrics.jsonl, summary.json."""
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), run_dir / ".hydra" / "config.yaml")
    top1 = curve(last or 0.0, cfg["trainer"]["epochs"])[:epochs_done]
    history = [{"epoch": e + 1, "step": 2 * (e + 1), "top1": t, "top5": 99.0}
               for e, t in enumerate(top1)]
    with open(run_dir / "metrics.jsonl", "w") as f:
        for h in history:
            f.write(json.dumps({"event": "train", "step": h["step"], "train/loss": 1.0}) + "\n")
            f.write(json.dumps({"event": "epoch", "step": h["step"], "epoch": h["epoch"],
                                "val/top1": h["top1"], "val/top5": 99.0}) + "\n")
    if not summary:
        return
    data = {"best_top1": best, "last_top1": last, "teacher_top1": teacher_top1,
            "train_images_per_sec": 500.0, "world_size": 1, "global_batch_size": 64,
            "epochs": epochs_done, "steps": 2 * epochs_done, "stopped_early": stopped_early,
            "skipped_steps": skipped_steps,
            "wall_seconds": 60.0 + cfg["seed"], "student_params": 1234,
            "connector_params": 0, "history": history}
    (run_dir / "summary.json").write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two sweep folders (job dirs 0, 1, ... as Hydra numbers them) plus three unfinished runs,
    and one earlier run that `trainer.resume=false` set aside inside a job dir (PREVIOUS)."""
    root = tmp_path_factory.mktemp("report")
    job = 0
    for (pair, method), seeds in PLANTED.items():
        teacher, student = PAIRS[pair]
        folder = root / ("sweep-8" if student == "resnet8" else "sweep-20")
        for seed, (best, last) in enumerate(seeds):
            run_dir = folder / str(job)
            job += 1
            write_run(run_dir, config(teacher, student, method, seed, run_dir), best, last,
                      None if method == "none" else TEACHER_TOP1[teacher])
    unfinished = root / "sweep-8"
    cfg = config("resnet32", "resnet8", "kd", 3, unfinished / "crashed")
    cfg["trainer"]["epochs"] = 200
    write_run(unfinished / "crashed", cfg, None, 1.0, None, epochs_done=37, summary=False)
    cfg = config("resnet32", "resnet8", "kd", 4, unfinished / "smoke")
    cfg["trainer"]["max_steps"] = 2
    write_run(unfinished / "smoke", cfg, 2.0, 2.0, 71.5, epochs_done=1, stopped_early=True)
    cfg = config("resnet32", "resnet8", "kd", 5, unfinished / "short")
    cfg["trainer"]["epochs"] = 8
    write_run(unfinished / "short", cfg, 3.0, 3.0, 71.5, epochs_done=EPOCHS)
    # as distill.engine.rundir.start_run_dir moves a run aside: a finished run, its own
    # .hydra/config.yaml and all, with a result far from the planted ones
    aside = unfinished / "0" / PREVIOUS
    write_run(aside, config("resnet32", "resnet8", "none", 0, unfinished / "0"), 5.0, 4.0, None)
    return root


@pytest.fixture(scope="module")
def rows(sweep) -> list[report.Row]:
    runs, _ = report.load_runs([sweep / "sweep-8", sweep / "sweep-20"])
    return report.summarize(report.group_runs(runs))


def find(rows: list[report.Row], pair: str, method: str) -> report.Row:
    teacher, student = PAIRS[pair]
    found = [r for r in rows if r.method == method and r.student == student
             and r.teacher in (teacher, None)]
    assert len(found) == 1, [(r.pair, r.method) for r in rows]
    return found[0]


def test_one_row_per_method_and_pair_dkd_betas_apart(rows):
    assert {(r.pair, r.method) for r in rows} == {
        (pair if method != "none" else PAIRS[pair][1], method) for pair, method in PLANTED}
    # kd's temperature differs between the pairs only: one kd row, the value in its settings
    assert find(rows, "resnet32 -> resnet8", "kd").settings == "temperature=4"
    assert find(rows, "resnet56 -> resnet20", "kd").settings == "temperature=2"


@pytest.mark.parametrize("pair_method", list(PLANTED), ids=lambda pm: f"{pm[0]}|{pm[1]}")
def test_mean_and_sample_std_over_seeds(rows, pair_method):
    row = find(rows, *pair_method)
    best, last = zip(*PLANTED[pair_method])
    assert row.n == 3 and row.seeds == [0, 1, 2]
    assert row.mean("best") == pytest.approx(statistics.mean(best))
    assert row.std("best") == pytest.approx(statistics.stdev(best))
    assert row.mean("last") == pytest.approx(statistics.mean(last))
    assert row.std("last") == pytest.approx(statistics.stdev(last))
    assert row.wall_seconds == pytest.approx(61.0)
    teacher = PAIRS[pair_method[0]][0]
    assert row.teacher_top1 == (None if pair_method[1] == "none" else TEACHER_TOP1[teacher])
    epochs, top1 = zip(*row.curve)
    assert epochs == tuple(range(1, EPOCHS + 1))
    assert top1 == pytest.approx([statistics.mean(c) for c in zip(*(curve(v) for v in last))])


def test_gain_is_the_difference_of_means_over_the_vanilla_student(rows):
    for pair, method in PLANTED:
        row = find(rows, pair, method)
        if method == "none":
            assert row.gain == {"best": None, "last": None}
            continue
        for i, metric in enumerate(("best", "last")):
            ours = statistics.mean(s[i] for s in PLANTED[pair, method])
            vanilla = statistics.mean(s[i] for s in PLANTED[pair, "none"])
            assert row.gain[metric] == pytest.approx(ours - vanilla)


def test_unfinished_runs_are_listed_with_the_reason_and_not_averaged(sweep, rows):
    _, unfinished = report.load_runs([sweep])
    reasons = {u.path.name: u.reason for u in unfinished}
    assert reasons == {
        "crashed": "no summary.json (last epoch 37 of 200 in metrics.jsonl)",
        "smoke": "stopped early (trainer.max_steps=2) after 1 of 4 epochs",
        "short": "4 of 8 epochs done"}
    assert find(rows, "resnet32 -> resnet8", "kd").n == 3
    text = report.render_markdown(rows, unfinished)
    assert "### Unfinished runs (not averaged in)" in text
    for u in unfinished:
        assert f"`{u.path}`: {u.reason}" in text


def test_a_run_set_aside_under_previous_is_not_counted(sweep, rows):
    aside = sweep / "sweep-8" / "0" / PREVIOUS
    assert isinstance(report.load_run(aside), report.Run)   # it would count, if it were found
    runs, unfinished = report.load_runs([sweep])
    assert not [r.path for r in [*runs, *unfinished] if "previous" in r.path.parts]
    row = find(rows, "resnet32 -> resnet8", "none")
    last = [s[1] for s in PLANTED["resnet32 -> resnet8", "none"]]
    assert row.n == 3 and row.mean("last") == pytest.approx(statistics.mean(last))
    assert sweep / "sweep-8" / "0" in row.runs


def test_markdown_table_has_a_column_per_pair_and_a_cell_per_method(rows):
    text = report.render_markdown(rows, [], metric="last")
    header = next(line for line in text.splitlines() if line.startswith("| method |"))
    assert header == "| method | resnet32 -> resnet8 | resnet56 -> resnet20 |"
    table = {line.split(" | ")[0].lstrip("| "): line for line in text.split("\n\n")[2].splitlines()}
    assert table["teacher"] == "| teacher | 71.50 | 72.30 |"
    for method in ("none", "kd", "dkd (beta=2)", "dkd (beta=8)"):
        cells = []
        for pair in PAIRS:
            last = [s[1] for s in PLANTED[pair, method]]
            cell = f"{statistics.mean(last):.2f} ± {statistics.stdev(last):.2f} (3)"
            if method != "none":
                vanilla = statistics.mean(s[1] for s in PLANTED[pair, "none"])
                cell += f" {statistics.mean(last) - vanilla:+.2f}"
            cells.append(cell)
        assert table[method] == f"| {method} | " + " | ".join(cells) + " |"
    # --metric best switches the cells and the gain
    best = report.render_markdown(rows, [], metric="best")
    kd = [s[0] for s in PLANTED["resnet32 -> resnet8", "kd"]]
    none = [s[0] for s in PLANTED["resnet32 -> resnet8", "none"]]
    assert (f"| kd | {statistics.mean(kd):.2f} ± {statistics.stdev(kd):.2f} (3) "
            f"{statistics.mean(kd) - statistics.mean(none):+.2f} |") in best


def test_one_seed_shows_no_std_and_unknown_models_show_no_flops(tmp_path):
    cfg = config("resnet32", "no_such_net", "none", 0, tmp_path / "run")
    write_run(tmp_path / "run", cfg, 50.0, 40.0, None)
    runs, _ = report.load_runs([tmp_path])
    [row] = report.summarize(report.group_runs(runs))
    assert report.cell(row, "last") == "40.00 (1)"
    assert row.std("last") is None
    assert "| 1 | 50.00 (1) | 40.00 (1) |" in report.render_markdown([row], [])
    assert report.csv_record(row)["flops"] == ""
    assert "| 1.23K | ? |" in report.render_markdown([row], [])


def test_class_count_from_the_weights_else_the_dataset_registry(tmp_path):
    """export.class_count reads student.safetensors; without it (or with a damaged one) the
    count comes from the dataset registry's facts, which every shipped dataset declares."""
    import torch
    from safetensors.torch import save_file

    from distill.data import DATASETS
    from distill.models import model_spec

    assert report.num_classes(tmp_path, "resnet8", {"name": "mnist5k"}) == 10   # no file
    assert report.num_classes(tmp_path, "resnet8", {"name": "imagenet"}) == 1000
    assert report.num_classes(tmp_path, "resnet8", {"name": "folder", "image_size": 96}) is None
    assert all("num_classes" in DATASETS.meta(name) for name in DATASETS)
    weights = tmp_path / "student.safetensors"
    weights.write_bytes((2 ** 62).to_bytes(8, "little") + b"{}")   # a header no file holds
    assert report.num_classes(tmp_path, "resnet8", {"name": "cifar100"}) == 100
    save_file({f"{model_spec('resnet8').classifier}.weight": torch.zeros(7, 64)}, str(weights))
    assert report.num_classes(tmp_path, "resnet8", {"name": "cifar100"}) == 7


def test_image_size_of_a_folder_run_is_its_config(tmp_path):
    cfg = config("resnet32", "resnet8", "none", 0, tmp_path / "run")
    cfg["dataset"] = {"name": "folder", "root": "/images", "image_size": 40,
                      "recipe": cfg["dataset"]["recipe"]}
    write_run(tmp_path / "run", cfg, 50.0, 40.0, None)
    runs, _ = report.load_runs([tmp_path])
    [row] = report.summarize(report.group_runs(runs))
    assert row.image_size == 40 and row.num_classes is None   # no weights: FLOPs unknown
    assert report.csv_record(row)["flops"] == ""


def test_flops_of_a_cifar_model():
    # resnet8: 3x3 convs and a 10-way fc at 32x32; counted multiply-adds are 2 FLOPs
    assert report.flops("resnet8", 10, 32) == pytest.approx(25_003_264)
    assert report.flops("resnet8", 10, 32) < report.flops("resnet20", 100, 32)
    assert report.flops("resnet8", 10, None) is None


def test_vanilla_run_serves_every_pair_with_its_student(tmp_path):
    """Vanilla training has no teacher: its config's teacher.* must not matter."""
    for i, (teacher, method) in enumerate([("resnet56", "none"), ("resnet32", "kd"),
                                           ("resnet44", "kd")]):
        cfg = config(teacher, "resnet8", method, 0, tmp_path / str(i))
        cfg["teacher"]["checkpoint"] = f"{teacher}.safetensors"
        write_run(tmp_path / str(i), cfg, 60.0 + i, 50.0 + i, None if i == 0 else 70.0)
    runs, _ = report.load_runs([tmp_path])
    rows = report.summarize(report.group_runs(runs))
    assert [r.method for r in rows] == ["none", "kd", "kd"]
    assert [r.gain["last"] for r in rows] == [None, 1.0, 2.0]
    text = report.render_markdown(rows, [])
    assert "| none | 50.00 (1) | 50.00 (1) |" in text


def test_runs_on_any_number_of_ranks_are_seeds_of_one_experiment(tmp_path):
    """world_size is recorded, but trainer.batch_size is the global batch: 1 GPU and 2 GPUs run
    the same experiment (one row, one baseline)."""
    for i, (method, seed, ranks) in enumerate([("none", 0, 2), ("kd", 0, 1), ("kd", 1, 2)]):
        cfg = config("resnet32", "resnet8", method, seed, tmp_path / str(i))
        cfg["world_size"] = ranks
        write_run(tmp_path / str(i), cfg, 60.0 + i, 50.0 + i, None if i == 0 else 70.0)
    runs, _ = report.load_runs([tmp_path])
    rows = report.summarize(report.group_runs(runs))
    assert [(r.method, r.n, r.settings) for r in rows] == [("none", 1, ""), ("kd", 2, "")]
    assert rows[1].gain["last"] == pytest.approx(statistics.mean([51.0, 52.0]) - 50.0)


def test_skipped_steps_are_totalled_per_row_and_noted(rows, tmp_path):
    assert "Skipped steps" not in report.render_markdown(rows, [])   # none skipped: no note
    planted = [("none", 0, 0), ("none", 1, 0), ("kd", 0, 3), ("kd", 1, 0), ("kd", 2, 2)]
    for i, (method, seed, skipped) in enumerate(planted):
        cfg = config("resnet32", "resnet8", method, seed, tmp_path / str(i))
        cfg["trainer"]["on_nonfinite"] = "skip"
        write_run(tmp_path / str(i), cfg, 60.0, 50.0, None if method == "none" else 70.0,
                  skipped_steps=skipped)
    runs, _ = report.load_runs([tmp_path])
    none, kd = report.summarize(report.group_runs(runs))
    assert (none.skipped_steps, kd.skipped_steps) == (0, 5)
    text = report.render_markdown([none, kd], [])
    detail = [line for line in text.splitlines() if line.startswith("| cifar100 |")]
    assert detail[0].endswith(" min |  |") and detail[1].endswith(" min | 5 |")
    assert "| wall (mean) | skipped steps |" in text
    assert "kd resnet32 -> resnet8: 5 steps in 2 of 3 runs." in text
    assert "none resnet8" not in text.split("Skipped steps:")[1]
    assert [report.csv_record(r)["skipped_steps"] for r in (none, kd)] == [0, 5]


def test_csv_is_the_long_form_table(rows, tmp_path):
    report.write_csv(rows, tmp_path / "out" / "table.csv")
    with open(tmp_path / "out" / "table.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(PLANTED)
    assert list(records[0]) == list(report.CSV_COLUMNS)
    for pair, method in PLANTED:
        teacher, student = PAIRS[pair]
        [rec] = [r for r in records if r["method"] == method and r["student"] == student]
        best, last = zip(*PLANTED[pair, method])
        assert rec["teacher"] == ("" if method == "none" else teacher)
        assert rec["n"] == "3" and rec["seeds"] == "0 1 2"
        assert float(rec["best_mean"]) == pytest.approx(statistics.mean(best))
        assert float(rec["last_std"]) == pytest.approx(statistics.stdev(last))
        assert rec["num_classes"] == "100" and rec["image_size"] == "32"
        assert int(rec["flops"]) > 0
        if method == "none":
            assert rec["gain_last"] == ""
        else:
            vanilla = statistics.mean(s[1] for s in PLANTED[pair, "none"])
            assert float(rec["gain_last"]) == pytest.approx(statistics.mean(last) - vanilla)


def load_tool():
    spec = importlib.util.spec_from_file_location("report_tool", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_writes_markdown_csv_and_png(sweep, tmp_path, capsys):
    png, table = tmp_path / "fig.png", tmp_path / "t.csv"
    code = load_tool().main([str(sweep), "--csv", str(table), "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0
    assert "| method | resnet32 -> resnet8 | resnet56 -> resnet20 |" in out
    assert "no summary.json (last epoch 37 of 200 in metrics.jsonl)" in out
    assert table.read_text().count("\n") == len(PLANTED) + 1
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("option", ["--csv", "--plot"])
def test_an_unwritable_output_file_is_one_error_line_and_exit_2(sweep, tmp_path, capsys, option):
    """--csv / --plot under a regular file: one error line, nothing printed, neither written."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    files = {"--csv": tmp_path / "t.csv", "--plot": tmp_path / "fig.png"}
    files[option] = blocker / "t.csv" if option == "--csv" else blocker / "deeper" / "fig.png"
    code = load_tool().main([str(sweep / "sweep-8"), *(str(x) for kv in files.items() for x in kv)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.splitlines() == [
        f"error: {option}: cannot write {files[option]}: {blocker} is a file, not a folder"]
    assert sorted(tmp_path.iterdir()) == [blocker]


def test_a_summary_that_is_not_an_object_is_an_unfinished_run(tmp_path, capsys):
    cfg = config("resnet32", "resnet8", "none", 0, tmp_path / "list")
    write_run(tmp_path / "list", cfg, 50.0, 40.0, None)
    (tmp_path / "list" / "summary.json").write_text("[50.0, 40.0]")
    # and a finished run whose history and metrics.jsonl hold stray values: still counted
    cfg = config("resnet32", "resnet8", "none", 1, tmp_path / "odd")
    write_run(tmp_path / "odd", cfg, 52.0, 42.0, None)
    summary = json.loads((tmp_path / "odd" / "summary.json").read_text())
    (tmp_path / "odd" / "summary.json").write_text(json.dumps({**summary, "history": "?"}))
    with open(tmp_path / "odd" / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n7\n")
    runs, unfinished = report.load_runs([tmp_path])
    assert [(u.path.name, u.reason) for u in unfinished] == [
        ("list", "summary.json is not an object")]
    [run] = runs
    assert run.path.name == "odd" and run.curve == [(e + 1, t) for e, t in enumerate(curve(42.0))]
    assert load_tool().main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"- `{tmp_path / 'list'}`: summary.json is not an object" in out


def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    tool = load_tool()
    for args, says in [((str(tmp_path / "missing"),), f"no such directory: {tmp_path / 'missing'}"),
                       ((str(tmp_path / "empty"),), "no run directories")]:
        assert tool.main(list(args)) == 2
        captured = capsys.readouterr()
        assert captured.err.splitlines()[0].startswith("error: ") and says in captured.err
        assert captured.out == ""


def test_runs_distilled_from_different_teacher_weights_are_never_averaged(tmp_path):
    """Two kd seeds from one resnet32, a third from a retrained resnet32 (another sha256 in
    summary.json's `teachers`): two rows, split and labelled by the teacher digest; vanilla
    runs have no teacher and stay one row."""
    for seed, digest in ((0, "a" * 64), (1, "a" * 64), (2, "b" * 64)):
        run_dir = tmp_path / f"kd{seed}"
        write_run(run_dir, config("resnet32", "resnet8", "kd", seed, run_dir), 73.0 + seed,
                  72.0 + seed, 71.5)
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["teachers"] = [{"role": "teacher", "name": "resnet32", "sha256": digest,
                                "top1": 71.5}]
        (run_dir / "summary.json").write_text(json.dumps(summary))
    for seed in (0, 1):
        run_dir = tmp_path / f"none{seed}"
        write_run(run_dir, config("resnet32", "resnet8", "none", seed, run_dir), 70.0, 69.0, None)
    runs, _ = report.load_runs([tmp_path])
    rows = report.summarize(report.group_runs(runs))
    kd = sorted((r for r in rows if r.distiller == "kd"), key=lambda r: r.n)
    assert [(r.n, r.last) for r in kd] == [(1, [74.0]), (2, [72.0, 73.0])]
    assert [r.method for r in kd] == ["kd (teacher.sha256=bbbbbbbbbbbb)",
                                      "kd (teacher.sha256=aaaaaaaaaaaa)"]
    assert [r.n for r in rows if r.distiller == "none"] == [2]
    assert all(r.gain["last"] is not None for r in kd)


def test_methods_come_in_the_published_tables_order():
    """Vanilla first, then the CRD table's methods and the later ones in the papers' order
    (the feature canon's and the strongest methods' columns where the published tables put them), then the rest in
    the order the sweep ran them."""
    from types import SimpleNamespace

    from distill.report.group import VANILLA
    from distill.report.render import method_order

    ran = ["dml", "mlkd", "kd", "dist", "takd", "crd", VANILLA, "reviewkd", "ofd", "nst", "dkd"]
    rows = [SimpleNamespace(method=m) for m in ran]
    assert method_order(rows) == [VANILLA, "kd", "nst", "crd", "ofd", "reviewkd", "dkd", "dist",
                                  "mlkd", "dml", "takd"]


def test_each_early_exit_of_a_run_is_a_row_of_its_own(tmp_path):
    """BYOT's exits (summary.json `models` entries with recorded FLOPs) become rows
    `byot:exitN` with their own top-1 over seeds, params, FLOPs and curve, gained over the same
    vanilla student; other evaluated models (DML's peers) do not."""
    for seed, exits in ((0, (60.0, 70.0)), (1, (62.0, 72.0))):
        run_dir = tmp_path / f"byot{seed}"
        write_run(run_dir, config("resnet32", "resnet8", "byot", seed, run_dir), 80.0, 79.0, None)
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["models"] = {"student": {"arch": "resnet8", "best_top1": 80.0, "last_top1": 79.0,
                                         "params": 1234},
                             **{f"exit{i + 1}": {"arch": f"resnet8:exit{i + 1}",
                                                 "best_top1": top1 + 1, "last_top1": top1,
                                                 "params": 500 + i, "flops": 7_000_000 * (i + 1)}
                                for i, top1 in enumerate(exits)}}
        summary["history"][-1]["models"] = {"exit1": {"top1": exits[0], "top5": 99.0}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    vanilla = tmp_path / "none"
    write_run(vanilla, config("resnet32", "resnet8", "none", 0, vanilla), 70.0, 65.0, None)
    runs, _ = report.load_runs([tmp_path])
    rows = {r.method: r for r in report.summarize(report.group_runs(runs))}
    assert set(rows) == {"byot", "byot:exit1", "byot:exit2", "none"}
    exit1 = rows["byot:exit1"]
    assert exit1.last == [60.0, 62.0] and exit1.best == [61.0, 63.0]
    assert exit1.student_params == 500 and exit1.flops == 7_000_000
    assert exit1.gain["last"] == pytest.approx(61.0 - 65.0)
    assert exit1.curve == [(EPOCHS, 61.0)]
    assert report.csv_record(rows["byot:exit2"])["flops"] == 14_000_000
    assert "| byot:exit2 |" in report.render_markdown(list(rows.values()), [])


def test_a_dataset_option_added_later_takes_its_default_for_older_runs(tmp_path):
    """Runs recorded before dataset.student_view existed ran without a view: they are compared
    with newer runs that record its default (null), not split from them."""
    old, new = tmp_path / "old", tmp_path / "new"
    write_run(old, config("resnet32", "resnet8", "none", 0, old), 70.0, 65.0, None)
    cfg = config("resnet32", "resnet8", "kd", 0, new)
    cfg["dataset"]["student_view"] = None
    write_run(new, cfg, 72.0, 70.0, 71.5)
    runs, _ = report.load_runs([tmp_path])
    rows = {r.method: r for r in report.summarize(report.group_runs(runs))}
    assert rows["kd"].gain["last"] == pytest.approx(5.0)
