"""Every flag of tools/bench.py, tools/report.py and tools/export.py at boundary values.

Generated, not listed: the flags come from each tool's own parser (`build_parser()`), so a flag
added later is covered without editing this file. Each (flag, value) is either refused, which
means exit status 2, stderr starting with `error: ` and naming the flag, no traceback, nothing on
stdout and nothing written, or accepted with the meaning documented in ACCEPTED. A value that is
accepted without a row there fails, and so does a row whose value is no longer accepted.

Only the parse-and-validate step runs (`parse_args(argv)`, the first thing each tool's `main`
does; refusals go through `main` too): no value here starts a benchmark, report or export.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

from distill import folders
from distill.method import DISTILLERS

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("bench", "report", "export")

# Boundary values tried on every flag. {blocker} is a regular file: paths below it cannot be made.
VALUES = ["0", "1", "-1", "0.5", "nan", "inf", "-inf", "1e30", "", " ", ",", "ü", "a/b", "../x",
          "abc", "x" * 300, "{blocker}/x", "{blocker}/x.csv", "{blocker}/x.md",
          "{blocker}/deeper/x.png"]

_OUT_FOLDER = "an export folder of that name in the working directory, created by the export"
# (tool, flag) -> {value: what the accepted value means}. Everything else in VALUES is refused.
ACCEPTED: dict[tuple[str, str], dict[str, str]] = {
    ("bench", "--batches"): {"1": "one batch size, 1"},
    ("bench", "--steps"): {"1": "one timed step per measurement"},
    ("bench", "--warmup"): {"1": "one untimed step first; the trainer then logs every step and "
                                 "its first window (the warm-up) is left out"},
    ("bench", "--repeats"): {"1": "one measurement per figure, no median over repeats"},
    ("export", "--batch"): {"1": "the second latency batch is 1 as well: batch 1 is measured once"},
    ("export", "--threads"): {"1": "one CPU thread (the default)"},
    ("export", "--exit"): {"1": "early exit 1 (the shallowest) of a run whose method has exits "
                                "(byot); checked against the run when it is read: a run "
                                "without it is refused then, naming --exit"},
    ("export", "--budget"): {
        "0": "the minimum: Timing.min_repeats (5) timed forwards per model and batch size",
        "0.5": "half a second of timing per model and batch size (5 to 30 forwards)",
        "1": "one second (the default; 5 to 30 forwards)",
        "1e30": "no time limit: Timing.max_repeats (30) timed forwards, then it stops"},
    ("export", "--out"): {**dict.fromkeys(("0", "1", "-1", "0.5", "nan", "inf", "-inf", "1e30",
                                           ",", "ü", "abc"), _OUT_FOLDER),
                          "a/b": "folder b in folder a of the working directory (both created)",
                          "../x": "folder x beside the working directory"},
}


def load_tool(name: str):
    path = REPO / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_flags_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tools() -> dict:
    return {name: load_tool(name) for name in TOOLS}


def flags(tool) -> list[tuple[str, argparse.Action]]:
    """(name in messages, action) of every argument of the tool's parser but --help."""
    parser = tool.build_parser()
    return [(max(a.option_strings, key=len) if a.option_strings else a.metavar or a.dest, a)
            for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def base_argv(name: str, home: Path) -> list[str]:
    """A valid command line of the tool (what each flag's value is added to)."""
    return [] if name == "bench" else [str(home)]


def argv_with(name: str, action: argparse.Action, value: str, home: Path) -> list[str]:
    if not action.option_strings:   # the positional argument: replaced
        return ["--", value]
    return [*base_argv(name, home), f"{action.option_strings[-1]}={value}"]


def snapshot(root: Path) -> list[tuple[str, bool, int]]:
    return sorted((str(Path(folder, n).relative_to(root)), n in dirs,
                   0 if n in dirs else os.path.getsize(Path(folder, n)))
                  for folder, dirs, files in os.walk(root) for n in dirs + files)


def outcome(tool, argv: list[str], capsys
            ) -> tuple[int | None, argparse.Namespace | None, str, str]:
    """(exit status or None, parsed args or None, stdout, stderr) of the parse-and-validate step."""
    try:
        args = tool.parse_args(argv)
    except SystemExit as exc:
        captured = capsys.readouterr()
        return exc.code, None, captured.out, captured.err
    captured = capsys.readouterr()
    return None, args, captured.out, captured.err


def run_main(tool, argv: list[str]) -> int | None:
    try:
        return tool.main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> tuple[Path, Path, Path]:
    """(tmp_path, a folder given as the run/sweep directory, a regular file); the working
    directory is tmp_path/cwd, so relative outputs would land inside tmp_path."""
    home, blocker, cwd = tmp_path / "home", tmp_path / "blocker", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    blocker.write_text("a file, not a folder")
    monkeypatch.chdir(cwd)
    return tmp_path, home, blocker


@pytest.mark.parametrize("name", TOOLS)
def test_every_flag_refuses_boundary_values_in_one_screen_or_documents_them(
        name, tools, workspace, capsys):
    tool, (root, home, blocker) = tools[name], workspace
    problems, accepted = [], set()
    for flag, action in flags(tool):
        for template in VALUES:
            value = template.format(blocker=blocker)
            argv = argv_with(name, action, value, home)
            before = snapshot(root)
            code, args, out, err = outcome(tool, argv, capsys)
            where = f"{name} {flag} {template!r}"
            if args is not None:
                accepted.add((flag, template))
                if template not in ACCEPTED.get((name, flag), {}):
                    problems.append(f"{where}: accepted, but ACCEPTED does not say what it means")
            else:
                main_code = run_main(tool, argv)
                main_err = capsys.readouterr().err
                if code != 2 or main_code != 2:
                    problems.append(f"{where}: exit {code} (main: {main_code}), expected 2")
                if not err.startswith("error: ") or flag not in err.splitlines()[0]:
                    problems.append(f"{where}: the first line does not say `error: ` and name "
                                    f"{flag}: {err[:200]!r}")
                if "Traceback" in err or len(err.splitlines()) > 12 or out:
                    problems.append(f"{where}: not one short error screen: {(out + err)[:300]!r}")
                if main_err != err:
                    problems.append(f"{where}: main says {main_err[:200]!r}, "
                                    f"parse_args {err[:200]!r}")
            if snapshot(root) != before:
                problems.append(f"{where}: wrote {sorted(set(snapshot(root)) - set(before))}")
    names = {flag for flag, _ in flags(tool)}
    for (tool_name, flag), rows in ACCEPTED.items():
        if tool_name != name:
            continue
        if flag not in names:
            problems.append(f"ACCEPTED has {flag}, which {name} no longer has")
        problems += [f"ACCEPTED: {name} {flag} {value!r} is refused now"
                     for value in rows if (flag, value) not in accepted]
    assert not problems, "\n".join(problems)


def test_known_bad_values_say_what_is_allowed(tools, workspace, capsys, monkeypatch):
    """Bad values the tools once took silently, each with what the error must offer instead."""
    root, home, blocker = workspace
    bench, report, export = tools["bench"], tools["report"], tools["export"]
    readonly = root / "readonly"
    readonly.mkdir()
    mkdtemp = tempfile.mkdtemp

    def refuse_readonly(*args, dir=None, **kwargs):   # root may write anywhere: pretend not
        if dir is not None and Path(dir) == readonly:
            raise PermissionError(13, "Permission denied")
        return mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(folders.tempfile, "mkdtemp", refuse_readonly)
    cases = [
        (bench, ["--batches", "64,0"], ["--batches", "at least 1", "'64,0'"]),
        (bench, ["--batches", "0"], ["--batches", "at least 1"]),
        (bench, ["--methods", "kd,dkdd"], ["--methods", "unknown method 'dkdd'",
                                           "did you mean: dkd",
                                           f"allowed: {', '.join(DISTILLERS.list())}"]),
        (bench, ["--steps", "0"], ["--steps", "at least 1"]),
        (bench, ["--teacher", "resnet2"], ["--teacher", "did you mean: resnet20"]),
        (bench, ["--out", str(root / "table.html")], ["--out", "'.html'", ".md"]),
        (bench, ["--out", str(readonly / "t.md")], ["--out", f"{readonly} is not writable"]),
        (bench, ["--bathces", "3"], ["did you mean --batches?"]),
        (report, [str(home), "--plot", "out.xyz"],
         ["--plot", "'.xyz'", "allowed: ", ".png", ".pdf", ".svg"]),
        (report, [str(home), "--plot", str(root / "fig")], ["--plot", "no file type"]),
        (report, [str(home), "--csv", f"{root / 't.csv'}/"], ["--csv", "is a folder"]),
        (report, [str(home), "--csv", str(blocker / "t.csv")],
         ["--csv", f"{blocker} is a file, not a folder"]),
        (report, [str(home), "--metric", "top5"], ["--metric", "'best', 'last'"]),
        (report, [str(root / "missing")], ["DIR", "no such directory"]),
        (export, [str(home), "--budget", "nan"], ["--budget", "finite"]),
        (export, [str(home), "--out", str(home)], ["--out", "is the run directory"]),
        (export, [str(home), "--zoo", str(root / "no-zoo")], ["--zoo", "no such directory"]),
    ]
    import torch
    if not torch.cuda.is_available():
        cases.append((bench, ["--device", "cuda"],
                      ["--device", "no usable GPU", "allowed: auto, cpu"]))
    before = snapshot(root)
    for tool, argv, says in cases:
        assert run_main(tool, argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("error: "), (argv, captured)
        for text in says:
            assert text in captured.err, (argv, text, captured.err)
    assert snapshot(root) == before


def test_accepted_values_reach_the_tools_in_their_useful_form(tools, workspace):
    root, home, _ = workspace
    bench = tools["bench"].parse_args(["--batches", "32,64", "--data-paths", "both",
                                       "--methods", "kd,dkd", "--device", "cpu",
                                       "--out", "t.md"])
    assert (bench.batches, bench.data_paths, bench.methods, str(bench.device), bench.out) == (
        [32, 64], ["memory", "loader"], ["kd", "dkd"], "cpu", Path("t.md"))
    default = tools["bench"].parse_args([])
    assert default.methods == DISTILLERS.list()   # the registry's methods, manual steps too
    export = tools["export"].parse_args([str(home), "--budget", "0", "--out", "a/b"])
    assert (export.budget, export.out, export.run_dir) == (0.0, Path("a/b"), home)
    report = tools["report"].parse_args([str(home), "--plot", "f.PDF", "--csv", "t.csv"])
    assert (report.dirs, report.plot, report.csv) == ([home], Path("f.PDF"), Path("t.csv"))
    assert not (root / "cwd" / "a").exists()
