"""KD-SVD: self-supervised knowledge distillation using singular value decomposition
(Lee, Kim & Song, ECCV 2018)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _zero_nonfinite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class _SingularValuesAndRightVectors(torch.autograd.Function):
    """s (N, r) and V (N, c, r) of the thin SVD of x (N, m, c), r = min(m, c), differentiated by
    the textbook formula (Townsend 2016, "Differentiating the singular value decomposition") with
    one change, in the spirit of the authors' TensorFlow gradient (SSKD_SVD, which zeroes the
    non-finite 1/(s_i^2 - s_j^2) and adds 1e-8 to s): a pair of singular values equal to float
    precision, or a singular value that is zero to float precision, contributes no gradient
    (the vectors of a degenerate subspace are not defined, so nothing can pull them).
    torch.linalg.svd's own backward gives inf/NaN there, which ReLU maps with fewer positions
    than channels (a 2x2 stage) reach within a few dozen steps: the weights turn NaN."""

    @staticmethod
    def forward(ctx, x):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.transpose(-2, -1)
        ctx.save_for_backward(u, s, v)
        ctx.full_rows = x.shape[-1] <= x.shape[-2]  # V square: no term outside its span
        return s, v

    @staticmethod
    def backward(ctx, grad_s, grad_v):
        u, s, v = ctx.saved_tensors
        # below `tol` a singular value (or a gap) is float rounding: the rank tolerance of
        # torch.linalg.matrix_rank, max(m, c) * eps * s_max
        tol = max(u.shape[-2], v.shape[-2]) * torch.finfo(s.dtype).eps * s[..., :1]
        s_sq = s * s
        gap = s_sq.unsqueeze(-2) - s_sq.unsqueeze(-1)           # gap[i, j] = s_j^2 - s_i^2
        resolved = gap.abs() > 2 * s[..., :1].unsqueeze(-1) * tol.unsqueeze(-1)
        inv_gap = torch.where(resolved, 1 / torch.where(resolved, gap, torch.ones_like(gap)),
                              torch.zeros_like(gap))
        vt_gv = v.transpose(-2, -1) @ grad_v
        inner = s.unsqueeze(-1) * (inv_gap * (vt_gv - vt_gv.transpose(-2, -1)))
        inner = inner + torch.diag_embed(grad_s)
        grad_x = u @ inner @ v.transpose(-2, -1)
        if not ctx.full_rows:
            nonzero = s > tol
            inv_s = torch.where(nonzero, 1 / torch.where(nonzero, s, torch.ones_like(s)),
                                torch.zeros_like(s))
            grad_x = grad_x + (u * inv_s.unsqueeze(-2)) @ (
                grad_v.transpose(-2, -1) - (grad_v.transpose(-2, -1) @ v) @ v.transpose(-2, -1))
        return grad_x


def _top_right_singular(feat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n singular values (N, n) and right singular vectors (N, C, n) of each sample's
    (H*W, C) matrix, i.e. directions in channel space; both L2-normalised along their length,
    with non-finite entries zeroed first (the reference's `removenan`)."""
    x = feat.reshape(feat.shape[0], feat.shape[1], -1).transpose(1, 2)
    s, v = _SingularValuesAndRightVectors.apply(x)
    s, v = _zero_nonfinite(s), _zero_nonfinite(v)
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def _fix_sign(v: torch.Tensor) -> torch.Tensor:
    """Flip each singular vector (column) so its largest-magnitude entry is positive (first one
    on ties). An SVD's vector signs are arbitrary and differ between LAPACK builds and cuSOLVER,
    and the loss depends on the teacher's (the RBF compares entries across stages); this fixes one
    of the choices the reference could make, so a run gives the same loss on every backend."""
    idx = v.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(torch.gather(v, 1, idx))
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


