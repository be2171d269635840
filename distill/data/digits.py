"""scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 10 classes), served CIFAR-sized.

No download: the data ships inside scikit-learn. Images are upsampled 8x8 -> 32x32 (bilinear),
scaled 0..16 -> 0..255, and repeated to 3 channels, so every CIFAR model runs on them unchanged.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from distill.data import (DATASETS, DatasetBundle, check_split_options, crop_recipe,
                          tensor_bundle)

# Per-channel mean/std (identical for the 3 channels) of the default train split (split_seed=0,
# test_fraction=0.2) after the uint8 conversion below, pixels scaled to [0,1]. Computed once with
#   x = digits_images(split_seed=0, test_fraction=0.2)[0].float() / 255
#   x.mean().item(), x.std().item()
# and checked by tests/test_data.py::test_digits_stats_match_hardcoded.
DIGITS_MEAN = (0.3054, 0.3054, 0.3054)
DIGITS_STD = (0.3237, 0.3237, 0.3237)


def digits_images(split_seed: int = 0, test_fraction: float = 0.2
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train uint8 [N,3,32,32], train labels, test uint8, test labels); stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32))[:, None] * (255.0 / 16.0)  # [N,1,8,8]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1).contiguous()
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction,
                                           stratify=digits.target, random_state=split_seed)
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@DATASETS.register("digits", num_classes=10, image_size=32, mean=DIGITS_MEAN, std=DIGITS_STD,
                   padding=4, flip=False)
def digits(augment: bool = True, test_fraction: float = 0.2, split_seed: int = 0) -> DatasetBundle:
    """Real handwritten digits, 1437/360 (default split), 10 classes, 3x32x32."""
    test_fraction = check_split_options(test_fraction, split_seed, "1437/360")
    xtr, ytr, xte, yte = digits_images(split_seed, test_fraction)
    # Crop only, NO horizontal flip: a mirrored digit is a different symbol (or none).
    return tensor_bundle((xtr, ytr), (xte, yte), num_classes=10, mean=DIGITS_MEAN,
                         std=DIGITS_STD, augment=augment, **crop_recipe("digits"))
