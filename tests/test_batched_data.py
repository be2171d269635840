"""The in-memory data path: the same recipe as the per-sample pipelines, batch-wise."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from distill.data import TensorImageDataset
from distill.data.batched import BatchTransform, DeviceBatches, batch_transform_of
from distill.data.digits import digits
from distill.data.fake import fake
from distill.data.transforms import imagenet_train_transform, tensor_eval_transform
from distill.engine.sampler import EpochSampler
from distill.engine.loaders import data_path_transforms
from distill.errors import ConfigError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_the_datasets_recipes_are_read_from_their_pipelines():
    bundle = fake()
    train, val = batch_transform_of(bundle.train), batch_transform_of(bundle.val)
    assert (train.padding, train.flip, train.mean) == (4, True, tuple(bundle.mean))
    assert (val.padding, val.flip) == (0, False)
    no_flip = batch_transform_of(digits().train)
    assert no_flip.padding == 4 and not no_flip.flip, "digits are never flipped"
    assert BatchTransform.from_pipeline(imagenet_train_transform(64)) is None


def test_normalisation_equals_the_per_sample_pipeline():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    per_sample = tensor_eval_transform(MEAN, STD)
    batched = BatchTransform.from_pipeline(per_sample)
    expected = torch.stack([per_sample(im) for im in images])
    assert torch.allclose(batched(images), expected, atol=1e-6)


def test_each_image_is_a_zero_padded_crop_possibly_flipped():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (400, 3, 6, 6), dtype=torch.uint8)   # no zeros: pads show
    transform = BatchTransform((0.0,) * 3, (1 / 255,) * 3, padding=2, flip=True)
    out = transform(images, torch.Generator().manual_seed(1)).round().to(torch.uint8)
    padded = F.pad(images, (2, 2, 2, 2))
    offsets, flips = set(), 0
    for i in range(len(images)):
        found = [(top, left, flip) for top in range(5) for left in range(5) for flip in (0, 1)
                 if torch.equal(out[i], (padded[i, :, top:top + 6, left:left + 6].flip(-1) if flip
                                         else padded[i, :, top:top + 6, left:left + 6]))]
        assert found, f"image {i} is no crop of its padded original"
        offsets.add(found[0][:2])
        flips += found[0][2]
    assert len(offsets) == 25, "every offset of the 5x5 range occurs"
    assert 0.4 < flips / len(images) < 0.6


def test_batches_depend_on_seed_epoch_and_position_only():
    data = fake(train_size=100)
    transform = batch_transform_of(data.train)

    def batches(epoch, first_batch=0, seed=0):
        sampler = EpochSampler(100, seed, global_batch=32)
        loader = DeviceBatches(data.train, transform, sampler, batch_size=32,
                               device=torch.device("cpu"), seed=seed)
        sampler.set_epoch(epoch, first_batch)
        loader.set_epoch(epoch, first_batch)
        return list(loader)

    full = batches(epoch=3)
    assert [len(y) for _, y in full] == [32, 32, 32, 4]
    again, resumed = batches(epoch=3), batches(epoch=3, first_batch=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, again))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], resumed))
    assert not torch.equal(full[0][0], batches(epoch=4)[0][0])
    assert not torch.equal(full[0][0], batches(epoch=3, seed=1)[0][0])


def test_batched_and_per_sample_paths_see_the_same_images_in_the_same_order():
    """Without augmentation both paths give identical batches (only the random crops differ)."""
    data = fake(train_size=70)
    plain = TensorImageDataset(data.train.images, data.train.labels, data.val.transform)
    sampler = EpochSampler(70, 5, global_batch=16)
    device_batches = DeviceBatches(plain, batch_transform_of(plain), sampler, batch_size=16,
                                   device=torch.device("cpu"))
    loader = DataLoader(plain, batch_size=16, sampler=sampler)
    for (a, ya), (b, yb) in zip(device_batches, loader, strict=True):
        assert torch.equal(ya, yb) and torch.allclose(a, b, atol=1e-6)


def test_data_path_choice():
    data = fake()
    assert data_path_transforms(data, "auto") is not None
    assert data_path_transforms(data, "loader") is None
    untransformed = dataclasses.replace(data, train=TensorImageDataset(data.train.images,
                                                                       data.train.labels))
    assert data_path_transforms(untransformed, "auto") is None
    with pytest.raises(ConfigError) as err:
        data_path_transforms(untransformed, "memory")
    assert err.value.key == "trainer.data_path"


def test_any_seed_works():
    """Batch seeds mix (seed, epoch, batch, rank); they must stay in int64 for any run seed."""
    data = fake(train_size=40)
    sampler = EpochSampler(40, 20240101, global_batch=16)
    loader = DeviceBatches(data.train, batch_transform_of(data.train), sampler, batch_size=16,
                           device=torch.device("cpu"), seed=20240101)
    loader.set_epoch(7, 0)
    assert [len(y) for _, y in loader] == [16, 16, 8]
