"""Checkpoints and weight files.

- Weights (student, teachers in the zoo) are safetensors: loading them cannot run code.
- Training state (`checkpoints/last.pt`) holds only tensors and plain Python values, so it loads
  with `torch.load(weights_only=True)`. It is written to a temporary file and renamed into place;
  the previous one is kept as `prev.pt` so a crash mid-write never loses the run.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.errors import ConfigError


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, path.with_name("prev.pt"))
    os.replace(tmp, path)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_weights(path: str | Path, *, key: str = "teacher.checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch pickle loaded with weights_only=True
    (teacher checkpoints from other tools: mdistiller's {'model': ...}, {'state_dict': ...})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}", key=key)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refusing to unpickle code is the point
        raise ConfigError(f"refused to load {path}: it is not a plain weights file "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0]})", key=key,
                          hint="convert it to safetensors, or save only the state_dict") from None
    for wrapper in ("model", "state_dict", "net", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} holds a {type(obj).__name__}, not a state dict", key=key)
    # checkpoints saved from DataParallel/DDP prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in obj.items()}


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


def load_training_state(run_dir: Path) -> dict | None:
    """The newest readable checkpoint in run_dir/checkpoints, or None for a fresh run."""
    for name in ("last.pt", "prev.pt"):
        path = run_dir / "checkpoints" / name
        if not path.exists():
            continue
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - fall back to the previous checkpoint
            logging.getLogger(__name__).warning("checkpoint %s is unreadable (%s); trying the "
                                                "previous one", path, exc)
    return None
