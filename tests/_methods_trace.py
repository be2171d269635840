"""A short, fixed run of every registered method on both data paths, read only through the
run-directory contract (metrics.jsonl, student.safetensors, summary.json), so the same script
records the runs before a refactoring and checks them after it, bit for bit.

    python tests/_methods_trace.py record OUT.json [--runs DIR]   # trace every method
    python tests/_methods_trace.py compare BEFORE.json AFTER.json

`--runs DIR` also keeps, per method, a run stopped after 3 steps (its checkpoint) and the
trace of that run resumed to the end: a later version resumes the kept checkpoints with
`resume DIR OUT.json` and compares the weights it ends with.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compose import make_cfg  # noqa: E402
from _golden import fixed_teacher  # noqa: E402 - a resnet14 of seeded random weights

# 48 fake images in batches of 16: 3 steps an epoch; 5 steps cross an epoch end (evaluation,
# checkpoint, a method's warm-up or stage change)
COMMAND = ["dataset=fake", "dataset.train_size=48", "dataset.val_size=32", "student=resnet8",
           "teacher=resnet14", "trainer.epochs=2", "trainer.batch_size=16", "trainer.log_every=1",
           "device=cpu", "zoo.publish=false", "seed=0", "teacher.auto_train=true",
           "teacher.auto_train_epochs=1"]
STEPS = 5
# what makes each expensive method a few seconds' run (the same before and after)
SMALL = {
    "multi_teacher": ["distiller.teachers=[resnet14,resnet8]"],
    "takd": ["distiller.assistants=[resnet8]"],
    "born_again": ["distiller.generations=2"],
    "specialists": ["distiller.subsets=[[0,1],[2,3]]"],
    "crd": ["distiller.nce_k=16"],
    "deepinversion": ["distiller.num_images=32", "distiller.batch_size=16",
                      "distiller.iterations=2"],
    "dafl": ["distiller.epoch_size=48"],
    "ab": ["distiller.init_epochs=1"], "fsp": ["distiller.init_epochs=1"],
    "ft": ["distiller.init_epochs=1"],
}
PATHS = ("memory", "loader")
# generation 0 of born_again is the student's architecture: trained here, not the fixed resnet14
OWN_TEACHER = ("born_again",)


def weights_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_trace(run_dir: Path, summary: dict) -> dict:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [{k: v for k, v in e.items() if k.startswith("train/") and k not in
               ("train/images_per_sec", "train/epoch")} for e in events if e["event"] == "train"]
    return {"losses": losses, "last_top1": summary["last_top1"],
            "teacher_top1": summary["teacher_top1"],
            "models": {k: v.get("last_top1") for k, v in summary["models"].items()},
            "weights": weights_digest(run_dir / "student.safetensors")}


def command(method: str, path: str, home: Path) -> list[str]:
    teacher = [] if method in OWN_TEACHER else [f"teacher.checkpoint={fixed_teacher(home)}"]
    return [*COMMAND, f"distiller={method}", f"trainer.data_path={path}", *teacher,
            *SMALL.get(method, [])]


def trace(method: str, path: str, home: Path, *, steps: int = STEPS, run: str | None = None,
          extra: tuple[str, ...] = ()) -> dict:
    from distill.app import run as train
    from distill.errors import ConfigError

    name = run or f"{method}-{path}"
    cfg = make_cfg(home, *command(method, path, home), f"trainer.max_steps={steps}", *extra,
                   run=name)
    try:
        summary = train(cfg)
    except ConfigError as exc:
        return {"refused": exc.key}
    return read_trace(home / name, summary)


def methods() -> list[str]:
    import os

    import distill.distillers   # registers every method
    DISTILLERS = getattr(distill.distillers, "DISTILLERS", None)   # the layout before the contract
    if DISTILLERS is None:
        from distill.method import DISTILLERS

    only = os.environ.get("TRACE_ONLY")   # a comma-separated subset, to re-record a few
    return [m for m in DISTILLERS.list() if not only or m in only.split(",")]


def record(out: Path, runs: Path | None) -> None:
    traces = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        for method in methods():
            for path in PATHS:
                traces[f"{method}/{path}"] = trace(method, path, home)
                print(method, path, "refused" if "refused" in traces[f"{method}/{path}"]
                      else traces[f"{method}/{path}"]["weights"][:12], flush=True)
            if runs is not None:   # a checkpoint at step 3, then resumed to the end
                stopped = f"{method}-stopped"
                first = trace(method, "auto", home, steps=3, run=stopped)
                if "refused" in first:
                    continue
                kept = runs / method
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(home / stopped, kept)
                traces[f"{method}/resumed"] = trace(method, "auto", home, run=stopped)
        if runs is not None:
            shutil.copytree(home / "zoo", runs / "zoo", dirs_exist_ok=True)
            shutil.copy(home / "teacher.safetensors", runs / "teacher.safetensors")
    out.write_text(json.dumps(traces, indent=1) + "\n")


def resume(runs: Path, out: Path) -> None:
    """Resume every kept checkpoint (in a copy) to the end, as `record` did."""
    traces = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        shutil.copytree(runs / "zoo", home / "zoo")
        shutil.copy(runs / "teacher.safetensors", home / "teacher.safetensors")
        for kept in sorted(p for p in runs.iterdir() if p.is_dir() and p.name != "zoo"):
            shutil.copytree(kept, home / f"{kept.name}-stopped")
            traces[f"{kept.name}/resumed"] = trace(kept.name, "auto", home,
                                                    run=f"{kept.name}-stopped")
            print(kept.name, traces[f"{kept.name}/resumed"].get("weights", "refused")[:12],
                  flush=True)
    out.write_text(json.dumps(traces, indent=1) + "\n")


def compare(before: Path, after: Path) -> int:
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    bad = 0
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            bad += 1
            print(f"DIFFERS {key}:\n  before {json.dumps(old.get(key))[:400]}\n"
                  f"  after  {json.dumps(new.get(key))[:400]}")
    print(f"{len(set(old) | set(new)) - bad} equal, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    verb, *args = sys.argv[1:]
    if verb == "record":
        runs = Path(args[args.index("--runs") + 1]) if "--runs" in args else None
        record(Path(args[0]), runs)
    elif verb == "resume":
        resume(Path(args[0]), Path(args[1]))
    else:
        sys.exit(compare(Path(args[0]), Path(args[1])))
