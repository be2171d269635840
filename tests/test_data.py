"""Tests for distill.data: real CIFAR file format, safe unpickling/extraction, folders, digits, fake."""
from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from _planted import PlantedCode
from distill.data import DATASETS, DatasetBundle, build_datasets
from distill.data.cifar import RestrictedUnpickler, safe_extract_tar, safe_load_pickle
from distill.data.transforms import denormalize, has_flip
from distill.errors import ConfigError

# ----------------------------------------------------------------------------- helpers


def _write_batch(path, n, label_key, num_classes, seed):
    """One batch file in the official format: protocol-2 pickle of a dict with bytes keys."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    batch = {b"batch_label": b"testing batch", label_key: labels, b"data": data,
             b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return data, labels


def make_cifar10(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = [_write_batch(folder / f"data_batch_{i}", n, b"labels", 10, i) for i in range(1, 6)]
    test = _write_batch(folder / "test_batch", n, b"labels", 10, 99)
    return folder, train, test


def make_cifar100(root, n_train=12, n_test=6):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = _write_batch(folder / "train", n_train, b"fine_labels", 100, 1)
    test = _write_batch(folder / "test", n_test, b"fine_labels", 100, 2)
    return folder, train, test


def to_uint8(bundle, x):
    return (denormalize(x, bundle.mean, bundle.std) * 255).round().clamp(0, 255).to(torch.uint8)


def make_tar_gz(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def save_image(path, size=(40, 48), colour=(200, 30, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# ----------------------------------------------------------------------------- CIFAR


def test_cifar100_real_format_roundtrip(tmp_path):
    _, (xtr, ytr), (xte, yte) = make_cifar100(tmp_path)
    b = build_datasets("cifar100", root=str(tmp_path), download=False, augment=False)
    assert isinstance(b, DatasetBundle)
    assert (len(b.train), len(b.val), b.num_classes, b.image_size) == (12, 6, 100, 32)
    # the reference code's constants (mdistiller, RepDistiller: dataset/cifar100.py)
    assert b.mean == (0.5071, 0.4867, 0.4408) and b.std == (0.2675, 0.2565, 0.2761)
    for ds, data, labels in ((b.val, xte, yte), (b.train, xtr, ytr)):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and type(x) is torch.Tensor
            assert y == labels[i] and isinstance(y, int)
            # whole image round-trips through normalise -> de-normalise
            assert torch.equal(to_uint8(b, x), torch.from_numpy(data[i].reshape(3, 32, 32)))
    # CHW layout: the 3072 row is the R plane, then G, then B (each 32x32 row-major)
    x, _ = b.val[0]
    px = to_uint8(b, x)
    assert px[0, 0, 0] == xte[0, 0]                    # R at (0,0)
    assert px[1, 5, 7] == xte[0, 1024 + 5 * 32 + 7]    # G at (5,7)
    assert px[2, 31, 31] == xte[0, 3071]               # B at (31,31)
    # images are held as one uint8 tensor in memory
    assert b.train.images.dtype == torch.uint8 and b.train.images.shape == (12, 3, 32, 32)
    assert b.train.labels.dtype == torch.int64


def test_cifar10_all_batches_in_order(tmp_path):
    _, train, (xte, yte) = make_cifar10(tmp_path, n=3)
    b = build_datasets("cifar10", root=str(tmp_path), download=False, augment=False)
    assert (len(b.train), len(b.val), b.num_classes) == (15, 3, 10)
    assert b.mean == (0.4914, 0.4822, 0.4465)
    expected = np.concatenate([d for d, _ in train])
    assert torch.equal(b.train.images.reshape(15, -1), torch.from_numpy(expected))
    assert b.train.labels.tolist() == sum((lab for _, lab in train), [])
    assert b.val.labels.tolist() == yte


def test_cifar_train_augmentation_is_crop_flip(tmp_path):
    make_cifar10(tmp_path, n=2)
    b = build_datasets("cifar10", root=str(tmp_path), download=False)  # augment=True by default
    assert has_flip(b.train.transform) and not has_flip(b.val.transform)
    x, _ = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_cifar_extracts_real_tar_gz(tmp_path):
    staging, root = tmp_path / "staging", tmp_path / "root"
    root.mkdir()
    folder, _, (xte, yte) = make_cifar100(staging)
    make_tar_gz(folder, root / "cifar-100-python.tar.gz")
    b = build_datasets("cifar100", root=str(root), download=False, augment=False)
    assert (len(b.train), len(b.val), b.num_classes) == (12, 6, 100)
    assert torch.equal(to_uint8(b, b.val[3][0]), torch.from_numpy(xte[3].reshape(3, 32, 32)))
    assert (root / "cifar-100-python" / "train").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-100-python", "cifar-100-python.tar.gz"]
    # second call uses the extracted folder
    assert len(build_datasets("cifar100", root=str(root), download=False).val) == 6


def test_cifar10_extracts_real_tar_gz(tmp_path):
    staging, root = tmp_path / "staging", tmp_path / "root"
    root.mkdir()
    folder, _, _ = make_cifar10(staging)
    make_tar_gz(folder, root / "cifar-10-python.tar.gz")
    b = build_datasets("cifar10", root=str(root), download=False)
    assert (len(b.train), len(b.val), b.num_classes) == (20, 4, 10)


@pytest.mark.parametrize("name,archive", [("cifar100", "cifar-100-python.tar.gz"),
                                          ("cifar10", "cifar-10-python.tar.gz")])
def test_cifar_missing_names_file_root_and_url(tmp_path, name, archive):
    with pytest.raises(ConfigError) as e:
        build_datasets(name, root=str(tmp_path), download=False)
    msg = str(e.value)
    assert e.value.key == "dataset.root"
    assert os.path.join(str(tmp_path), archive) in msg
    assert "https://www.cs.toronto.edu/~kriz/" + archive in msg


def test_cifar_offline_download_failure_is_config_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvu, "download_url", offline)
    with pytest.raises(ConfigError) as e:
        build_datasets("cifar100", root=str(tmp_path / "new"), download=True)
    assert e.value.key == "dataset.root" and "download failed" in str(e.value)
    assert "cifar-100-python.tar.gz" in str(e.value)


def test_cifar_missing_batch_file(tmp_path):
    folder, _, _ = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match="data_batch_3") as e:
        build_datasets("cifar10", root=str(tmp_path), download=False)
    assert e.value.key == "dataset.root"


# ----------------------------------------------------------------------------- safety


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0], b"x": PlantedCode(marker)}
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "train", "wb") as f:
        pickle.dump(payload, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        safe_load_pickle(str(folder / "train"))
    with pytest.raises(ConfigError) as e:
        build_datasets("cifar100", root=str(tmp_path), download=False)
    assert e.value.key == "dataset.root"
    assert not marker.exists()
    # sanity: the plain unpickler WOULD have run it (proves the planted pickle is live)
    with open(folder / "train", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_restricted_unpickler_reads_numpy1_style_pickles(tmp_path):
    # files written by old numpy name numpy.core.multiarray._reconstruct
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw = pickle.dumps({b"data": arr}, protocol=2).replace(b"numpy._core.multiarray",
                                                            b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    out = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    assert np.array_equal(out[b"data"], arr)


def test_safe_extract_refuses_escaping_members(tmp_path):
    archive = tmp_path / "bad.tar.gz"
    evil = tmp_path / "evil.txt"
    evil.write_text("x")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(evil, arcname="../escaped.txt")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ConfigError, match="escaping"):
        safe_extract_tar(str(archive), str(dest))
    assert not (tmp_path / "escaped.txt").exists()

    link_archive = tmp_path / "link.tar.gz"
    with tarfile.open(link_archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ConfigError, match="link"):
        safe_extract_tar(str(link_archive), str(dest))
    assert list(dest.iterdir()) == []


# ----------------------------------------------------------------------------- folders


@pytest.mark.parametrize("name", ["imagenet", "folder"])   # folder: your own data, same layout
def test_imagenet_folders(tmp_path, name):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog", "fish"):
            for i in range(n):
                ext = "JPEG" if i % 2 == 0 else "png"
                save_image(tmp_path / split / cls / f"{cls}_{i}.{ext}")
    b = build_datasets(name, root=str(tmp_path), image_size=32)
    assert (len(b.train), len(b.val), b.num_classes, b.image_size) == (9, 6, 3, 32)
    for ds in (b.train, b.val):
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and type(x) is torch.Tensor
        assert 0 <= y < 3
    assert b.val.class_to_idx == b.train.class_to_idx
    loader = torch.utils.data.DataLoader(b.val, batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.int64


def test_imagenet_val_subset_uses_train_indices(tmp_path):
    for cls in ("a", "b", "c"):
        save_image(tmp_path / "train" / cls / "0.png")
    save_image(tmp_path / "val" / "c" / "0.png")
    b = build_datasets("imagenet", root=str(tmp_path), image_size=16)
    assert b.num_classes == 3 and b.val[0][1] == b.train.class_to_idx["c"] == 2


@pytest.mark.parametrize("name", ["imagenet", "folder"])
def test_imagenet_missing_or_empty(tmp_path, name):
    with pytest.raises(ConfigError) as e:
        build_datasets(name, root=str(tmp_path), image_size=32)
    assert e.value.key == "dataset.root" and "train/<class>" in str(e.value)
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError, match="no class folders"):
        build_datasets(name, root=str(tmp_path))
    (tmp_path / "train" / "a").mkdir()  # class folder without images
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError) as e:
        build_datasets(name, root=str(tmp_path))
    assert e.value.key == "dataset.root"
    with pytest.raises(ConfigError) as e:
        build_datasets(name)
    assert e.value.key == "dataset.root"


def test_tiny_imagenet_real_layout(tmp_path):
    wnids = ["n01443537", "n01629819", "n01641577"]
    for k, w in enumerate(wnids):
        for i in range(2):
            save_image(tmp_path / "train" / w / "images" / f"{w}_{i}.JPEG", (64, 64),
                       (80 * k, 10, 10))
        (tmp_path / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t10\t10\n")
    lines = []
    val_labels = [2, 0, 1, 2]
    for i, k in enumerate(val_labels):
        save_image(tmp_path / "val" / "images" / f"val_{i}.JPEG", (64, 64))
        lines.append(f"val_{i}.JPEG\t{wnids[k]}\t0\t0\t63\t63")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    b = build_datasets("tiny_imagenet", root=str(tmp_path))
    assert (len(b.train), len(b.val), b.num_classes, b.image_size) == (6, 4, 3, 64)
    assert [b.val[i][1] for i in range(4)] == val_labels
    assert b.train.class_to_idx == {w: i for i, w in enumerate(wnids)}
    assert b.train[0][0].shape == (3, 64, 64) and b.val[0][0].shape == (3, 64, 64)

    # an annotation naming an unknown class is a ConfigError, not a KeyError
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(ConfigError, match="n99999999"):
        build_datasets("tiny_imagenet", root=str(tmp_path))


def test_tiny_imagenet_val_class_folders(tmp_path):
    for w in ("n1", "n2"):
        save_image(tmp_path / "train" / w / "images" / "a.JPEG", (64, 64))
        save_image(tmp_path / "val" / w / "b.JPEG", (64, 64))
    b = build_datasets("tiny_imagenet", root=str(tmp_path), image_size=32)
    assert (len(b.val), b.num_classes) == (2, 2) and b.val[1][0].shape == (3, 32, 32)


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_bundle():
    return build_datasets("digits")


def test_digits_sizes_and_shapes(digits_bundle):
    b = digits_bundle
    assert (len(b.train), len(b.val), b.num_classes, b.image_size) == (1437, 360, 10, 32)
    x, y = b.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey repeated to 3 channels
    # stratified: every class is ~20% in val
    total = torch.bincount(torch.cat([b.train.labels, b.val.labels]), minlength=10)
    val = torch.bincount(b.val.labels, minlength=10)
    assert ((val - 0.2 * total).abs() <= 1).all()


def test_digits_split_deterministic(digits_bundle):
    again = build_datasets("digits")
    assert torch.equal(again.val.images, digits_bundle.val.images)
    assert torch.equal(again.train.labels, digits_bundle.train.labels)
    other = build_datasets("digits", split_seed=1)
    assert not torch.equal(other.val.images, digits_bundle.val.images)


def test_digits_train_aug_has_no_flip(digits_bundle):
    assert not has_flip(digits_bundle.train.transform)
    names = [type(t).__name__ for t in digits_bundle.train.transform.transforms]
    assert "RandomCrop" in names


def test_digits_stats_match_hardcoded(digits_bundle):
    x = digits_bundle.train.images.float() / 255
    assert abs(x.mean().item() - digits_bundle.mean[0]) < 1e-3
    assert abs(x.std().item() - digits_bundle.std[0]) < 1e-3


def test_digits_bad_value(digits_bundle):
    with pytest.raises(ConfigError) as e:
        build_datasets("digits", test_fraction=1.5)
    assert e.value.key == "dataset.test_fraction"


# ----------------------------------------------------------------------------- fake


def test_fake_deterministic_and_seeded():
    a, b, c = (build_datasets("fake", seed=s) for s in (0, 0, 1))
    assert (len(a.train), len(a.val), a.num_classes) == (256, 128, 10)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.train.images, c.train.images)
    x, y = a.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_fake_is_learnable():
    b = build_datasets("fake", num_classes=5, image_size=16)
    xtr, ytr = b.train.images.float().flatten(1), b.train.labels
    centroids = torch.stack([xtr[ytr == k].mean(0) for k in range(5)])
    pred = torch.cdist(b.val.images.float().flatten(1), centroids).argmin(1)
    assert (pred == b.val.labels).float().mean() > 0.9
    assert b.train[0][0].shape == (3, 16, 16)


def test_fake_dataloader_batches_plain_tensors():
    b = build_datasets("fake", train_size=16)
    xb, yb = next(iter(torch.utils.data.DataLoader(b.train, batch_size=8)))
    assert type(xb) is torch.Tensor and xb.shape == (8, 3, 32, 32) and yb.shape == (8,)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
    assert set(DATASETS.list()) >= {"cifar10", "cifar100", "digits", "fake", "imagenet",
                                    "tiny_imagenet", "folder", "mnist5k"}
    with pytest.raises(ConfigError) as e:
        build_datasets("cifar1000")
    assert e.value.key == "dataset" and "cifar100" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_datasets("fake", num_clases=3)
    assert e.value.key == "dataset.num_clases" and "num_classes" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_datasets("fake", num_classes=0)
    assert e.value.key == "dataset.num_classes"
