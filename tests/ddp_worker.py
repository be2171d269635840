"""Run by tests/test_ddp.py under torchrun with 1 or 2 processes: a few steps of the real
Trainer on fake data, no augmentation, with BN-free models (per-rank BatchNorm statistics would
make 2 x B/2 differ from 1 x B by design; SyncBatchNorm is GPU-only). `kd` takes the default
step (the distiller in DDP); `dml` the manual step (two peers, two optimizers, gradients
averaged by the trainer); `crd` the default step with a memory bank the ranks keep equal;
`..._cached` KD with teacher.cache=views, one store shared by both runs; `..._accumulate` half
batches, two per optimizer step (trainer.accumulate=2); `kd_text` KD between two TextCNNs on
fake_text (token ids and attention masks; no dropout, whose draws differ per rank).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT_DIR CASE [CASE ...]

A CASE is METHOD:DATA_PATH (kd|dml|crd|kd_cached_accumulate|kd_text : memory|loader|auto); each
runs in OUT_DIR/METHOD-DATA_PATH, one after the other in the same processes (one launch and one
process group for all of them: most of a launch is importing torch). The teacher caches live in
OUT_DIR/../zoo, shared by the runs of both world sizes.

200 images in global batches of 32: six full batches, then one of 8 (4 per rank), all taken.
"""
import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import distill.catalog  # noqa: F401 - registers every method
from distill import distributed as dist_utils
from distill.config import TrainerConfig
from distill.data import TensorImageDataset
from distill.data.fake import fake
from distill.data.fake_text import fake_text
from distill.engine.teacher_cache import attach_teacher_cache
from distill.engine.trainer import Trainer
from distill.method import BuildInfo, build_distiller
from distill.models import MODELS, create_model

GLOBAL_BATCH, STEPS = 32, 7


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def text_net(seed: int, maps: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("textcnn", num_classes=4, vocab_size=1000, embed_dim=32, maps=maps,
                        dropout=0.0)


def build(method: str, labels: torch.Tensor) -> torch.nn.Module:
    if method == "crd":   # its memory bank is updated from every rank's samples
        return build_distiller("crd", tiny_net(0), tiny_net(1),
                               {"nce_k": 16, "student_layer": "7:in", "teacher_layer": "7:in"},
                               BuildInfo(num_classes=10, train_labels=labels, seed=0))
    if method == "kd_text":
        return build_distiller("kd", text_net(0), text_net(1, maps=32), {})
    if method == "dml":   # peer 1 is made by the method from its registry name
        MODELS.register("tiny_net")(lambda num_classes=10: tiny_net(1))
        return build_distiller("dml", tiny_net(0), None, {"peers": ["tiny_net", "tiny_net"]},
                               BuildInfo(num_classes=10, student_arch="tiny_net"))
    return build_distiller(method, tiny_net(0), tiny_net(1), {})


def main(out: Path, cases: list[str]) -> None:
    dist_utils.init_from_env(use_cuda=False)
    for case in cases:
        method, data_path = case.split(":")
        train(out / f"{method}-{data_path}", data_path, method)
        dist_utils.barrier()


def train(run_dir: Path, data_path: str, method: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if method == "kd_text":
        data = fake_text(train_size=200, val_size=64)
    else:
        data = fake(train_size=200, val_size=64)
        plain = TensorImageDataset(data.train.images, data.train.labels, data.val.transform)
        data = dataclasses.replace(data, train=plain)
    accumulate = 2 if method.endswith("_accumulate") else 1   # half batches, two per step
    method = method.removesuffix("_accumulate")
    distiller = build(method.removesuffix("_cached"), data.train.labels)
    cache = None
    if method.endswith("_cached"):   # one store for the 1- and 2-process runs: the second reads
        teacher = SimpleNamespace(role="teacher", name="tiny_net", sha256="0" * 64)
        cache = attach_teacher_cache(distiller, [teacher], data,
                                     zoo_root=run_dir.parent.parent / "zoo",
                                     dataset="fake", precision="fp32",
                                     device=torch.device("cpu"), dtype="float32")
    trainer = Trainer(
        distiller, data, options=TrainerConfig(epochs=2, batch_size=GLOBAL_BATCH // accumulate,
                                                accumulate=accumulate, max_steps=STEPS,
                                                progress=False, data_path=data_path),
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        scheduler={"name": "multistep", "milestones": []}, run_dir=run_dir,
        device=torch.device("cpu"), loggers={}, config={}, run_name="ddp", seed=0,
        teacher_cache=cache)
    trainer.fit()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
