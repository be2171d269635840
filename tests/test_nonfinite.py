"""trainer.on_nonfinite: a NaN loss stops the run naming the step and each term (the last good
checkpoint stays as it was and resumes), or, with `skip`, the step leaves no trace and is counted.

The NaN is injected into the KD term at chosen steps by wrapping KD.forward (the teacher is an
untrained resnet8 from a weights file, so no teacher training is needed).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from _compose import make_cfg
from distill.app import run
from distill.distillers.kd import KD
from distill.errors import ConfigError
from distill.models import create_model

# 128 fake images in batches of 32: 4 steps an epoch, 8 in all
BASE = ["dataset=fake", "dataset.train_size=128", "dataset.val_size=64", "distiller=kd",
        "student=resnet8", "teacher=resnet8", "trainer.epochs=2", "zoo.publish=false"]


@pytest.fixture
def kd_args(tmp_path) -> list[str]:
    weights = tmp_path / "teacher.safetensors"
    torch.manual_seed(1)
    save_file(create_model("resnet8", num_classes=10).state_dict(), str(weights))
    return [*BASE, f"teacher.checkpoint={weights}"]


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at(5, 9): the KD term is NaN at global steps 5 and 9 (0-based; logged as step 6, 10)."""
    def inject(*steps: int) -> None:
        forward = KD.forward

        def forward_with_nan(self, images, targets, ctx):
            logits, terms = forward(self, images, targets, ctx)
            if ctx.step in steps:
                terms["kd"] = terms["kd"] * float("nan")
            return logits, terms

        monkeypatch.setattr(KD, "forward", forward_with_nan)
    return inject


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def _all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_stop_names_step_and_terms_keeps_the_checkpoint_and_resumes_with_skip(
        tmp_path, kd_args, nan_at):
    nan_at(6)   # in the second epoch: the first one's checkpoint (step 4) is the last good one
    run_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError) as err:
        run(make_cfg(tmp_path, *kd_args))
    message = str(err.value)
    assert message.startswith("non-finite loss at step 7: ce=")
    ce = float(message.split("ce=")[1].split(",")[0])
    assert 0 < ce < 10 and "kd=nan" in message
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'last.pt'} (step 4)" in message
    assert "set trainer.on_nonfinite=skip" in message
    ckpt = _state(run_dir)
    assert ckpt["state"]["global_step"] == 4 and not ckpt["state"]["finished"]
    assert _all_finite(ckpt["parts"]["student"].values())
    assert not (run_dir / "student.safetensors").exists()

    # what the message suggests: the same command with skip resumes from step 4 and finishes
    summary = run(make_cfg(tmp_path, *kd_args, "trainer.on_nonfinite=skip"))
    assert [e["resumed_at_step"] for e in _events(run_dir) if e["event"] == "resume"] == [4]
    assert summary["steps"] == 8 and summary["skipped_steps"] == 1
    assert _all_finite(load_file(str(run_dir / "student.safetensors")).values())


def test_skip_counts_skipped_steps_in_logs_summary_and_checkpoint(tmp_path, kd_args, nan_at):
    nan_at(1, 6)
    summary = run(make_cfg(tmp_path, *kd_args, "trainer.on_nonfinite=skip", "trainer.log_every=2"))
    run_dir = tmp_path / "run"
    assert summary["steps"] == 8 and summary["skipped_steps"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["skipped_steps"] == 2
    assert _state(run_dir)["state"]["skipped_steps"] == 2
    train = [e for e in _events(run_dir) if e["event"] == "train"]
    skipped = [(e["step"], e["train/skipped_steps"]) for e in train]
    assert skipped == [(2, 1), (4, 1), (6, 1), (8, 2)]
    assert all(math.isfinite(e["train/kd"]) for e in train), "logged means leave skips out"
    assert _all_finite(load_file(str(run_dir / "student.safetensors")).values())


def test_a_skipped_step_leaves_weights_and_bn_statistics_as_they_were(tmp_path, kd_args, nan_at):
    """Five good steps == five good steps and a skipped sixth, bit for bit (BN statistics
    included: the skipped step's forward updated them, and they are put back)."""
    run(make_cfg(tmp_path, *kd_args, "trainer.max_steps=5", run="five"))
    nan_at(5)
    summary = run(make_cfg(tmp_path, *kd_args, "trainer.max_steps=6", "trainer.on_nonfinite=skip",
                           run="six"))
    assert summary["skipped_steps"] == 1
    five = load_file(str(tmp_path / "five" / "student.safetensors"))
    six = load_file(str(tmp_path / "six" / "student.safetensors"))
    assert any("running_mean" in k for k in five)
    assert all(torch.equal(five[k], six[k]) for k in five)


def test_unknown_policy_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, *BASE, "trainer.on_nonfinite=ignore"))
    assert err.value.key == "trainer.on_nonfinite" and err.value.allowed == "stop, skip"
    assert "'ignore'" in str(err.value)


def test_non_finite_weights_behind_a_finite_loss_never_reach_a_checkpoint(
        tmp_path, kd_args, monkeypatch):
    """Non-finite gradients with a finite loss (fp32 has no GradScaler to catch them): the
    update at the last step of epoch 2 poisons a weight; the epoch-end checkpoint is refused and
    the one of epoch 1 stays."""
    step = torch.optim.SGD.step
    calls = {"n": 0}

    def poisoning_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 8:   # the last step of the run: its loss was computed before it
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", poisoning_step)
    run_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError) as err:
        run(make_cfg(tmp_path, *kd_args))
    message = str(err.value)
    assert message.startswith("non-finite weights after step 8 (e.g. student.")
    assert f"{run_dir / 'checkpoints' / 'last.pt'} (step 4)" in message
    ckpt = _state(run_dir)
    assert ckpt["state"]["global_step"] == 4 and _all_finite(ckpt["parts"]["student"].values())
    assert not (run_dir / "student.safetensors").exists()


