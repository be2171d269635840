"""Data that would be silently wrong is caught when the dataset is built: the data's
identity (`DatasetBundle.data_digest`), fewer than two classes, corrupt images, symlink loops and
unreadable folders. Every case writes real files in tmp_path: PNG/JPEG images, a truncated JPEG,
text saved as .jpg, a symlink loop, a gzip'ed MNIST CSV."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from test_data import make_cifar10, save_image
from torch.utils.data import Subset

from distill.data import TensorImageDataset, build_datasets, check_bundle, digest
from distill.data.fake import fake
from distill.errors import ConfigError

CLASSES = ("cat", "dog")


def make_folder(root, classes=CLASSES, train=2, val=1, colour=(200, 30, 60)):
    """<root>/train/<class>/<i>.png and <root>/val/<class>/<i>.png, 8x8 images."""
    for split, n in (("train", train), ("val", val)):
        for cls in classes:
            for i in range(n):
                save_image(root / split / cls / f"{i}.png", (8, 8), colour)
    return root


def jpeg_bytes(seed=0, size=32):
    """A JPEG of noise (noise keeps the entropy-coded data long enough to cut)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def plant_bad_images(root):
    """A truncated JPEG in train/cat and a text file named .jpg in val/dog."""
    truncated = root / "train" / "cat" / "truncated.jpg"
    truncated.write_bytes(jpeg_bytes()[:400])
    text = root / "val" / "dog" / "notes.jpg"
    text.write_text("this is not an image\n")
    return truncated, text


