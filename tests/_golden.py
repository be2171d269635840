"""A short, fixed-seed training trace of each of the eight original methods, read only through
the run-directory contract (metrics.jsonl, student.safetensors, summary.json), so the same code
recorded the trace before the roles redesign and checks it after.

Float kernels differ between CPUs (MKL's and oneDNN's paths per instruction set and vendor), so
a trace is exact only on the kind of machine that recorded it: tests/data/methods_golden.json
holds one per machine kind (`machine()`), each recorded by the code before the redesign.

    python tests/_golden.py    # add this machine's traces (only on purpose, with that code)
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compose import make_cfg  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "data" / "methods_golden.json"
ORIGINAL_METHODS = ("none", "kd", "dkd", "fitnet", "at", "rkd", "takd", "noisy_kd")
# 64 fake images in batches of 16: 4 steps an epoch; 6 steps cross an epoch end (evaluation,
# checkpoint), and DKD's warm-up ramp changes there
COMMAND = ["dataset=fake", "dataset.train_size=64", "dataset.val_size=32", "student=resnet8",
           "teacher=resnet14", "trainer.epochs=2", "trainer.max_steps=6", "trainer.batch_size=16",
           "trainer.log_every=1", "device=cpu", "zoo.publish=false", "seed=0",
           "teacher.auto_train_epochs=1", "distiller.warmup_epochs=2"]
OPTION_ONLY = {"dkd": ["distiller.warmup_epochs=2"]}   # other methods have no warm-up option


def machine() -> str:
    """The kind of CPU a trace is exact on: torch's CPU capability and the vendor."""
    vendor = next((line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("vendor_id")), "unknown") \
        if Path("/proc/cpuinfo").exists() else "unknown"
    return f"{torch.backends.cpu.get_cpu_capability()} {vendor}"


def fixed_teacher(home: Path) -> Path:
    """A resnet14 with seeded random weights: the teacher's numbers need no training here."""
    path = home / "teacher.safetensors"
    if not path.exists():
        from distill.models import create_model
        torch.manual_seed(1234)
        save_file(create_model("resnet14", num_classes=10).state_dict(), str(path))
    return path


def method_trace(method: str, home: Path) -> dict:
    from distill.app import run

    command = [c for c in COMMAND if c != "distiller.warmup_epochs=2"] + OPTION_ONLY.get(method, [])
    extra = ["distiller.assistants=[resnet8]"] if method == "takd" else []
    cfg = make_cfg(home, *command, f"distiller={method}", *extra,
                   f"teacher.checkpoint={fixed_teacher(home)}", run=f"golden-{method}")
    summary = run(cfg)
    events = [json.loads(line) for line in
              (home / f"golden-{method}" / "metrics.jsonl").read_text().splitlines()]
    losses = [{k: v for k, v in e.items() if k.startswith("train/") and k not in
               ("train/images_per_sec", "train/epoch")} for e in events if e["event"] == "train"]
    weights = load_file(str(home / f"golden-{method}" / "student.safetensors"))
    return {"losses": losses, "last_top1": summary["last_top1"],
            "teacher_top1": summary["teacher_top1"],
            "weights": {k: [float(v.double().sum()), float(v.double().square().sum())]
                        for k, v in sorted(weights.items()) if v.is_floating_point()}}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        traces = {m: method_trace(m, Path(tmp)) for m in ORIGINAL_METHODS}
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    GOLDEN.write_text(json.dumps({**recorded, machine(): traces}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
