
import pytest
import torch

from distill.engine.optim import build_optimizer, build_scheduler, lr_factor_fn


def _lrs(scheduler_kw, epochs, steps_per_epoch=10, lr=0.05):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], lr=lr)
    sched = build_scheduler(opt, steps_per_epoch=steps_per_epoch, epochs=epochs, **scheduler_kw)
    lrs = []
    for _ in range(epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_reference_cifar_multistep():
    lrs = _lrs({"name": "multistep", "milestones": [150, 180, 210]}, epochs=240, steps_per_epoch=2)
    at_epoch = lambda e: lrs[e * 2]  # noqa: E731
    assert at_epoch(0) == pytest.approx(0.05) and at_epoch(149) == pytest.approx(0.05)
    assert at_epoch(150) == pytest.approx(0.005) and at_epoch(179) == pytest.approx(0.005)
    assert at_epoch(180) == pytest.approx(0.0005) and at_epoch(210) == pytest.approx(0.00005)
    # the decay happens exactly at the epoch boundary: steps 298-299 are epoch 149
    assert lrs[299] == pytest.approx(0.05) and lrs[300] == pytest.approx(0.005)


def test_warmup_then_cosine():
    f = lr_factor_fn(name="cosine", epochs=10, steps_per_epoch=10, warmup_epochs=2)
    warmup = [f(step) for step in range(20)]
    assert warmup == sorted(warmup) and warmup[0] == pytest.approx(1 / 20)  # monotone ramp
    assert f(9) == pytest.approx(0.5)
    assert f(20) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-9)


def test_warmup_multiplies_the_multistep_schedule():
    f = lr_factor_fn(name="multistep", epochs=10, steps_per_epoch=4, milestones=[5], warmup_epochs=1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1)


def test_sgd_options():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    group = opt.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 5e-4, True)
    assert group["lr"] == 0.1 and isinstance(opt, torch.optim.SGD)
    adamw = build_optimizer([p], name="adamw", lr=0.01, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