def write_mnist_csv(path, labels, seed=0):
    """The mnist5k format (see tests/test_mnist5k.py): gzip'ed CSV, 784 pixels then the label."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 784))
    with gzip.open(path, "wt") as f:
        for row, label in zip(pixels, labels):
            f.write(",".join(map(str, row)) + f",{label}\n")
    return path


# ----------------------------------------------------------------------------- data identity


@pytest.mark.parametrize("name", ["folder", "imagenet"])
def test_folder_digest_follows_the_listing(tmp_path, name):
    a = make_folder(tmp_path / "a")
    digest = build_datasets(name, root=str(a), image_size=8).data_digest
    assert isinstance(digest, str) and len(digest) == 64
    # the same data in another place: same digest
    shutil.copytree(a, tmp_path / "copy")
    assert build_datasets(name, root=str(tmp_path / "copy"), image_size=8).data_digest == digest
    # another folder (same layout and names, other image bytes and sizes): another digest
    other = make_folder(tmp_path / "other")
    (other / "train" / "cat" / "0.png").write_bytes(jpeg_bytes())   # still decodes (PIL sniffs)
    assert build_datasets(name, root=str(other), image_size=8).data_digest != digest
    # a renamed image, an added image, an image moved to the other class: each changes it
    renamed, added, moved = (shutil.copytree(a, tmp_path / n) for n in ("ren", "add", "mov"))
    (renamed / "train" / "cat" / "0.png").rename(renamed / "train" / "cat" / "9.png")
    save_image(added / "val" / "dog" / "7.png", (8, 8))
    (moved / "train" / "cat" / "1.png").rename(moved / "train" / "dog" / "1b.png")
    digests = {build_datasets(name, root=str(r), image_size=8).data_digest
               for r in (renamed, added, moved)}
    assert len(digests) == 3 and digest not in digests


def test_listing_digest_is_the_sorted_rows_as_json(monkeypatch):
    """Documented format, whatever the chunking: version line, compact JSON array, LF."""
    rows = [("val/b\n.png", 3, "b"), ("train/a/0.png", 10, "a"), ("train/\udcff.png", -1, "a")]
    expected = hashlib.sha256(digest.LISTING_VERSION + json.dumps(
        sorted(rows), separators=(",", ":")).encode() + b"\n").hexdigest()
    assert digest.listing_digest(rows) == expected
    monkeypatch.setattr(digest, "ROWS_PER_CHUNK", 2)
    assert digest.listing_digest(reversed(rows)) == expected


def test_tiny_imagenet_digest_covers_annotations(tmp_path):
    root = tmp_path / "tiny"
    for w in ("n1", "n2"):
        save_image(root / "train" / w / "images" / f"{w}_0.JPEG", (8, 8))
    save_image(root / "val" / "images" / "val_0.JPEG", (8, 8))
    ann = root / "val" / "val_annotations.txt"
    ann.write_text("val_0.JPEG\tn2\t0\t0\t7\t7\n")
    digest = build_datasets("tiny_imagenet", root=str(root), image_size=8).data_digest
    shutil.copytree(root, tmp_path / "copy")
    assert build_datasets("tiny_imagenet", root=str(tmp_path / "copy"),
                          image_size=8).data_digest == digest
    ann.write_text("val_0.JPEG\tn2\t1\t1\t6\t6\n")       # same image and label, other box
    assert build_datasets("tiny_imagenet", root=str(root), image_size=8).data_digest != digest


def test_mnist5k_digest_is_the_file_sha256(tmp_path):
    labels = [i % 10 for i in range(50)]
    path = write_mnist_csv(tmp_path / "a.csv.gz", labels)
    digest = build_datasets("mnist5k", path=str(path)).data_digest
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    copy = shutil.copy(path, tmp_path / "copy.csv.gz")
    assert build_datasets("mnist5k", path=str(copy)).data_digest == digest
    other = write_mnist_csv(tmp_path / "b.csv.gz", labels, seed=1)
    assert build_datasets("mnist5k", path=str(other)).data_digest != digest


def test_cifar_digest_is_the_batch_files(tmp_path):
    folder, _, _ = make_cifar10(tmp_path / "a", n=3)
    digest = build_datasets("cifar10", root=str(tmp_path / "a"), download=False).data_digest
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert build_datasets("cifar10", root=str(tmp_path / "b"), download=False).data_digest == digest
    # one pixel of the test batch changed (same size, same labels): another digest
    raw = bytearray((tmp_path / "b" / folder.name / "test_batch").read_bytes())
    at = raw.index(b"filenames") - 200      # inside the pixel array, pickled just before
    raw[at] ^= 1
    (tmp_path / "b" / folder.name / "test_batch").write_bytes(bytes(raw))
    assert build_datasets("cifar10", root=str(tmp_path / "b"), download=False).data_digest != digest


def test_the_official_cifar_release_is_identified_by_its_name(tmp_path, monkeypatch):
    """Files equal to the official release (torchvision's md5 list) have no digest, as before
    digests existed, so zoo teachers published then are still found."""
    from distill.data import cifar

    folder, _, _ = make_cifar10(tmp_path / "a", n=3)
    md5 = {f: hashlib.md5(open(os.path.join(folder, f), "rb").read()).hexdigest()
           for f in cifar.CIFAR10.release_md5}
    monkeypatch.setattr(cifar, "CIFAR10", replace(cifar.CIFAR10, release_md5=md5))
    assert build_datasets("cifar10", root=str(tmp_path / "a"), download=False).data_digest is None


def test_package_data_has_no_digest():
    assert build_datasets("fake", train_size=16, val_size=8).data_digest is None
    assert fake().data_digest is None


# ----------------------------------------------------------------------------- two classes


def test_one_class_folder_is_an_error(tmp_path):
    make_folder(tmp_path, classes=("cat",))
    with pytest.raises(ConfigError) as e:
        build_datasets("folder", root=str(tmp_path), image_size=8)
    assert e.value.key == "dataset.root"
    assert "1 class(es) (cat)" in e.value.message and "at least two" in e.value.message


def test_one_class_mnist_file_is_an_error(tmp_path):
    path = write_mnist_csv(tmp_path / "sevens.csv.gz", [7] * 200)
    with pytest.raises(ConfigError) as e:
        build_datasets("mnist5k", path=str(path))
    assert e.value.key == "dataset.path"
    assert "all 160 training images have the same label 7" in e.value.message


def test_check_bundle_reads_labels_of_subsets_and_empty_splits():
    bundle = fake(num_classes=2, train_size=8, val_size=4)
    check_bundle(bundle)                                     # two labels: fine
    ones = [i for i in range(8) if int(bundle.train.labels[i]) == 1]
    with pytest.raises(ConfigError, match="all 4 training images have the same label 1") as e:
        check_bundle(replace(bundle, train=Subset(bundle.train, ones)), key="dataset.root")
    assert e.value.key == "dataset.root"
    empty = TensorImageDataset(bundle.val.images[:0], bundle.val.labels[:0])
    with pytest.raises(ConfigError, match="validation split holds no images") as e:
        check_bundle(replace(bundle, val=empty))
    assert e.value.key == "dataset"
    with pytest.raises(ConfigError) as e:
        build_datasets("fake", num_classes=1)
    assert e.value.key == "dataset.num_classes"


# ----------------------------------------------------------------------------- bad images


@pytest.mark.parametrize("name", ["folder", "imagenet"])
def test_bad_images_error_names_them(tmp_path, name):
    truncated, text = plant_bad_images(make_folder(tmp_path))
    with pytest.raises(ConfigError) as e:
        build_datasets(name, root=str(tmp_path), image_size=8)
    assert e.value.key == "dataset.bad_images"
    assert e.value.message.startswith("2 of 8 images cannot be read")
    assert str(truncated) in e.value.message and str(text) in e.value.message
    assert "truncated" in e.value.message and "UnidentifiedImageError" in e.value.message
    assert "dataset.bad_images=skip" in e.value.hint


def test_bad_images_skip_drops_them_and_warns(tmp_path, caplog):
    truncated, text = plant_bad_images(make_folder(tmp_path))
    with caplog.at_level(logging.WARNING, logger="distill"):
        b = build_datasets("folder", root=str(tmp_path), image_size=8, bad_images="skip")
    assert (len(b.train), len(b.val)) == (4, 2)
    for ds in (b.train, b.val):
        paths = [p for p, _ in ds.samples]
        assert str(truncated) not in paths and str(text) not in paths
        assert ds.targets == [t for _, t in ds.samples] and ds.imgs is ds.samples
    assert b.val.targets == [0, 1] and b.val[1][1] == 1
    warned = [r.getMessage() for r in caplog.records if r.name == "distill"]
    assert len(warned) == 1 and "skipping 2 of 8 images" in warned[0]
    # the digest is that of the images kept: the clean folder's
    clean = make_folder(tmp_path / "clean")
    assert b.data_digest == build_datasets("folder", root=str(clean), image_size=8).data_digest


def test_bad_images_lists_five_and_counts_the_rest(tmp_path):
    make_folder(tmp_path)
    for i in range(7):
        (tmp_path / "train" / "dog" / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 9)
    with pytest.raises(ConfigError) as e:
        build_datasets("folder", root=str(tmp_path), image_size=8)
    assert e.value.message.startswith("7 of 13 images cannot be read")
    listed = [line for line in e.value.message.splitlines() if line.startswith("  /")]
    assert len(listed) == 5 and e.value.message.endswith("\n  ... and 2 more")


def test_skip_that_leaves_one_class_or_no_val_is_an_error(tmp_path):
    make_folder(tmp_path)
    for f in (tmp_path / "train" / "dog").iterdir():
        f.write_text("gone")
    with pytest.raises(ConfigError, match="all 2 training images have the same label 0") as e:
        build_datasets("folder", root=str(tmp_path), image_size=8, bad_images="skip")
    assert e.value.key == "dataset.root"
    make_folder(tmp_path)
    for f in (tmp_path / "val").rglob("*.png"):
        f.write_bytes(b"")
    with pytest.raises(ConfigError, match="validation split holds no images"):
        build_datasets("folder", root=str(tmp_path), image_size=8, bad_images="skip")


def test_tiny_imagenet_skips_a_bad_val_image(tmp_path):
    for w in ("n1", "n2"):
        save_image(tmp_path / "train" / w / "images" / f"{w}.JPEG", (8, 8))
    save_image(tmp_path / "val" / "images" / "v0.JPEG", (8, 8))
    (tmp_path / "val" / "images" / "v1.JPEG").write_bytes(jpeg_bytes()[:300])
    (tmp_path / "val" / "val_annotations.txt").write_text("v0.JPEG\tn1\nv1.JPEG\tn2\n")
    with pytest.raises(ConfigError, match="1 of 4 images") as e:
        build_datasets("tiny_imagenet", root=str(tmp_path), image_size=8)
    assert e.value.key == "dataset.bad_images"
    b = build_datasets("tiny_imagenet", root=str(tmp_path), image_size=8, bad_images="skip")
    assert b.val.samples == [(str(tmp_path / "val" / "images" / "v0.JPEG"), 0)]
    assert b.val.targets == [0]


def test_check_images_false_and_bad_values(tmp_path):
    plant_bad_images(make_folder(tmp_path))
    b = build_datasets("folder", root=str(tmp_path), image_size=8, check_images=False)
    assert (len(b.train), len(b.val)) == (5, 3)     # unchecked: the bad files are still there
    with pytest.raises(ConfigError) as e:
        build_datasets("folder", root=str(tmp_path), bad_images="ignore")
    assert e.value.key == "dataset.bad_images" and e.value.allowed == "error, skip"
    with pytest.raises(ConfigError) as e:
        build_datasets("folder", root=str(tmp_path), check_images="yes")
    assert e.value.key == "dataset.check_images"


# ----------------------------------------------------------------------------- the walk


def test_listing_matches_torchvision_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder

    make_folder(tmp_path, classes=("b", "a", "c"), train=3)
    save_image(tmp_path / "train" / "a" / "sub" / "deep" / "x.JPEG", (8, 8))
    save_image(tmp_path / "train" / "a" / "sub2" / "y.jpeg", (8, 8))
    (tmp_path / "train" / "a" / "readme.txt").write_text("not listed")
    os.symlink(tmp_path / "train" / "c", tmp_path / "train" / "a" / "linked")  # no loop: kept
    b = build_datasets("folder", root=str(tmp_path), image_size=8)
    tv = ImageFolder(str(tmp_path / "train"))
    assert isinstance(b.train, ImageFolder)
    assert b.train.samples == tv.samples and b.train.targets == tv.targets
    assert b.train.imgs == tv.imgs and b.train.imgs is b.train.samples
    assert (b.train.classes, b.train.class_to_idx) == (tv.classes, tv.class_to_idx)
    assert len(b.train) == 3 * 3 + 2 + 3


def test_symlink_loop_is_an_error(tmp_path):
    make_folder(tmp_path)
    loop = tmp_path / "train" / "dog" / "again"
    os.symlink(tmp_path / "train" / "dog", loop)
    with pytest.raises(ConfigError) as e:
        build_datasets("folder", root=str(tmp_path), image_size=8)
    assert e.value.key == "dataset.root"
    assert e.value.message.startswith(f"symlink loop: {loop} -> {tmp_path / 'train' / 'dog'}")
    # a link to a folder above train/ loops one level further down: the link is still named
    loop.unlink()
    up = tmp_path / "val" / "cat" / "up"
    os.symlink(tmp_path, up)
    with pytest.raises(ConfigError, match=f"symlink loop: {up} -> ") as e:
        build_datasets("folder", root=str(tmp_path), image_size=8)
    assert e.value.key == "dataset.root"


def test_unreadable_folder_is_an_error(tmp_path, monkeypatch):
    make_folder(tmp_path)
    locked = tmp_path / "train" / "dog" / "more"
    save_image(locked / "0.png", (8, 8))
    locked.chmod(0)
    if os.geteuid() == 0:   # root reads it anyway: let scandir answer what it answers a user
        real_scandir = os.scandir

        def scandir(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        with pytest.raises(ConfigError) as e:
            build_datasets("folder", root=str(tmp_path), image_size=8)
    finally:
        locked.chmod(0o755)
    assert e.value.key == "dataset.root"
    assert e.value.message == f"cannot read the folder {locked}/: Permission denied"