def _align(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector with the largest |cosine| to it, with the
    cosine's sign (the reference's `align_rsv`; exact ties add up, as there): (N, C, k)."""
    cosine = v_s.transpose(1, 2) @ v_t
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ mask.detach()


def kdsvd_loss(feats_student: Sequence[torch.Tensor], feats_teacher: Sequence[torch.Tensor],
               k: int = 1) -> torch.Tensor:
    """Sum over neighbouring stage pairs (l-1, l) of sum (R_s - R_t)^2, divided by the batch size,
    where R[n, c, c', j] = exp(-(v_l[n, c, j] - v_{l-1}[n, c', j])^2 / 8) is the RBF between the
    entries of the j-th singular-value-scaled right singular vectors of two neighbouring stages.

    feats_student / feats_teacher: equally long lists (at least 2) of (N, C_l, H_l, W_l) maps,
    one per stage; at each stage student and teacher need the same C_l (their channel-space
    vectors are compared), spatial sizes may differ. k: teacher vectors kept; the student's top
    k + 3 vectors are computed and each teacher vector is matched to the student vector with the
    largest |cosine|, sign included. Both sides are scaled by the teacher's L2-normalised singular
    values (with k = 1 that is a factor of 1). Non-finite squared differences are zeroed and the
    teacher's RBF is detached, as in the reference.

    Follows RepDistiller distiller_zoo/KDSVD.py, which keeps the original TensorFlow code's
    (N, H*W, C) layout; mdistiller's KDSVD.py views the map as (N, C*H, W) instead, so its vectors
    live over the W columns, which we do not follow. We use H*W where the reference writes H*H
    (the same on its square maps) and fix the arbitrary sign of the teacher's singular vectors
    (`_fix_sign`), and differentiate the SVD without its degenerate pairs, as the authors' TF code
    does (`_SingularValuesAndRightVectors`; the reference's torch.svd backward gives NaN there).
    Float32 with autocast off (SVD has no bf16 kernel and needs the precision).
    Code vs paper: transcribed from the authors' code (k + 3 student candidates, sign matching,
    RBF width 8); the paper's self-supervised multi-task training schedule is not part of the loss.
    """
    if len(feats_student) != len(feats_teacher):
        raise ValueError(f"kdsvd_loss: {len(feats_student)} student features but "
                         f"{len(feats_teacher)} teacher features")
    if len(feats_student) < 2:
        raise ValueError("kdsvd_loss: needs at least 2 stages (it relates neighbouring stages), "
                         f"got {len(feats_student)}")
    if k < 1:
        raise ValueError(f"kdsvd_loss: k must be >= 1, got {k}")
    n = feats_student[0].shape[0]
    for i, (fs, ft) in enumerate(zip(feats_student, feats_teacher)):
        if fs.dim() != 4 or ft.dim() != 4:
            raise ValueError(f"kdsvd_loss expects 4-D (N, C, H, W) features, got shapes "
                             f"{tuple(fs.shape)} and {tuple(ft.shape)} at stage {i}")
        if fs.shape[0] != n or ft.shape[0] != n:
            raise ValueError(f"kdsvd_loss: batch sizes differ at stage {i} "
                             f"({fs.shape[0]} and {ft.shape[0]}, expected {n})")
        if fs.shape[1] != ft.shape[1]:
            raise ValueError(f"kdsvd_loss: channel counts differ at stage {i} ({fs.shape[1]} vs "
                             f"{ft.shape[1]}); KD-SVD compares singular vectors over channels")

    try:
        return _kdsvd(feats_student, feats_teacher, k)
    except torch.linalg.LinAlgError:
        # an SVD of non-finite maps (diverged weights) raises where the other losses give NaN:
        # give NaN too, so trainer.on_nonfinite reports the step. Caught, not checked before,
        # so a healthy step pays no host sync.
        return sum(f.float().sum() for f in feats_student) * float("nan")


def _kdsvd(feats_student: Sequence[torch.Tensor], feats_teacher: Sequence[torch.Tensor],
           k: int) -> torch.Tensor:
    with torch.autocast(device_type=feats_student[0].device.type, enabled=False):
        total = feats_student[0].new_zeros((), dtype=torch.float32)
        prev_s = prev_t = None
        for fs, ft in zip(feats_student, feats_teacher):
            s_t, v_t = _top_right_singular(ft.float(), k)
            _, v_s = _top_right_singular(fs.float(), k + 3)
            v_t = _fix_sign(v_t)
            v_s = _align(v_s, v_t)
            scale = s_t.unsqueeze(1)
            v_t, v_s = v_t * scale, v_s * scale
            if prev_s is not None:
                rbf_s = torch.exp(-(v_s.unsqueeze(2) - prev_s.unsqueeze(1)).pow(2) / 8)
                rbf_t = torch.exp(-(v_t.unsqueeze(2) - prev_t.unsqueeze(1)).pow(2) / 8)
                total = total + _zero_nonfinite((rbf_s - rbf_t.detach()).pow(2)).sum()
            prev_s, prev_t = v_s, v_t
        return total / feats_student[0].shape[0]
