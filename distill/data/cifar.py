"""CIFAR-10 / CIFAR-100 read from the official python-pickle release.

We parse the files ourselves (torchvision's classes insist on the md5 of each batch file) and we
unpickle with a restricted unpickler: a data file may rebuild numpy arrays, nothing else, so a
tampered file cannot run code. Images are kept as one uint8 tensor [N,3,32,32].
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import socket
import tarfile
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from distill.data import DATASETS, DatasetBundle, crop_recipe, tensor_bundle
from distill.data.digest import files_digest
from distill.errors import ConfigError

DOWNLOAD_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class CifarSpec:
    name: str
    folder: str
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    release_md5: dict[str, str]   # each batch file of the official release (torchvision's list)


CIFAR10 = CifarSpec(
    name="CIFAR-10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
    label_key=b"labels", num_classes=10,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    release_md5={"data_batch_1": "c99cafc152244af753f735de768cd75f",
                 "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                 "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
                 "data_batch_4": "634d18415352ddfa80567beed471001a",
                 "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
                 "test_batch": "40351d587109b95175f43aff81a1287e"})

CIFAR100 = CifarSpec(
    name="CIFAR-100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    train_files=("train",), test_files=("test",),
    label_key=b"fine_labels", num_classes=100,
    # the reference code's constants (mdistiller and RepDistiller, dataset/cifar100.py, in
    # their Normalize transforms), so teachers trained by either load and see the same inputs
    mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761),
    release_md5={"train": "16019d7e3df5f24257cddd939b257f8d",
                 "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"})


# --------------------------------------------------------------------------- safe unpickling

def _allowed_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    import _codecs
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # protocol-2 pickles written by Python 3 encode bytes objects as _codecs.encode(str, 'latin1')
        ("_codecs", "encode"): _codecs.encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _reconstruct
        allowed[(module, "scalar")] = scalar
    for module in ("builtins", "__builtin__"):
        for name, obj in (("bytes", bytes), ("bytearray", bytearray), ("dict", dict),
                          ("list", list), ("tuple", tuple), ("int", int), ("str", str)):
            allowed[(module, name)] = obj
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals needed to rebuild numpy arrays and plain containers."""

    _ALLOWED: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str) -> object:
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': data files may only contain numpy "
                "arrays and plain containers") from None


def safe_load_pickle(path: str) -> object:
    """Load a (Python-2 or 3 era) pickle file without letting it import or call arbitrary code."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding="bytes").load()


# --------------------------------------------------------------------------- archives

def safe_extract_tar(archive: str, dest: str) -> None:
    """Extract `archive` into `dest`, refusing links, devices, and members escaping `dest`."""
    dest_real = os.path.realpath(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            target = os.path.realpath(os.path.join(dest_real, m.name))
            if os.path.isabs(m.name) or not (target == dest_real
                                             or target.startswith(dest_real + os.sep)):
                raise ConfigError(f"archive {archive} has a member escaping the target folder: "
                                  f"{m.name!r}; refusing to extract it", key="dataset.root",
                                  hint="delete the archive and download the official one again")
            if not (m.isfile() or m.isdir()):
                raise ConfigError(f"archive {archive} has a link or special file {m.name!r}; "
                                  "refusing to extract it", key="dataset.root",
                                  hint="delete the archive and download the official one again")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest_real, members=members, filter="data")
        else:  # pragma: no cover - old Python without extraction filters; checked above
            tar.extractall(dest_real, members=members)


def _extract_into_root(spec: CifarSpec, root: str, archive: str) -> None:
    """Extract to a private temp dir, then move the folder into place (safe with several ranks)."""
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=root)
    try:
        try:
            safe_extract_tar(archive, tmp)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ConfigError(f"cannot read the archive {archive}: {e}", key="dataset.root",
                              hint=f"delete it and download {spec.url} again") from None
        extracted = os.path.join(tmp, spec.folder)
        if not os.path.isdir(extracted):
            raise ConfigError(f"archive {archive} does not contain the folder '{spec.folder}/'",
                              key="dataset.root",
                              hint=f"is it the {spec.name} python release? Get it from {spec.url}")
        try:
            os.rename(extracted, os.path.join(root, spec.folder))
        except OSError:
            if not os.path.isdir(os.path.join(root, spec.folder)):  # lost a race: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(spec: CifarSpec, root: str) -> bool:
    """Try to fetch the official archive into root. False when offline or the download fails."""
    from torchvision.datasets.utils import download_url
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # download_url checks the md5; we extract ourselves (safe_extract_tar) instead of using
        # download_and_extract_archive, whose extraction does not refuse escaping members.
        download_url(spec.url, root, filename=spec.archive, md5=spec.md5)
    except Exception:  # offline, DNS, HTTP error, md5 mismatch: report as a ConfigError below
        return False
    finally:
        socket.setdefaulttimeout(old)
    return os.path.isfile(os.path.join(root, spec.archive))


def _missing_error(spec: CifarSpec, root: str, download: bool, tried: bool) -> ConfigError:
    folder = os.path.join(root, spec.folder)
    archive = os.path.join(root, spec.archive)
    why = "the download failed (offline?)" if tried else "download=false"
    return ConfigError(
        f"{spec.name} not found: neither the folder {folder}/ nor the archive {archive} exists, "
        f"and {why}",
        key="dataset.root",
        hint=(f"download {spec.url} (md5 {spec.md5}) and put it at {archive} "
              f"(it is extracted on first use), or point dataset.root at the folder holding it"
              + ("" if download else ", or set dataset.download=true on a machine with network")))


def ensure_cifar(spec: CifarSpec, root: str, download: bool) -> str:
    """Return the extracted folder, extracting or downloading the archive when needed."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    folder = os.path.join(root, spec.folder)
    if os.path.isdir(folder):
        return folder
    archive = os.path.join(root, spec.archive)
    tried = False
    if not os.path.isfile(archive) and download:
        os.makedirs(root, exist_ok=True)
        tried = True
        _download(spec, root)
    if not os.path.isfile(archive):
        raise _missing_error(spec, root, download, tried)
    _extract_into_root(spec, root, archive)
    return folder


