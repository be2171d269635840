"""Image-folder datasets: ImageNet-style class folders and the real Tiny-ImageNet-200 layout."""
from __future__ import annotations

import os
from collections.abc import Callable

from torch.utils.data import Dataset

from distill.data import DATASETS, DatasetBundle, check_positive
from distill.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, imagenet_eval_transform,
                                     imagenet_train_transform, pil_crop_train_transform,
                                     pil_eval_transform)
from distill.errors import ConfigError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _require_root(root: str | None, name: str, layout: str) -> str:
    if root is None or str(root).strip() == "":
        raise ConfigError(f"no root folder given for {name}", key="dataset.root",
                          hint=f"set dataset.root=/path/to/{name} laid out as {layout}")
    return os.path.abspath(os.path.expanduser(str(root)))


def _image_folder(path: str, transform: Callable, layout: str,
                  class_to_idx: dict[str, int] | None = None) -> Dataset:
    """torchvision ImageFolder with our errors for a missing/empty folder."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(path):
        raise ConfigError(f"folder not found: {path}/", key="dataset.root",
                          hint=f"expected layout: {layout}")
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not classes:
        raise ConfigError(f"no class folders in {path}/", key="dataset.root",
                          hint=f"expected layout: {layout}")
    if class_to_idx is not None:
        unknown = sorted(set(classes) - set(class_to_idx))
        if unknown:
            raise ConfigError(f"{path}/ has class folders not present in train/: "
                              f"{', '.join(unknown[:5])}", key="dataset.root",
                              hint="train/ and val/ must hold the same class folders")
    try:
        ds = ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:  # a class folder without images
        raise ConfigError(f"cannot index {path}/: {e}", key="dataset.root",
                          hint=f"expected layout: {layout} with image files "
                               f"({', '.join(IMG_EXTENSIONS)})") from None
    if class_to_idx is not None and ds.class_to_idx != class_to_idx:
        # val has a subset of the classes: relabel with the train indices
        ds.samples = [(p, class_to_idx[ds.classes[i]]) for p, i in ds.samples]
        ds.targets = [i for _, i in ds.samples]
        ds.imgs = ds.samples
        ds.classes, ds.class_to_idx = sorted(class_to_idx, key=class_to_idx.get), dict(class_to_idx)
    return ds


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
                   std=IMAGENET_STD)
def imagenet(root: str | None = None, image_size: int = 224) -> DatasetBundle:
    """ImageNet-style class folders: RandomResizedCrop+flip for train, resize/0.875+center-crop val."""
    return _class_folders(root, image_size, "imagenet")


# class folders: the size is dataset.image_size, the class count what the folders hold
@DATASETS.register("folder", num_classes=None, image_size=None, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD)
def folder(root: str | None = None, image_size: int = 224) -> DatasetBundle:
    """Your own data in class folders (<root>/train/<class>/*, <root>/val/<class>/*), read and
    augmented like ImageNet, so torchvision teachers pretrained on ImageNet see what they expect."""
    return _class_folders(root, image_size, "folder")


def _class_folders(root: str | None, image_size: int, name: str) -> DatasetBundle:
    root = _require_root(root, name, IMAGENET_LAYOUT)
    check_positive(image_size, "dataset.image_size")
    train = _image_folder(os.path.join(root, "train"), imagenet_train_transform(image_size),
                          IMAGENET_LAYOUT)
    val = _image_folder(os.path.join(root, "val"), imagenet_eval_transform(image_size),
                        IMAGENET_LAYOUT, class_to_idx=train.class_to_idx)
    return DatasetBundle(train=train, val=val, num_classes=len(train.classes),
                         image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


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
                   std=IMAGENET_STD)
def tiny_imagenet(root: str | None = None, image_size: int = 64) -> DatasetBundle:
    """Tiny-ImageNet-200: train class folders (nested images/), val from val_annotations.txt."""
    root = _require_root(root, "tiny-imagenet-200", TINY_LAYOUT)
    check_positive(image_size, "dataset.image_size")
    train_tf = pil_crop_train_transform(image_size, padding=max(1, image_size // 8))
    val_tf = pil_eval_transform(image_size)
    train = _image_folder(os.path.join(root, "train"), train_tf, TINY_LAYOUT)
    val_dir = os.path.join(root, "val")
    ann = os.path.join(val_dir, "val_annotations.txt")
    if os.path.isfile(ann):
        val = _tiny_val_from_annotations(val_dir, ann, train.class_to_idx, val_tf, train.classes)
    elif os.path.isdir(val_dir):
        val = _image_folder(val_dir, val_tf, TINY_LAYOUT, class_to_idx=train.class_to_idx)
    else:
        raise ConfigError(f"folder not found: {val_dir}/", key="dataset.root",
                          hint=f"expected layout: {TINY_LAYOUT}")
    return DatasetBundle(train=train, val=val, num_classes=len(train.classes),
                         image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
