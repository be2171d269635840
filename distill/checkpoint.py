"""Checkpoints and weight files.

- Weights (student, teachers in the zoo) are safetensors: loading them cannot run code.
- Training state (`checkpoints/last.pt`) holds only tensors and plain Python values, so it loads
  with `torch.load(weights_only=True)`: a pickle that would run code is refused, never executed.
  It is written to a temporary file and renamed into place; the previous one is kept as
  `prev.pt`, so a crash mid-write never loses the run, and a `last.pt` damaged later (truncated,
  overwritten) makes resume fall back to `prev.pt` with a warning naming the bad file.
- Training state (format 2) holds every trained part by role and every optimizer and schedule
  by name (the method contract, docs/adding-a-method.md). A format-1 checkpoint (one student,
  its connectors, one optimizer), written before the roles by a pre-release version, is not
  resumed: resume names it and says how to start over.
- Only a checkpoint resume would take is ever demoted to `prev.pt`: a `last.pt` that resume
  skipped is renamed `last.pt.unreadable` by the next save instead, so the good `prev.pt` the
  run resumed from survives until a good `last.pt` replaces it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.errors import ConfigError

log = logging.getLogger("distill")

# what the trainer restores: a file without them is not one of our checkpoints
CHECKPOINT_KEYS = ("parts", "optimizers", "schedulers", "scaler", "state", "rng", "trackers",
                   "config")
FORMAT = 2
# format 1, before the roles (pre-release): one student, its connectors, one optimizer
FORMAT_1_KEYS = ("student", "connectors", "optimizer", "scheduler", "scaler", "state", "rng",
                 "trackers", "config")
# newest first: resume takes the first that loads
CHECKPOINT_FILES = ("last.pt", "prev.pt")


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if path.exists():
        # Demoted to prev.pt only if resume would take it (the very check resume makes): a
        # last.pt resume skipped (truncated, garbage, a valid zip carrying code, a file without
        # our keys) would replace the good prev.pt the run resumed from. Kept aside for a
        # post-mortem instead.
        keep = resumable(path)
        os.replace(path, path.with_name("prev.pt" if keep else path.name + ".unreadable"))
    os.replace(tmp, path)


def resumable(path: Path) -> bool:
    """Whether resume would take this checkpoint. Memory-mapped when it is a zip archive (what
    torch.save writes): the check unpickles the structure without reading the tensors."""
    try:
        read_checkpoint(path, mmap=zipfile.is_zipfile(path))
    except ValueError:
        return False
    return True


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_reason(exc: BaseException) -> str:
    """The informative line of a load error: torch's weights_only refusal opens with a paragraph
    about PyTorch 2.6 defaults (and advice to turn the safety off) before saying what it met."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip()
             for line in str(exc).splitlines()]
    lines = [line for line in lines if line and not line.startswith(boilerplate)]
    reason = lines[0] if lines else type(exc).__name__
    # miniz appends a paragraph of advice to its one-line diagnosis
    reason = reason.split(". This is an internal miniz error")[0]
    return f"{type(exc).__name__}: {reason[:200]}"


def exported_state(ckpt: dict, path: Path, *, key: str, arch: str | None = None
                   ) -> dict[str, torch.Tensor]:
    """From one of our training checkpoints, the model the run's `student.safetensors` holds
    (the EMA under trainer.ema_decay, else the exported part). Under trainer.quantize=int8 the
    weights are the float shadows under `parametrizations.weight.original`: the model to load
    them into makes them plain (distill.teachers.load_model, with the function the run's end
    uses). `arch`, when given, must be the architecture the checkpoint records."""
    exported = ckpt.get("exported") or {}   # recorded since the roles' checkpoints named it
    averages = ckpt.get("averages") or {}
    role = exported.get("role") or ("ema" if "ema" in averages else "student")
    recorded = exported.get("arch") or ((ckpt.get("config") or {}).get("student") or {}).get("name")
    if role == "ema" and "ema" in averages:   # torch's AveragedModel: module.<key>, n_averaged
        state = {k.removeprefix("module."): v for k, v in averages["ema"].items()
                 if k != "n_averaged"}
    elif isinstance(ckpt["parts"].get(role), dict):
        state = ckpt["parts"][role]
    else:
        raise ConfigError(f"{path} is a distill training checkpoint without its exported part "
                          f"({role}); give the run's student.safetensors instead", key=key)
    if arch is not None and recorded is not None and recorded != arch:
        raise ConfigError(f"{path} holds a {recorded} (a distill run's checkpoint), not a {arch}",
                          key=key, hint=f"name the architecture it holds ({recorded}) for this "
                                        f"teacher, or give weights of a {arch}")
    log.info("%s: a distill training checkpoint (step %s); taking what student.safetensors "
             "holds: %s%s", path, (ckpt.get("state") or {}).get("global_step", "?"), role,
             f" ({recorded})" if recorded else "")
    return state


