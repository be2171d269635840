"""Pure loss functions: tensors in, a scalar tensor out. No state, no config.

Each reduces to a batch mean, matching the reference code the published tables came from.
"""
from distill.losses.dkd import dkd_loss
from distill.losses.kd import kd_loss

__all__ = ["dkd_loss", "kd_loss"]
