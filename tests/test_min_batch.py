"""Degenerate batches: a method whose loss relates a batch's items to each other
declares the smallest batch it means something for (Traits.min_batch). Below it the loss is 0
(the run is plain cross-entropy under the method's name) or blows up, so such batch sizes are
refused before anything is written, and an epoch's last batch below it is dropped and said."""
import pytest
import torch

from _compose import make_cfg
from distill.app import run
from distill.engine.sampler import EpochSampler, steps_per_epoch
from distill.errors import ConfigError
from distill.losses import cc_loss, dist_loss, pkt_loss, rkd_loss, sp_loss
from distill.method import DISTILLERS

# each declaring method's loss on a batch of `n` items (student, teacher drawn independently)
LOSSES = {
    "pkt": lambda s, t: pkt_loss(s, t),
    "cc": lambda s, t: cc_loss(s, t),
    "sp": lambda s, t: sp_loss(s, t),
    "rkd": lambda s, t: rkd_loss(s, t),
    "dist": lambda s, t: dist_loss(s, t, beta=0.0),   # its intra-class term: over the batch
}


def test_the_declaring_methods_are_the_batch_relational_ones():
    declared = {name for name in DISTILLERS if DISTILLERS.get(name).traits.min_batch > 1}
    assert declared == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_below_its_min_batch_the_loss_is_degenerate_and_at_it_is_not(name):
    smallest = DISTILLERS.get(name).traits.min_batch
    generator = torch.Generator().manual_seed(0)

    def loss(n: int) -> torch.Tensor:
        student = torch.randn(n, 10, generator=generator, requires_grad=True)
        teacher = torch.randn(n, 10, generator=generator)
        value = LOSSES[name](student, teacher)
        value.backward()
        return value.detach(), student.grad

    try:
        below, grad = loss(smallest - 1)
    except ValueError:   # cc_loss refuses a batch it cannot pair: no step could run at all
        pass
    else:   # a constant (0, or DIST's 1): no gradient (rounding at most), nothing learnt
        assert grad.abs().max() < 1e-6 or not torch.isfinite(grad).all(), (below, grad)
    at, grad = loss(smallest)
    assert torch.isfinite(at) and at > 0 and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("method,size,allowed", [("pkt", 1, "at least 2"),
                                                 ("rkd", 2, "at least 3"),
                                                 ("dist", 1, "at least 2")])
def test_a_batch_below_the_methods_minimum_is_refused(tmp_path, method, size, allowed):
    teacher = [] if method == "dist" else ["teacher=resnet8"]
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, "dataset=fake", "student=resnet8", *teacher, f"distiller={method}",
                     f"trainer.batch_size={size}", "trainer.epochs=1"))
    assert err.value.key == "trainer.batch_size" and allowed in err.value.render()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_last_batch_below_the_minimum_is_dropped():
    assert steps_per_epoch(33, 16, 1) == 3 and steps_per_epoch(33, 16, 1, min_batch=2) == 2
    assert steps_per_epoch(34, 16, 1, min_batch=2) == 3
    assert steps_per_epoch(35, 16, 2, min_batch=2) == 2   # 3 left: 1 and 2 per rank
    sampler = EpochSampler(33, 0, global_batch=16, min_batch=2)
    assert len(sampler) == 32 and len(set(sampler)) == 32
    # a method that needs one item keeps the order it had (a bit-exact resume of old runs)
    assert list(EpochSampler(33, 0, global_batch=16)) [:32] == list(sampler)


def test_a_run_says_it_drops_the_last_batch(tmp_path, caplog):
    caplog.set_level("INFO", logger="distill")
    summary = run(make_cfg(tmp_path, "dataset=fake", "dataset.train_size=33",
                           "dataset.val_size=8", "student=resnet8", "teacher=resnet8",
                           "distiller=sp", "trainer.batch_size=16", "trainer.epochs=1",
                           f"teacher.checkpoint={_teacher(tmp_path)}", "zoo.publish=false"))
    assert summary["steps"] == 2
    assert "each epoch's last batch (1 items) is dropped" in caplog.text


def _teacher(tmp_path):
    from safetensors.torch import save_file

    from distill.models import create_model

    torch.manual_seed(0)
    path = tmp_path / "teacher.safetensors"
    save_file(create_model("resnet8", num_classes=10).state_dict(), str(path))
    return path
