"""Data-free KD (DeepInversion, DAFL): the losses against transcriptions of the reference code on
fixed inputs, runs whose training split fails on any access (so not one training image is
read), bit-exact resume, and DeepInversion's cache of synthetic images in the run directory."""
from __future__ import annotations

import functools
import logging
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import distill.data.fake as fake_data
from _compose import make_cfg
from _golden import fixed_teacher
from _resume import FAKE_RUN, resumes_bit_exactly
from distill.app import run
from distill.engine.progress import WorkProgress
from distill.errors import ConfigError
from distill.export import Timing, export_run
from distill.losses.data_free import (bn_statistics_loss, dafl_losses, deepinversion_loss,
                                      total_variation_loss)
from distill.method import BuildInfo, build_distiller
from distill.models import create_model, model_spec

# small settings: 64 synthetic images (4 steps of 16 an epoch, as FAKE_RUN's 64 fake ones)
DEEPINVERSION = ["distiller=deepinversion", "distiller.num_images=64", "distiller.batch_size=32",
                 "distiller.iterations=3"]
DAFL = ["distiller=dafl", "distiller.epoch_size=64", "distiller.latent_dim=16"]


def test_losses_equal_transcriptions_of_the_reference_code():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    running_mean, running_var = torch.randn(3), torch.rand(3) + 0.5
    # NVlabs/DeepInversion cifar10 DeepInversionFeatureHook.hook_fn
    nch = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
    r_feature = torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)
    assert torch.allclose(bn_statistics_loss(x, running_mean, running_var), r_feature)
    # get_images: loss_var
    diff1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    diff2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    diff3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    diff4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    loss_var = torch.norm(diff1) + torch.norm(diff2) + torch.norm(diff3) + torch.norm(diff4)
    assert torch.allclose(total_variation_loss(x), loss_var)
    logits, targets = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    bn = [r_feature, 2 * r_feature]
    expected = (F.cross_entropy(logits, targets) + 10.0 * (3 * r_feature) + 2.5e-5 * loss_var
                + 0.5 * torch.norm(x, 2))
    got = deepinversion_loss(logits, targets, bn, x, bn_weight=10.0, tv_weight=2.5e-5,
                             l2_weight=0.5)
    assert torch.allclose(got, expected)
    # huawei-noah DAFL-train.py: loss_one_hot, loss_activation, loss_information_entropy
    outputs_t, features_t = torch.randn(8, 10) * 3, torch.randn(8, 64)
    pred = outputs_t.data.max(1)[1]
    softmax_o_t = F.softmax(outputs_t, dim=1).mean(dim=0)
    terms = dafl_losses(outputs_t, features_t)
    assert torch.allclose(terms["one_hot"], F.cross_entropy(outputs_t, pred))
    assert torch.allclose(terms["activation"], -features_t.abs().mean())
    assert torch.allclose(terms["entropy"], (softmax_o_t * torch.log10(softmax_o_t)).sum())
    # the entropy term is lowest when every class is equally frequent: -log10(C)
    uniform = dafl_losses(torch.eye(10) * 5, features_t)["entropy"]
    assert math.isclose(float(uniform), -math.log10(10), rel_tol=1e-5)


class ForbiddenSplit:
    """A training split that fails on any access: a run that reads it stops with this error."""

    def __getattribute__(self, name):
        raise AssertionError(f"the training split was read (.{name})")

    def __len__(self):
        raise AssertionError("the training split was read (len)")

    def __getitem__(self, index):
        raise AssertionError(f"the training split was read (item {index})")

    def __iter__(self):
        raise AssertionError("the training split was read (iter)")

    def __bool__(self):
        raise AssertionError("the training split was read (bool)")


@pytest.mark.slow   # a run under a dataset that fails on any read: about 10 s each
@pytest.mark.parametrize("method", [DEEPINVERSION, DAFL], ids=["deepinversion", "dafl"])
def test_a_data_free_run_reads_no_training_image(tmp_path, monkeypatch, method):
    real_bundle = fake_data.tensor_bundle

    def without_training_split(*args, **kwargs):
        bundle = real_bundle(*args, **kwargs)
        object.__setattr__(bundle, "train", ForbiddenSplit())
        return bundle

    monkeypatch.setattr(fake_data, "tensor_bundle", without_training_split)
    # the split really is forbidden: a method that reads it fails
    with pytest.raises(AssertionError, match="training split was read"):
        run(make_cfg(tmp_path, *FAKE_RUN, "distiller=kd",
                     f"teacher.checkpoint={fixed_teacher(tmp_path)}", run="kd"))
    summary = run(make_cfg(tmp_path, *FAKE_RUN, *method, "trainer.quantize=int8",
                           f"teacher.checkpoint={fixed_teacher(tmp_path)}"))
    assert summary["steps"] == 8 and len(summary["history"]) == 2
    # evaluated on the real validation split (32 images: top-1 a multiple of 1/32)
    assert all(round(h["top1"] * 32 / 100, 6).is_integer() for h in summary["history"])
    # its int8 export calibrates on the images the method made, not on training images
    report = export_run(tmp_path / "run", batch=2, timing=Timing(1, 1, 1, 0.0))
    assert report["int8"]["calibration"].endswith("images the method made")


