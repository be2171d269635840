"""Image-folder datasets: ImageNet-style class folders and the real Tiny-ImageNet-200 layout.

Before a bundle is returned, its folders are listed by our own walk (symlink loops and unreadable
folders are errors), every image is decoded once (`dataset.bad_images`, `dataset.check_images`;
distill/data/scan.py) and the listing is digested (`data_digest`; distill/data/digest.py).
"""
from __future__ import annotations

import os
from collections.abc import Callable

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from distill.data import DATASETS, DatasetBundle, check_positive
from distill.data.digest import listing_digest
from distill.data.scan import (IMG_EXTENSIONS, check_image_options,  # noqa: F401 (re-export)
                               index_class_folders, screen_images)
from distill.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, imagenet_eval_transform,
                                     imagenet_train_transform, pil_crop_train_transform,
                                     pil_eval_transform)
from distill.errors import ConfigError


def _require_root(root: str | None, name: str, layout: str) -> str:
    if root is None or str(root).strip() == "":
        raise ConfigError(f"no root folder given for {name}", key="dataset.root",
                          hint=f"set dataset.root=/path/to/{name} laid out as {layout}")
    return os.path.abspath(os.path.expanduser(str(root)))


class IndexedImageFolder(ImageFolder):
    """torchvision's ImageFolder over a listing made by `index_class_folders` (which catches
    symlink loops and unreadable folders), so the folder is walked once. Every attribute
    (`samples`, `targets`, `imgs`, `classes`, `class_to_idx`, `loader`) is ImageFolder's own."""

    def __init__(self, root: str, transform: Callable | None, classes: list[str],
                 class_to_idx: dict[str, int], samples: list[tuple[str, int]]):
        self._index = (classes, class_to_idx, samples)
        super().__init__(root, transform=transform)
        del self._index      # not pickled into every DataLoader worker twice

    def find_classes(self, directory):
        return list(self._index[0]), dict(self._index[1])

    def make_dataset(self, directory, class_to_idx, *args, **kwargs):
        return list(self._index[2])


def _image_folder(path: str, transform: Callable, layout: str,
                  class_to_idx: dict[str, int] | None = None) -> IndexedImageFolder:
    """ImageFolder of `path` with our errors; with `class_to_idx` (val/), train's indices."""
    classes, class_to_idx, samples = index_class_folders(path, layout, class_to_idx)
    return IndexedImageFolder(path, transform, classes, class_to_idx, samples)


def _class_names(path: str) -> list[str]:
    """The sorted names of the class folders in `path` (ImageFolder's class order)."""
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=True))
    except OSError as exc:
        raise ConfigError(f"cannot list {path}/: {exc.strerror or exc}", key="dataset.root",
                          hint=f"expected layout: {IMAGENET_LAYOUT}") from None


def _screened(root: str, datasets: list, bad_images: str, check_images: bool,
              extra: bytes = b"") -> str:
    """Screen the splits' images (`dataset.bad_images`) and return the listing digest of what
    is kept: relative path, content sha256 (size, unchecked) and class name of each sample
    (distill/data/digest.py)."""
    sizes = screen_images(datasets, bad_images, decode=check_images)
    prefix = os.path.join(root, "")    # every sample path starts with it: slicing is 25x faster
    return listing_digest(((p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root),
                            sizes[p], ds.classes[t]) for ds in datasets for p, t in ds.samples),
                          extra)


