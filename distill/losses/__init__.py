"""Pure loss functions: tensors in, a scalar tensor out. No state, no config.

Each reduces to a batch mean, matching the reference code the published tables came from.
Two non-losses live here too, tensors in and out: `perturb_logits` (the noisy-teacher
perturbation) and `ensemble_probs` (several teachers' soft targets as one distribution).
"""
from distill.losses.at import at_loss, attention_map
from distill.losses.dkd import dkd_loss
from distill.losses.ensemble import ENSEMBLE_MODES, ensemble_log_probs, ensemble_probs
from distill.losses.fitnet import fitnet_loss
from distill.losses.kd import kd_loss, soft_target_loss
from distill.losses.noise import perturb_logits
from distill.losses.rkd import rkd_loss

__all__ = ["ENSEMBLE_MODES", "at_loss", "attention_map", "dkd_loss", "ensemble_log_probs",
           "ensemble_probs", "fitnet_loss", "kd_loss", "perturb_logits", "rkd_loss",
           "soft_target_loss"]