# --------------------------------------------------------------------------- loading

def load_cifar_files(spec: CifarSpec, folder: str, files: tuple[str, ...]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read batch files -> (uint8 images [N,3,32,32], int64 labels [N])."""
    images, labels = [], []
    for fname in files:
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise ConfigError(f"{spec.name} file missing: {path}", key="dataset.root",
                              hint=f"delete {folder}/ and extract {spec.archive} again "
                                   f"(from {spec.url})")
        try:
            batch = safe_load_pickle(path)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"cannot read {path}: {e}", key="dataset.root",
                              hint=f"replace it with the file from the official archive {spec.url}"
                              ) from None
        if not isinstance(batch, dict) or b"data" not in batch or spec.label_key not in batch:
            raise ConfigError(f"{path} is not a {spec.name} batch (needs keys b'data' and "
                              f"{spec.label_key!r})", key="dataset.root",
                              hint=f"use the python release from {spec.url}")
        data = np.asarray(batch[b"data"])
        lab = np.asarray(batch[spec.label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
                or lab.shape != (data.shape[0],):
            raise ConfigError(f"{path}: expected uint8 data [N,3072] and N labels, got "
                              f"{data.dtype} {data.shape} and {lab.shape}", key="dataset.root",
                              hint=f"use the python release from {spec.url}")
        if lab.size and (lab.min() < 0 or lab.max() >= spec.num_classes):
            raise ConfigError(f"{path}: labels outside 0..{spec.num_classes - 1}",
                              key="dataset.root", hint="is this the right dataset for this root?")
        images.append(data)
        labels.append(lab)
    # each 3072 row is the R plane (1024, row-major 32x32), then G, then B -> CHW directly
    x = torch.from_numpy(np.ascontiguousarray(np.concatenate(images)).reshape(-1, 3, 32, 32))
    y = torch.from_numpy(np.concatenate(labels))
    return x, y


def _md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build(spec: CifarSpec, root: str, download: bool, augment: bool,
           training_split: bool = True) -> DatasetBundle:
    """`training_split=False` (data-free methods): the training batches are not opened; the
    bundle's training split is empty and its digest covers the test batch alone."""
    folder = ensure_cifar(spec, root, download)
    if training_split:
        xtr, ytr = load_cifar_files(spec, folder, spec.train_files)
    else:
        xtr, ytr = torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    xte, yte = load_cifar_files(spec, folder, spec.test_files)
    # The official release is identified by its name, as before digests existed (so its zoo
    # teachers are still found); a copy that differs from it (re-labelled, filtered) is other
    # data, even under the same root option: the sha256 of its batch files (~0.3 s for 180 MB).
    names = (spec.train_files if training_split else ()) + spec.test_files
    official = all(_md5(os.path.join(folder, f)) == spec.release_md5[f] for f in names)
    digest = None if official else files_digest((f, os.path.join(folder, f)) for f in names)
    return tensor_bundle((xtr, ytr), (xte, yte), num_classes=spec.num_classes, mean=spec.mean,
                         std=spec.std, augment=augment, **crop_recipe(spec.name.lower().replace("-", "")),
                         data_digest=digest)


@DATASETS.register("cifar10", num_classes=10, image_size=32, mean=CIFAR10.mean, std=CIFAR10.std,
                   data_key="dataset.root", padding=4, flip=True)
def cifar10(root: str = "data", download: bool = True, augment: bool = True, *,
            training_split: bool = True) -> DatasetBundle:
    """CIFAR-10 (50k/10k, 10 classes) from `root/cifar-10-batches-py/` or its archive."""
    return _build(CIFAR10, root, download, augment, training_split)


@DATASETS.register("cifar100", num_classes=100, image_size=32, mean=CIFAR100.mean,
                   std=CIFAR100.std, data_key="dataset.root", padding=4, flip=True)
def cifar100(root: str = "data", download: bool = True, augment: bool = True, *,
             training_split: bool = True) -> DatasetBundle:
    """CIFAR-100 (50k/10k, 100 fine classes) from `root/cifar-100-python/` or its archive."""
    return _build(CIFAR100, root, download, augment, training_split)
