"""The training and validation batches of one rank: the in-memory path (uint8 tensors batched on
the device, distill.data.batched) when the dataset allows it, else DataLoaders.

Under DDP each rank takes its slice of every global batch (EpochSampler) and evaluates every
world_size-th validation image; the counts are summed over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from distill.data import DatasetBundle
from distill.data.augment import AUGMENTATIONS
from distill.data.batched import (BatchTransform, DeviceBatches, ViewTransform,
                                  batch_transform_of, tensor_source)
from distill.engine.sampler import EpochSampler, epoch_seed
from distill.errors import ConfigError



def data_path_transforms(data: DatasetBundle, data_path: str
                         ) -> tuple[BatchTransform, BatchTransform] | None:
    """The (train, val) batch transforms of the in-memory path, or None for the DataLoader path.
    `auto` takes the in-memory path whenever both splits allow it; `memory` insists."""
    if data_path == "loader":
        return None
    train_tf, val_tf = batch_transform_of(data.train), batch_transform_of(data.val)
    if train_tf is None or val_tf is None:
        if data_path == "memory":
            raise ConfigError("this dataset is not held in memory as uint8 tensors with the "
                              "crop/flip/normalise recipe", key="trainer.data_path",
                              allowed="auto or loader for this dataset")
        return None
    return train_tf, val_tf


class SingleView:
    """The view replay of a training set without augmentation (token datasets): every item
    is seen as it is, view 0."""

    def replay_view(self, rng_state: torch.Tensor) -> int:
        return 0


class IndexedDataset(Dataset):
    """`(inputs, label, {"index": i, <view>: ...})` for item i of `dataset`: the training
    batches' form on the DataLoader path, as DeviceBatches(with_indices=True) gives it on the
    in-memory one. The trainer hands the indices to the distiller (StepContext.indices; CRD's
    memory bank) and the views (StepContext.views; MLKD's strong view). A view is made from the
    item's uint8 image (`images`, in item order) with the process's RNG, as the pipeline's own
    per-item randomness is. With `augmentation` (the batch form of the item pipeline), each
    item also carries the id of the view its pipeline drew ("augmentation", as on the in-memory
    path), replayed from the RNG state the pipeline started from: the random stream is the
    same with it as without."""

    def __init__(self, dataset: Dataset, images: torch.Tensor | None = None,
                 views: dict[str, ViewTransform] | None = None,
                 augmentation: BatchTransform | None = None):
        self.dataset, self.images, self.views = dataset, images, dict(views or {})
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        state = torch.get_rng_state() if self.augmentation is not None else None
        inputs, label = self.dataset[index]
        extras = {"index": index}
        if state is not None:
            extras["augmentation"] = self.augmentation.replay_view(state)
        views = {name: view(self.images[index:index + 1])[0] for name, view in self.views.items()}
        return inputs, label, {**extras, **views}


def view_transforms(data: DatasetBundle, views: dict[str, str]) -> dict[str, ViewTransform]:
    """The training views a method asks for ({name: augmentation}), built on the training
    pipeline's crop/flip/normalisation; a ConfigError when that pipeline is not the tensor one."""
    source = tensor_source(data.train) if views else None
    if views and source is None:
        raise ConfigError(f"this method trains on extra views of each image ({', '.join(views)}), "
                          "made from uint8 image tensors with the crop/flip/normalise recipe; "
                          "this dataset is read another way", key="dataset",
                          allowed="cifar10, cifar100, digits, mnist5k or fake")
    return {name: ViewTransform(source[1], AUGMENTATIONS.get(augment, key=f"view {name}"))
            for name, augment in views.items()}


@dataclass
class Loaders:
    train: DeviceBatches | DataLoader
    val: DeviceBatches | DataLoader
    sampler: EpochSampler
    # Each DataLoader iterator draws a worker base seed from its generator (the global RNG if it
    # has none). An own generator keeps the global RNG, which per-sample augmentation uses and
    # checkpoints carry, independent of when loaders are iterated.
    worker_seeds: torch.Generator
    seed: int
    rank: int

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps

    def start_epoch(self, epoch: int, first_batch: int) -> None:
        """Position both paths at `first_batch` of `epoch` (a function of seed and epoch only)."""
        self.sampler.set_epoch(epoch, first_batch)
        if isinstance(self.train, DeviceBatches):
            self.train.set_epoch(epoch, first_batch)
        self.worker_seeds.manual_seed(   # rank 0: the single-process seed
            epoch_seed(self.seed + 7919 * self.rank, epoch))


def build_loaders(data: DatasetBundle, *, data_path: str, batch_size: int, eval_batch_size: int,
                  num_workers: int, device: torch.device, seed: int, rank: int,
                  world_size: int, views: dict[str, str] | None = None,
                  sample_weights: torch.Tensor | None = None,
                  augmentation_ids: bool = False, min_batch: int = 1) -> Loaders:
    """`views`: extra views of each training image by name -> registered augmentation
    (distill.method.TrainsOnViews), given in each training batch's dict next to "index";
    `sample_weights`: how often each item is drawn (distill.method.WeightedSampling);
    `augmentation_ids`: the DataLoader path's batches carry each image's view id too (the
    in-memory path's always do), for the teacher-output cache; `min_batch`: an epoch's last
    batch with fewer items per rank is dropped (Traits.min_batch)."""
    transforms = view_transforms(data, views or {})
    sampler = EpochSampler(len(data.train), seed, global_batch=batch_size, rank=rank,
                           world_size=world_size, weights=sample_weights, min_batch=min_batch)
    worker_seeds = torch.Generator()
    per_rank = batch_size // world_size
    val_indices = list(range(rank, len(data.val), world_size))
    on_device = data_path_transforms(data, data_path)
    if on_device is not None:
        train_tf, val_tf = on_device
        train = DeviceBatches(data.train, train_tf, sampler, batch_size=per_rank, device=device,
                              seed=seed, rank=rank, with_indices=True, views=transforms)
        val = DeviceBatches(data.val, val_tf, val_indices, batch_size=eval_batch_size,
                            device=device)
    else:
        pin = device.type == "cuda"
        images = tensor_source(data.train)[0] if transforms else None
        replayed = None
        if augmentation_ids:   # the view each item's pipeline drew (tokens: the one view)
            source = tensor_source(data.train)
            replayed = source[1] if source is not None else SingleView()
        train = DataLoader(IndexedDataset(data.train, images, transforms, replayed),
                           batch_size=per_rank,
                           sampler=sampler,
                           num_workers=num_workers, generator=worker_seeds, drop_last=False,
                           pin_memory=pin)
        val = DataLoader(data.val, batch_size=eval_batch_size, sampler=val_indices,
                         num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                         pin_memory=pin)
    return Loaders(train, val, sampler, worker_seeds, seed, rank)
