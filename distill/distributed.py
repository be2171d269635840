"""Process-group facts and the few collectives the trainer needs.

A plain `python tools/train.py` is a world of one and none of this does anything. Under
`torchrun`, `init_from_env()` joins the process group torchrun describes in the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL when the run is on CUDA, gloo on CPU.
"""
from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or launch_world_size() > 1


def launch_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun), before any group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def adopt_slurm_tasks() -> bool:
    """A SLURM job started by Hydra's submitit launcher with several tasks (one per GPU) is one
    DDP world: export the variables torchrun would have set (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR = the job's first node, MASTER_PORT from the job id) from SLURM's. Every GPU
    stays visible; each task takes GPU LOCAL_RANK. Returns whether it did."""
    if (os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "RANK" in os.environ
            or int(os.environ.get("SLURM_NTASKS", "1")) < 2):
        return False
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def init_from_env(use_cuda: bool) -> None:
    """Join torchrun's process group once (idempotent; nothing to do outside torchrun)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    if use_cuda:
        torch.cuda.set_device(local_rank())
    # a rank stuck behind a failed peer should fail, not hang for the default 30 minutes
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(minutes=10))
    atexit.register(dist.destroy_process_group)


def all_reduce_sum(tensor: torch.Tensor) -> None:
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. the run directory, which must be one per job)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """Run `fn` (a side effect: files, the zoo) on rank 0 only; every rank then returns its
    result or raises its exception, so an error there stops all ranks instead of leaving the
    others waiting at the next collective."""
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            error = exc
    result, error = broadcast_object((result, error)) if world_size() > 1 else (result, error)
    if error is not None:
        raise error
    return result


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Give every rank rank 0's values, e.g. BN running statistics: DDP syncs buffers at the
    start of each forward, but the last training forward updated each rank's copy from its own
    shard, and evaluation and checkpoints must all see one model."""
    if world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def all_gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Every rank's `tensor` concatenated along dim 0 in rank order, and each rank's row count:
    the global batch, since each rank's share of it is a contiguous slice in rank order
    (EpochSampler). The shares may differ by a row (the last, partial batch), so they are padded
    to the largest for the collective. Not differentiable: for state the ranks keep equal (CRD's
    memory bank)."""
    if world_size() == 1:
        return tensor, [tensor.shape[0]]
    counts = torch.tensor([tensor.shape[0]], device=tensor.device)
    all_counts = [torch.zeros_like(counts) for _ in range(world_size())]
    dist.all_gather(all_counts, counts)
    sizes = [int(c) for c in all_counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)]), sizes