@pytest.mark.parametrize("method", [DEEPINVERSION, DAFL], ids=["deepinversion", "dafl"])
def test_data_free_runs_resume_bit_exactly(tmp_path, method):
    _, _, checkpoint = resumes_bit_exactly(tmp_path, *method)
    if method is DAFL:   # the generator is trained and checkpointed with the student
        assert set(checkpoint["parts"]) == {"student", "generator"}
    else:   # the cut run's images were read back from its run directory, not made again
        assert sorted(p.name for p in (tmp_path / "resumed" / "synthetic").iterdir()) == \
            ["batch-00000.safetensors", "batch-00001.safetensors"]


def deepinversion_maker(tmp_path, *, num_images=12, every_s=30.0):
    """make(**options): a DeepInversion set of `num_images` (batches of 8, 2 Adam steps) made
    in tmp_path/run, as a run makes it."""
    teacher = create_model("resnet14", num_classes=10)
    teacher.load_state_dict(load_file(str(fixed_teacher(tmp_path))))
    info = BuildInfo(num_classes=10, input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3,
                     teacher_spec=model_spec("resnet14"), seed=1)

    def make(**options):
        d = build_distiller("deepinversion", create_model("resnet8", num_classes=10), teacher,
                            {"num_images": num_images, "batch_size": 8, "iterations": 2,
                             **options}, info)
        data = type("Facts", (), {"num_classes": 10, "name": "fake", "mean": info.mean,
                                  "std": info.std, "val": [(torch.zeros(3, 32, 32), 0)]})()
        dataset = d.stand_in_training_set({"num_images": num_images, "batch_size": 8}, data)
        d.make_training_set(dataset, run_dir=tmp_path / "run", device=torch.device("cpu"),
                            progress=functools.partial(WorkProgress, enabled=False,
                                                       every_s=every_s))
        return dataset
    return make