def load_weights(path: str | Path, *, key: str = "teacher.checkpoint", arch: str | None = None
                 ) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch pickle loaded with weights_only=True
    (teacher checkpoints from other tools: mdistiller's {'model': ...}, {'state_dict': ...};
    a distill run's own `checkpoints/last.pt`: exported_state, checked against `arch`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}", key=key)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a damaged file is the user's input, not a bug
            raise ConfigError(f"cannot read {path}: not a valid safetensors file "
                              f"({load_reason(exc)})", key=key) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refusing to unpickle code is the point
        raise ConfigError(f"refused to load {path}: it is not a plain weights file "
                          f"({load_reason(exc)})", key=key,
                          hint="convert it to safetensors, or save only the state_dict") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT and isinstance(obj.get("parts"), dict):
        return exported_state(obj, path, key=key, arch=arch)
    for wrapper in ("model", "state_dict", "net", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} holds a {type(obj).__name__}, not a state dict", key=key)
    # checkpoints saved from DataParallel/DDP prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in obj.items()}


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (every device's) from `seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (str(np_state[0]), torch.from_numpy(np_state[1].copy()), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Every random state (Python, NumPy, torch, CUDA) is the same after the block as before:
    e.g. a teacher trained on the way leaves the run that needed it untouched."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def read_checkpoint(path: Path, *, mmap: bool = False) -> dict:
    """One training checkpoint; raises ValueError saying why it cannot be resumed from."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - truncated, garbage, or a pickle that carries code
        raise ValueError(load_reason(exc)) from None
    if isinstance(ckpt, dict) and "format" not in ckpt and all(k in ckpt for k in FORMAT_1_KEYS):
        raise ValueError("a format-1 checkpoint, written by a pre-release version of distill "
                         "before methods declared their parts; this version resumes format 2 "
                         "only (start the run over with trainer.resume=false)")
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"not a distill training checkpoint (no {', '.join(missing)})")
    return ckpt


def load_latest_checkpoint(run_dir: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint in run_dir/checkpoints that loads, and its path; None when there is
    none at all (a fresh run). Skipping a damaged one is a warning naming it; when every one is
    damaged the run stops: silently starting over would throw the run away."""
    folder = Path(run_dir) / "checkpoints"
    present = [folder / name for name in CHECKPOINT_FILES if (folder / name).is_file()]
    problems: list[str] = []
    for path in present:
        try:
            ckpt = read_checkpoint(path)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
            continue
        for problem in problems:
            log.warning("skipping unreadable checkpoint %s; resuming from %s instead",
                        problem, path)
        if path.name != CHECKPOINT_FILES[0] and not problems:
            log.warning("resuming from %s: %s is missing (a crash between two renames)", path,
                        folder / CHECKPOINT_FILES[0])
        return ckpt, path
    if problems:
        raise ConfigError(
            "cannot resume: no checkpoint in this run directory can be read\n  "
            + "\n  ".join(problems), key="trainer.resume",
            hint="nothing was changed; pass trainer.resume=false to start this run over (its "
                 "files are kept under previous/), or choose another run directory")
    return None
