"""Pure loss functions: tensors in, a scalar tensor out. No state, no config.

Each reduces to a batch mean, matching the reference code the published tables came from;
the batch-relational ones (rkd, sp, pkt, cc) average over pairs of samples within the batch.
Two non-losses live here too, tensors in and out: `perturb_logits` (the noisy-teacher
perturbation) and `ensemble_probs` (several teachers' soft targets as one distribution).
"""
from distill.losses.ab import ab_loss
from distill.losses.at import at_loss, attention_map
from distill.losses.cc import cc_loss
from distill.losses.crd import crd_nce_loss
from distill.losses.dist import dist_loss
from distill.losses.dkd import dkd_loss
from distill.losses.ensemble import ENSEMBLE_MODES, ensemble_log_probs, ensemble_probs
from distill.losses.fitnet import fitnet_loss
from distill.losses.fsp import fsp_loss, fsp_matrix
from distill.losses.ft import ft_loss
from distill.losses.kd import (kd_loss, soft_cross_entropy, soft_target_loss,
                               standardize_logits)
from distill.losses.kdsvd import kdsvd_loss
from distill.losses.noise import perturb_logits
from distill.losses.mlkd import (batch_correlation_loss, class_correlation_loss,
                                 mlkd_losses)
from distill.losses.nst import nst_loss
from distill.losses.ofd import ofd_loss, ofd_margin
from distill.losses.pkt import pkt_loss
from distill.losses.reviewkd import hcl_loss
from distill.losses.rkd import rkd_loss
from distill.losses.sobolev import sobolev_loss
from distill.losses.sp import sp_loss
from distill.losses.vid import vid_log_scale_init, vid_loss

__all__ = ["ENSEMBLE_MODES", "at_loss", "attention_map", "cc_loss", "dkd_loss",
           "ensemble_log_probs", "ensemble_probs", "fitnet_loss", "kd_loss", "kdsvd_loss",
           "nst_loss", "perturb_logits", "pkt_loss", "rkd_loss", "soft_target_loss", "sp_loss"]
__all__ += ["ab_loss", "fsp_loss", "fsp_matrix", "ft_loss", "vid_log_scale_init", "vid_loss"]
__all__ += ["crd_nce_loss", "dist_loss", "standardize_logits"]
__all__ += ["hcl_loss", "ofd_loss", "ofd_margin"]
__all__ += ["batch_correlation_loss", "class_correlation_loss", "mlkd_losses"]
__all__ += ["soft_cross_entropy", "sobolev_loss"]