class ImageListDataset(Dataset):
    """(path, label) samples read with PIL -> transform. Used for Tiny-ImageNet's flat val/."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None,
                 classes: list[str]):
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from torchvision.datasets.folder import default_loader

        path, target = self.samples[index]
        image = default_loader(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, target


IMAGENET_LAYOUT = "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG"


# ILSVRC-2012; a subset's class count comes from the classifier in student.safetensors
@DATASETS.register("imagenet", num_classes=1000, image_size=224, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, data_key="dataset.root")
def imagenet(root: str | None = None, image_size: int = 224, bad_images: str = "error",
             check_images: bool = True, *, training_split: bool = True) -> DatasetBundle:
    """ImageNet-style class folders: RandomResizedCrop+flip for train, resize/0.875+center-crop val."""
    return _class_folders(root, image_size, "imagenet", bad_images, check_images,
                          training_split)


# class folders: the size is dataset.image_size, the class count what the folders hold
@DATASETS.register("folder", num_classes=None, image_size=None, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, data_key="dataset.root")
def folder(root: str | None = None, image_size: int = 224, bad_images: str = "error",
           check_images: bool = True, *, training_split: bool = True) -> DatasetBundle:
    """Your own data in class folders (<root>/train/<class>/*, <root>/val/<class>/*), read and
    augmented like ImageNet, so torchvision teachers pretrained on ImageNet see what they expect."""
    return _class_folders(root, image_size, "folder", bad_images, check_images, training_split)


def _class_folders(root: str | None, image_size: int, name: str, bad_images: str,
                   check_images: bool, training_split: bool = True) -> DatasetBundle:
    """`training_split=False` (data-free methods): train/ is only listed for its class
    folders' names (the class indices), no image in it is opened or screened."""
    root = _require_root(root, name, IMAGENET_LAYOUT)
    check_positive(image_size, "dataset.image_size")
    check_image_options(bad_images, check_images)
    if not training_split:
        classes = _class_names(os.path.join(root, "train"))
        val = _image_folder(os.path.join(root, "val"), imagenet_eval_transform(image_size),
                            IMAGENET_LAYOUT, class_to_idx={c: i for i, c in enumerate(classes)})
        return DatasetBundle(train=ImageListDataset([], None, classes), val=val,
                             num_classes=len(classes), image_size=image_size,
                             mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             data_digest=_screened(root, [val], bad_images, check_images))
    train = _image_folder(os.path.join(root, "train"), imagenet_train_transform(image_size),
                          IMAGENET_LAYOUT)
    val = _image_folder(os.path.join(root, "val"), imagenet_eval_transform(image_size),
                        IMAGENET_LAYOUT, class_to_idx=train.class_to_idx)
    digest = _screened(root, [train, val], bad_images, check_images)
    return DatasetBundle(train=train, val=val, num_classes=len(train.classes),
                         image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         data_digest=digest)


TINY_LAYOUT = ("<root>/train/<wnid>/images/*.JPEG, <root>/val/images/*.JPEG with "
               "<root>/val/val_annotations.txt (the tiny-imagenet-200 release)")


def _tiny_val_from_annotations(val_dir: str, ann: str, class_to_idx: dict[str, int],
                               transform: Callable, classes: list[str]) -> ImageListDataset:
    samples: list[tuple[str, int]] = []
    with open(ann, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                raise ConfigError(f"{ann}:{lineno}: expected 'filename<TAB>wnid...', got {line!r}",
                                  key="dataset.root", hint=f"expected layout: {TINY_LAYOUT}")
            fname, wnid = parts[0].strip(), parts[1].strip()
            if wnid not in class_to_idx:
                raise ConfigError(f"{ann}:{lineno}: class {wnid} has no folder in train/",
                                  key="dataset.root", hint=f"expected layout: {TINY_LAYOUT}")
            path = os.path.join(val_dir, "images", fname)
            if not os.path.isfile(path):
                raise ConfigError(f"{ann}:{lineno}: image not found: {path}", key="dataset.root",
                                  hint=f"expected layout: {TINY_LAYOUT}")
            samples.append((path, class_to_idx[wnid]))
    if not samples:
        raise ConfigError(f"{ann} lists no images", key="dataset.root",
                          hint=f"expected layout: {TINY_LAYOUT}")
    return ImageListDataset(samples, transform, classes)


@DATASETS.register("tiny_imagenet", num_classes=200, image_size=64, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, data_key="dataset.root")
def tiny_imagenet(root: str | None = None, image_size: int = 64, bad_images: str = "error",
                  check_images: bool = True) -> DatasetBundle:
    """Tiny-ImageNet-200: train class folders (nested images/), val from val_annotations.txt."""
    root = _require_root(root, "tiny-imagenet-200", TINY_LAYOUT)
    check_positive(image_size, "dataset.image_size")
    check_image_options(bad_images, check_images)
    train_tf = pil_crop_train_transform(image_size, padding=max(1, image_size // 8))
    val_tf = pil_eval_transform(image_size)
    train = _image_folder(os.path.join(root, "train"), train_tf, TINY_LAYOUT)
    val_dir = os.path.join(root, "val")
    ann = os.path.join(val_dir, "val_annotations.txt")
    annotations = b""
    if os.path.isfile(ann):
        val = _tiny_val_from_annotations(val_dir, ann, train.class_to_idx, val_tf, train.classes)
        with open(ann, "rb") as f:
            annotations = f.read()    # its boxes too: part of what the release is
    elif os.path.isdir(val_dir):
        val = _image_folder(val_dir, val_tf, TINY_LAYOUT, class_to_idx=train.class_to_idx)
    else:
        raise ConfigError(f"folder not found: {val_dir}/", key="dataset.root",
                          hint=f"expected layout: {TINY_LAYOUT}")
    digest = _screened(root, [train, val], bad_images, check_images, extra=annotations)
    return DatasetBundle(train=train, val=val, num_classes=len(train.classes),
                         image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         data_digest=digest)
