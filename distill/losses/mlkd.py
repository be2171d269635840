"""MLKD: multi-level logit distillation (Jin, Wang & Lin, CVPR 2023)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.kd import kd_loss


def class_correlation_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """Class level: sum (G_t - G_s)^2 / C with G = p^T p (C x C), p = softmax(z / T) (no T^2),
    the reference's `cc_loss`. Float32."""
    p_s = F.softmax(logits_student.float() / temperature, dim=1)
    p_t = F.softmax(logits_teacher.float() / temperature, dim=1)
    return (p_t.t() @ p_t - p_s.t() @ p_s).pow(2).sum() / p_s.shape[1]


def batch_correlation_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """Batch level: sum (A_t - A_s)^2 / B with A = p p^T (B x B), p = softmax(z / T) (no T^2),
    the reference's `bc_loss`. Float32."""
    p_s = F.softmax(logits_student.float() / temperature, dim=1)
    p_t = F.softmax(logits_teacher.float() / temperature, dim=1)
    return (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum() / p_s.shape[0]


def fraction_at_most_median(values: torch.Tensor) -> torch.Tensor:
    """The share of `values` at or below their median (numpy's linear-interpolation 50th
    percentile): what the reference's confidence masks weigh a term by, see `mlkd_losses`."""
    return (values <= torch.quantile(values.float(), 0.5)).float().mean()


def mlkd_temperatures(temperature: float) -> tuple[float, ...]:
    """The reference's temperatures: its base T, then 3, 5, 2, 6 ({2, ..., 6} at T = 4)."""
    return (temperature, 3.0, 5.0, 2.0, 6.0)


def mlkd_losses(logits_student_weak: torch.Tensor, logits_student_strong: torch.Tensor,
                logits_teacher_weak: torch.Tensor, logits_teacher_strong: torch.Tensor,
                temperature: float = 4.0, standardize: bool = False) -> dict[str, torch.Tensor]:
    """MLKD's three distillation terms, unweighted, as the authors' code (KD_ours.py) computes
    them; the caller multiplies each by the KD weight (0.9 on CIFAR-100).

    With the temperatures S = `mlkd_temperatures(temperature)`, KD_t(s, t) = `kd_loss` at t
    (logit-standardized first when `standardize`, as the logit-standardization code does for
    MLKD, the class and batch terms left on raw logits), f_s the share of samples whose weak-view
    teacher confidence (max softmax) is at or below the batch median, f_c the share of classes
    whose summed weak-view teacher probability is at or below the median:
        kd = f_s sum_S KD(s_w, t_w) + sum_{S[:3]} KD(s_s, t_s) + sum_{S[3:]} KD(s_w, t_w)
        cc = f_c sum_S class_correlation(s_w, t_w)
        bc = f_s sum_S batch_correlation(s_w, t_w)
    Code vs paper: the masks act as these scalar shares (each term is reduced to a scalar before
    the per-sample mask multiplies it), the strong-view KD at T 2 and 6 reads the weak logits,
    and the strong-view class and batch terms are computed there but never added: all followed.
    """
    s_w, s_s, t_w, t_s = (z.float() for z in (logits_student_weak, logits_student_strong,
                                              logits_teacher_weak, logits_teacher_strong))
    probs = F.softmax(t_w, dim=1)
    sample_share = fraction_at_most_median(probs.max(dim=1).values)
    class_share = fraction_at_most_median(probs.sum(dim=0))
    temperatures = mlkd_temperatures(temperature)
    kd_weak = sum(kd_loss(s_w, t_w, t, standardize=standardize) for t in temperatures)
    kd_strong = (sum(kd_loss(s_s, t_s, t, standardize=standardize) for t in temperatures[:3])
                 + sum(kd_loss(s_w, t_w, t, standardize=standardize) for t in temperatures[3:]))
    return {
        "kd": sample_share * kd_weak + kd_strong,
        "cc": class_share * sum(class_correlation_loss(s_w, t_w, t) for t in temperatures),
        "bc": sample_share * sum(batch_correlation_loss(s_w, t_w, t) for t in temperatures),
    }