def test_skip_under_a_manual_step_drops_the_updates_and_counts_the_step(tmp_path, monkeypatch):
    """DML (two peers, two optimizers, its own step): at step 3 every backward is NaN. With
    skip, neither peer moves and their BN statistics are put back, the step is counted, the run
    goes on and ends with finite weights."""
    from distill.distillers.dml import DML

    original = DML.training_step

    def training_step(self, images, targets, ctx, step):
        if ctx.step != 3:
            return original(self, images, targets, ctx, step)
        trainer_step = step

        class NaNBackward:   # the step as the method sees it, with a NaN in every loss
            optimizers = trainer_step.optimizers

            def backward(self, loss):
                trainer_step.backward(loss * float("nan"))

            def step(self, name):
                return trainer_step.step(name)

        before = {r: {k: v.clone() for k, v in self.part(r).state_dict().items()}
                  for r in self.peer_roles}
        terms = original(self, images, targets, ctx, NaNBackward())
        for role in self.peer_roles:   # weights and BN buffers exactly as before the step
            after = self.part(role).state_dict()
            assert all(torch.equal(before[role][k], after[k]) for k in after), role
        return terms

    monkeypatch.setattr(DML, "training_step", training_step)
    summary = run(make_cfg(tmp_path, "dataset=fake", "dataset.train_size=128",
                           "dataset.val_size=64", "distiller=dml", "student=resnet8",
                           "trainer.epochs=2", "trainer.on_nonfinite=skip", "trainer.log_every=1"))
    assert summary["steps"] == 8 and summary["skipped_steps"] == 1
    assert _all_finite(load_file(str(tmp_path / "run" / "student.safetensors")).values())


def test_a_manual_step_with_every_update_skipped_leaves_the_fp16_scaler_alone():
    """GradScaler.update() raises when no scaler.step() ran since the last update: the manual
    stepper says whether one did, and the trainer updates only then."""
    from distill.engine.trainer import ManualStepper

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    stepper = ManualStepper({"main": optimizer}, scaler, skip_nonfinite=True,
                            group_buffers={"main": []})
    stepper.begin()
    stepper.backward(model(torch.ones(1, 3)).sum() * float("nan"))
    assert stepper.step("main") is False and stepper.skipped and not stepper.stepped
    with pytest.raises(AssertionError, match="No inf checks"):
        scaler.update()
    stepper.begin()
    stepper.backward(model(torch.ones(1, 3)).sum())
    assert stepper.step("main") is True and stepper.stepped
    scaler.update()


def test_a_run_whose_every_step_is_skipped_fails_instead_of_finishing(tmp_path, kd_args, nan_at):
    """A teacher that outputs NaN makes every KD step non-finite: with skip, 8 of 8 steps were
    skipped and the run ended `done` with exit 0 and untrained weights. It stops instead."""
    nan_at(*range(8))
    with pytest.raises(FloatingPointError, match=r"4 of the run's 4 steps so far .* every step of epoch 1"):
        run(make_cfg(tmp_path, *kd_args, "trainer.on_nonfinite=skip"))
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "student.safetensors").exists()


def test_a_run_that_mostly_skips_stops_and_publishes_nothing(tmp_path, kd_args, nan_at):
    """lr=1e30 skipped 7 of 8 steps and still ended `done` at chance, exit 0, with a zoo version:
    only an epoch whose every step was skipped stopped. More than trainer.max_skipped_fraction
    (0.25) of the run's steps skipped, checked at each epoch's end, stops the run (exit 3 from
    the command line)."""
    nan_at(0, 1)
    with pytest.raises(FloatingPointError, match=r"2 of the run's 4 steps so far .* "
                                                 r"trainer.max_skipped_fraction=0.25"):
        run(make_cfg(tmp_path, *kd_args, "trainer.on_nonfinite=skip", "zoo.publish=true"))
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "zoo").exists() or not any((tmp_path / "zoo").rglob("*.safetensors"))


def test_skipped_steps_up_to_the_bound_are_allowed(tmp_path, kd_args, nan_at):
    nan_at(1)   # 1 of 4: at the bound, not past it
    summary = run(make_cfg(tmp_path, *kd_args, "trainer.on_nonfinite=skip"))
    assert summary["skipped_steps"] == 1
    with pytest.raises(FloatingPointError, match=r"1 of the run's 4 steps"):
        run(make_cfg(tmp_path, *kd_args, "trainer.on_nonfinite=skip",
                     "trainer.max_skipped_fraction=0", run="strict"))


def test_a_skipped_step_then_a_stop_signal_is_a_preemption(tmp_path, kd_args, monkeypatch):
    """The first step of epoch 2 is non-finite (skipped) and a stop signal comes during it: the
    run stops with its checkpoint (exit 75), not as an epoch whose every step was skipped."""
    import os
    import signal

    from distill.engine.preemption import Preempted

    forward = KD.forward

    def forward_with_nan_and_signal(self, images, targets, ctx):
        logits, terms = forward(self, images, targets, ctx)
        if ctx.step == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
            terms["kd"] = terms["kd"] * float("nan")
        return logits, terms

    monkeypatch.setattr(KD, "forward", forward_with_nan_and_signal)
    with pytest.raises(Preempted):
        run(make_cfg(tmp_path, *kd_args, "trainer.on_nonfinite=skip"))
    state = _state(tmp_path / "run")["state"]
    assert state["global_step"] == 5 and state["skipped_steps"] == 1