def test_deepinversion_cache_is_read_back_remade_when_damaged_or_changed(tmp_path):
    make = deepinversion_maker(tmp_path)
    first = make()
    assert first.labels.tolist() == [*range(8), 0, 1, 2, 3]   # classes restart in every batch
    assert first.images.float().std() > 0                     # images were made
    files = sorted((tmp_path / "run" / "synthetic").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    assert torch.equal(make().images, first.images)            # read back, not made again
    assert [f.stat().st_mtime_ns for f in files] == stamps
    files[1].write_bytes(files[1].read_bytes()[:50])           # damaged: made again, the same
    assert torch.equal(make().images, first.images)
    assert files[1].stat().st_mtime_ns != stamps[1]
    changed = make(tv_weight=1.0)                              # other options: other images
    assert not torch.equal(changed.images, first.images)
    with pytest.raises(ConfigError, match="diverged") as error:   # nothing cached from it
        make(lr=1e30, iterations=3)
    assert error.value.key == "distiller.lr"


def test_deepinversion_batch_files_are_known_by_position_and_checksum(tmp_path, caplog):
    """Every batch file of a run has the run's key: another batch's file in its place, or its
    tensors changed under the same metadata, or a file of the format without position and
    checksum, is made again (the same images), and the log names the batch and why."""
    make = deepinversion_maker(tmp_path, num_images=16)   # two full batches of 8
    first = make()
    files = sorted((tmp_path / "run" / "synthetic").iterdir())

    def remade(why):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="distill"):
            assert torch.equal(make().images, first.images)
        lines = [r.getMessage() for r in caplog.records if r.name == "distill"]
        assert any("batch 2/2" in line and why in line for line in lines), lines
        assert any("(1 batches made, 1 read back)" in line for line in lines), lines

    shutil.copyfile(files[0], files[1])   # batch 0 in batch 1's place: same labels, same size
    remade("it holds batch 0 of this run, not batch 1")
    with safe_open(str(files[1]), "pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(files[1]))
    tensors["images"][0, 0, 0, 0] ^= 1   # one pixel changed, the metadata kept
    save_file(tensors, str(files[1]), metadata=meta)
    remade("do not match the sha256")
    # the earlier format: the run's key alone (no position, no checksum) cannot be verified
    save_file(load_file(str(files[1])), str(files[1]), metadata={"key": meta["key"].rsplit("/")[0]})
    remade("cannot be verified")


def test_a_swapped_batch_file_is_made_again_and_the_student_is_unchanged(tmp_path):
    args = [*FAKE_RUN, *DEEPINVERSION, f"teacher.checkpoint={fixed_teacher(tmp_path)}"]
    run(make_cfg(tmp_path, *args))
    straight = load_file(str(tmp_path / "run" / "student.safetensors"))
    folder = tmp_path / "run" / "synthetic"
    shutil.copyfile(folder / "batch-00000.safetensors", folder / "batch-00001.safetensors")
    run(make_cfg(tmp_path, *args, "trainer.resume=false"))   # the images are read back
    again = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    # batch 1's file holds batch 1 again
    assert load_file(str(folder / "batch-00001.safetensors"))["images"].shape[0] == 32
    assert not torch.equal(load_file(str(folder / "batch-00000.safetensors"))["images"],
                           load_file(str(folder / "batch-00001.safetensors"))["images"])


def test_deepinversion_synthesis_logs_its_cost_progress_and_time_left(tmp_path, caplog):
    make = deepinversion_maker(tmp_path, num_images=16, every_s=0.0)   # every step a line
    with caplog.at_level(logging.INFO, logger="distill"):
        make(iterations=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "distill"]
    plan = next(i for i, line in enumerate(lines) if "synthesising 16 images" in line)
    assert "(2 batch(es) of up to 8) x 3 Adam steps each" in lines[plan]
    progress = lines[plan + 1:]
    assert any("batch 1/2, Adam step 2/3" in line for line in progress), progress
    made = [line for line in progress if "batch 2/2 made" in line]
    assert len(made) == 1 and "16/16 images" in made[0] and "images/s" in made[0]
    first = next(line for line in progress if "batch 1/2 made" in line)
    assert "8/16 images" in first and "left" in first
    # the whole's estimate, once, at the first measured rate
    assert sum("the 16 images to make take about" in line for line in progress) == 1
    # the paper's scale is a warning before it starts
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill"), pytest.raises(ConfigError):
        make(iterations=70_000, lr=1e30)   # diverges within its first steps
    assert any("synthesising 16 images" in r.getMessage() and "scale=cpu" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


def test_max_steps_bounds_the_synthesis_and_a_resume_past_the_bound_is_refused(tmp_path, caplog):
    args = [*FAKE_RUN, *DEEPINVERSION, f"teacher.checkpoint={fixed_teacher(tmp_path)}"]
    with caplog.at_level(logging.WARNING, logger="distill"):
        summary = run(make_cfg(tmp_path, *args, "trainer.max_steps=1"))
    assert summary["steps"] == 1
    # one step of 16 draws 16 images: the first batch of 32 is made, not the 64
    folder = tmp_path / "run" / "synthetic"
    assert [p.name for p in folder.iterdir()] == ["batch-00000.safetensors"]
    assert any("synthesises 32 of the 64 images of distiller.num_images" in r.getMessage()
               for r in caplog.records)
    # the same batch as a run without the bound makes
    run(make_cfg(tmp_path, *args, run="full"))
    assert torch.equal(load_file(str(folder / "batch-00000.safetensors"))["images"],
                       load_file(str(tmp_path / "full" / "synthetic" /
                                     "batch-00000.safetensors"))["images"])
    # continuing it without the bound would draw from another set than its step did
    with pytest.raises(ConfigError, match="bounded DeepInversion's set to 32") as error:
        run(make_cfg(tmp_path, *args))
    assert error.value.key == "trainer.max_steps"
    summary = run(make_cfg(tmp_path, *args, "trainer.resume=false"))   # batch 0 read back
    assert summary["steps"] == 8


def test_training_files_are_not_opened_for_a_data_free_method(tmp_path):
    """CIFAR's training batches and the images under a class folder's train/ are left unopened:
    here they are damaged, and the data-free build still gives the test split (and the class
    indices of train/'s folder names)."""
    from test_data import make_cifar10
    from test_data_checks import make_folder

    from distill.data import build_datasets

    folder, _, (test_images, test_labels) = make_cifar10(tmp_path / "c10")
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError):   # a normal build reads them
        build_datasets("cifar10", root=str(tmp_path / "c10"), download=False)
    bundle = build_datasets("cifar10", root=str(tmp_path / "c10"), download=False,
                            training_split=False)
    assert len(bundle.train) == 0 and bundle.val.labels.tolist() == list(test_labels)
    root = make_folder(tmp_path / "flowers")
    for image in (root / "train").rglob("*.*"):
        image.write_bytes(b"not an image")
    with pytest.raises(ConfigError):
        build_datasets("folder", root=str(root), image_size=32)
    bundle = build_datasets("folder", root=str(root), image_size=32, training_split=False)
    assert bundle.val.class_to_idx == {c: i for i, c in enumerate(
        sorted(p.name for p in (root / "train").iterdir()))}
    assert len(bundle.val) > 0 and bundle.num_classes == len(bundle.val.class_to_idx)
