"""DDP through torchrun on CPU (gloo), two processes: the same training as one process, and the
command line under torchrun writing one run directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


# one xdist worker runs this module: its fixture launches the torchrun cases once. The launches
# (two processes each, about 40 s in all on 2 cores) are the slow tier's; the launcher's
# configuration tests below run in every tier but the fast one
pytestmark = pytest.mark.xdist_group("ddp")


def torchrun(nproc: int, *args: str, env: dict | None = None, cwd: Path | None = None):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                   "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *args], cwd=cwd or REPO,
                          env=environment, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


CASES = [("kd", "memory"), ("kd", "loader"), ("dml", "memory"), ("crd", "loader"),
         ("kd_cached_accumulate", "loader"), ("kd_text", "auto")]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """Every case trained by 1 process, then by 2 (one torchrun launch each)."""
    base = tmp_path_factory.mktemp("ddp")
    for n in (1, 2):
        torchrun(n, "tests/ddp_worker.py", str(base / f"n{n}"), *(f"{m}:{p}" for m, p in CASES))
    return base


@pytest.mark.slow   # the module fixture's torchrun launches
@pytest.mark.parametrize("method,data_path", CASES)
def test_two_ranks_with_half_batches_equal_one_rank_with_the_whole_batch(ddp_runs, method,
                                                                         data_path):
    """2 x B/2 == 1 x B after k steps, a whole epoch with its partial last batch: same samples
    per step, gradients averaged over ranks, top-1 counted over the whole validation set
    (BN-free models: see tests/ddp_worker.py). KD on both data paths; DML's manual step with
    its two optimizers on one; CRD, whose memory bank and negatives must be the global
    batch's on every rank, on the other (its banks are compared too); KD with the teacher's
    outputs cached (the 2-rank run reading what the 1-process run stored) and half batches
    accumulated two to an optimizer step (trainer.accumulate=2); KD between TextCNNs on token
    ids and attention masks."""
    sys.path.insert(0, str(REPO / "tests"))
    from ddp_worker import GLOBAL_BATCH, STEPS, text_net, tiny_net

    runs = [ddp_runs / f"n{n}" / f"{method}-{data_path}" for n in (1, 2)]
    one, two = (load_file(str(run / "student.safetensors")) for run in runs)
    init = (text_net(0) if method == "kd_text" else tiny_net(0)).state_dict()
    moved = 1e-4 if method == "kd_text" else 1e-3   # KD's T^2-scaled soft targets move less
    assert all((one[k] - init[k]).abs().max() > moved for k in one if k.endswith("weight"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    s1, s2 = (json.loads((run / "summary.json").read_text()) for run in runs)
    if method == "crd":   # the banks saw every rank's embeddings
        from distill.checkpoint import read_checkpoint
        banks = [read_checkpoint(run / "checkpoints" / "last.pt")["parts"]["memory"]
                 for run in runs]
        assert banks[0].keys() == banks[1].keys() and "bank_student" in banks[0]
        for key in banks[0]:   # Z: the sum of a float32 score tensor, in another order
            torch.testing.assert_close(banks[0][key], banks[1][key], rtol=1e-5, atol=1e-5)
    if method.startswith("kd_cached"):   # the 1-process run filled the store, 2 ranks read it
        assert s1["teacher_cache"]["computed"] == s2["teacher_cache"]["read"] == 200
        assert s2["teacher_cache"]["computed"] == 0
    if method == "dml":   # the other peer too: its own optimizer, its gradients averaged
        assert s1["models"]["peer1"]["last_top1"] == pytest.approx(s2["models"]["peer1"]["last_top1"])
        assert set(s1["models"]) == {"peer0", "peer1"}
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s1["steps"] == s2["steps"] == STEPS
    batch = GLOBAL_BATCH // 2 if method.endswith("_accumulate") else GLOBAL_BATCH
    assert s1["global_batch_size"] == s2["global_batch_size"] == batch
    assert s1["images_per_step"] == s2["images_per_step"] == GLOBAL_BATCH
    assert (s1["per_rank_batch_size"], s2["per_rank_batch_size"]) == (batch, batch // 2)
    assert s1["teacher_top1"] == s2["teacher_top1"]
    assert s1["last_top1"] == pytest.approx(s2["last_top1"])


@pytest.mark.slow   # torchrun from the command line: 30 s; the module's cases launch it too
def test_torchrun_command_line_run(tmp_path):
    """`torchrun --nproc_per_node=2 tools/train.py ...`: the missing teacher is auto-trained
    under DDP, the job has one run directory, rank 0 alone writes it, and the teacher's top-1 is
    over the whole validation set (equal to a one-process evaluation). While another process
    (this test) holds the teacher's zoo claim, the job waits for it, both ranks together."""
    import time

    from distill.zoo import TeacherZoo

    run_dir = tmp_path / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                   "PYTHONUNBUFFERED": "1", "DISTILL_ZOO": str(tmp_path / "zoo")}
    environment.pop("WORLD_SIZE", None)
    log = tmp_path.parent / f"{tmp_path.name}-torchrun.log"
    with TeacherZoo(tmp_path / "zoo").claim("fake", "resnet8"), open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(REPO / "tools" / "train.py"), "dataset=fake", "distiller=kd", "student=resnet8",
             "teacher=resnet8", "teacher.auto_train=true", "teacher.auto_train_epochs=1",
             "trainer.max_steps=3", "trainer.batch_size=64", "trainer.progress=false",
             "logger=jsonl", f"hydra.run.dir={run_dir}"],
            cwd=tmp_path, env=environment, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while f"waiting for pid {os.getpid()} on host" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(6)   # both ranks keep asking (rank 0 polls every 5 s) without a timeout
        assert proc.poll() is None
    assert proc.wait(timeout=300) == 0, log.read_text()[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 64
    assert summary["per_rank_batch_size"] == 32 and summary["steps"] == 3
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("teacher") == 1, "one writer: rank 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "zoo"]
    import yaml
    recorded = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert recorded["world_size"] == 2 and recorded["trainer"]["batch_size"] == 64

    from distill.data.fake import fake
    from distill.engine.evaluation import evaluate
    from distill.models import create_model
    from distill.zoo import TeacherZoo

    entry = TeacherZoo(tmp_path / "zoo").find("fake", "resnet8")
    assert entry is not None and entry.meta["epochs"] == 1
    teacher = create_model("resnet8", num_classes=10)
    teacher.load_state_dict(load_file(str(entry.weights)))
    loader = torch.utils.data.DataLoader(fake().val, batch_size=256)
    assert summary["teacher_top1"] == pytest.approx(
        evaluate(teacher, loader, torch.device("cpu"))["top1"])


# --- clusters: what can be checked without one ----------------------------------------------------
def test_slurm_launcher_config_composes_with_one_task_per_gpu():
    from hydra import compose, initialize_config_dir

    import distill.config  # noqa: F401

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                                          "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.partition == "gpu"


def test_slurm_tasks_become_a_torchrun_style_world(monkeypatch):
    """The variables a 2-node x 2-GPU submitit job sees on its 4th task."""
    from distill import distributed as dist_utils

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "")   # recorded, so the exported values are removed afterwards
        monkeypatch.delenv(key)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4",
             "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert dist_utils.adopt_slurm_tasks()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07" and 20000 <= int(os.environ["MASTER_PORT"]) <= 60000
    assert dist_utils.launched_by_torchrun() and dist_utils.launch_world_size() == 4
    assert not dist_utils.adopt_slurm_tasks(), "a second call (RANK set) changes nothing"


def test_single_task_slurm_jobs_stay_single_process(monkeypatch):
    from distill import distributed as dist_utils

    monkeypatch.setenv("RANK", "")
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not dist_utils.adopt_slurm_tasks() and "RANK" not in os.environ
