"""Pure loss functions: tensors in, a scalar tensor out. No state, no config.

Each reduces to a batch mean, matching the reference code the published tables came from.
`perturb_logits` (the noisy-teacher perturbation) is the one non-loss here: tensor in, tensor out.
"""
from distill.losses.at import at_loss, attention_map
from distill.losses.dkd import dkd_loss
from distill.losses.fitnet import fitnet_loss
from distill.losses.kd import kd_loss
from distill.losses.noise import perturb_logits
from distill.losses.rkd import rkd_loss

__all__ = ["at_loss", "attention_map", "dkd_loss", "fitnet_loss", "kd_loss", "perturb_logits",
           "rkd_loss"]
