"""CRD (Tian, Krishnan & Isola, ICLR 2020) as RepDistiller runs it on CIFAR-100 (`--distill crd
-r 1 -a 0 -b 0.8`; CRD+KD is `-a 1`, here `kd_weight: 1`): CE 1 plus 0.8 x the two NCE terms
(`crd_nce_loss`) of the pooled embeddings, each mapped by its own trained head (linear, then
L2-normalised, 128-d) and scored against a momentum memory bank of the other model's embeddings
of the whole training set, with K = 16384 negatives per sample drawn from the other classes.

Code vs paper: transcribed from the code (the paper gives no normaliser Z: the code estimates
it once, on the first batch; negatives only from other classes, drawn without replacement;
both anchors' NCE terms summed; the scores use the bank before this batch's update).
The reference draws negatives with numpy in DataLoader workers; here they are drawn on the
device from a generator seeded by (run seed, step), for the global batch, so a resumed run and
any number of DDP ranks draw the same ones.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from distill import distributed as dist_utils
from distill.distillers.feature_pairs import FeatureDistiller, layer_shapes
from distill.errors import ConfigError
from distill.losses import crd_nce_loss, kd_loss
from distill.method import DISTILLERS, BuildInfo, SelfSyncedBuffers, StepContext
from distill.method.checks import OVERFLOW, require

# rows of the random keys drawn at once when sampling negatives without replacement (bounds the
# memory of the (rows, pool) key matrix: about 64 MB of float32)
_KEY_ELEMENTS = 1 << 24


class Embed(nn.Module):
    """RepDistiller's Embed: flatten, a linear layer (with bias), then x / ||x||_2 (no eps)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.flatten(1))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class ContrastMemory(nn.Module):
    """The two memory banks of CRD (one embedding per training sample and model), their
    one-shot normalisers Z, and the label-aware negative sampler.

    `bank_student` holds student embeddings, `bank_teacher` teacher ones; both start uniform in
    +-1/sqrt(d/3) (so rows have unit expected norm) and are updated with momentum after each
    batch has been scored, rows renormalised. The banks and Z are buffers, so checkpoints hold
    them; the label tables are derived from the training labels and are not saved.
    """

    def __init__(self, feat_dim: int, labels: torch.Tensor, num_negatives: int,
                 temperature: float, momentum: float, seed: int, replace: bool):
        super().__init__()
        self.num_negatives, self.temperature, self.momentum = num_negatives, temperature, momentum
        self.replace, self.seed = replace, seed
        n = labels.shape[0]
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        generator = torch.Generator().manual_seed(seed)   # equal on every rank
        self.register_buffer("bank_student", torch.rand(n, feat_dim, generator=generator) * 2 * stdv - stdv)
        self.register_buffer("bank_teacher", torch.rand(n, feat_dim, generator=generator) * 2 * stdv - stdv)
        # Z of the student-anchor and the teacher-anchor scores; negative: not estimated yet
        self.register_buffer("normalizers", torch.full((2,), -1.0))
        counts = torch.bincount(labels)
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)
        # the widest other-class pool (that of the smallest class): the random keys' width
        self.widest_pool = n - int(counts[counts > 0].min())

    @property
    def size(self) -> int:
        return self.labels.shape[0]

    def sample_negatives(self, anchors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(len(anchors), K) training-set indices of samples of other classes than each
        anchor's, uniformly, without replacement unless `replace`."""
        cls = self.labels[anchors]
        pool = self.size - self.class_count[cls]                  # other-class samples per row
        k = self.num_negatives
        if self.replace:
            u = torch.rand(len(anchors), k, generator=generator, device=anchors.device,
                           dtype=torch.float64)
            pos = (u * pool[:, None]).long().minimum(pool[:, None] - 1)
        else:   # the first K of a random order: the K largest of uniform random keys
            width = self.widest_pool   # known at build time: no device round trip per step
            rows = max(1, _KEY_ELEMENTS // width)
            pos = torch.cat([self._top_keys(pool[i:i + rows], width, k, generator)
                             for i in range(0, len(anchors), rows)])
        # positions in the other-class part of the by-class order -> positions in that order
        start, count = self.class_start[cls][:, None], self.class_count[cls][:, None]
        return self.by_class[pos + (pos >= start) * count]

    @staticmethod
    def _top_keys(pool: torch.Tensor, width: int, k: int, generator: torch.Generator) -> torch.Tensor:
        keys = torch.rand(len(pool), width, generator=generator, device=pool.device)
        keys = keys.masked_fill(torch.arange(width, device=pool.device) >= pool[:, None], -1.0)
        return keys.topk(k, dim=1).indices

    def forward(self, embed_student: torch.Tensor, embed_teacher: torch.Tensor,
                indices: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, K+1, 1) of the student embeddings against the teacher bank and of the
        teacher embeddings against the student bank, positive first; then the banks take this
        batch. Under DDP every rank draws the global batch's negatives and updates the banks
        with every rank's embeddings, so the banks stay equal on all ranks. Float32 (scores
        reach exp(1/0.07), beyond float16)."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self._scores(embed_student.float(), embed_teacher.float(), indices, step)

    def _scores(self, embed_student, embed_teacher, indices, step):
        global_indices, sizes = dist_utils.all_gather_rows(indices)
        offset = sum(sizes[:dist_utils.rank()])
        generator = torch.Generator(device=indices.device)
        generator.manual_seed((self.seed * 1_000_003 + step) % (2**63 - 1))
        negatives = self.sample_negatives(global_indices, generator)
        contrast = torch.cat([global_indices[:, None], negatives], dim=1)
        contrast = contrast[offset:offset + indices.shape[0]]
        out_student = torch.exp(_dot_with_rows(self.bank_teacher, embed_student, contrast)
                                / self.temperature)[:, :, None]
        out_teacher = torch.exp(_dot_with_rows(self.bank_student, embed_teacher, contrast)
                                / self.temperature)[:, :, None]
        # Z = mean score of the first batch x training-set size, kept from then on. Estimated on
        # every batch and selected without a branch, so no step waits for the device to answer.
        sums = torch.stack([out_student.detach().sum(), out_teacher.detach().sum()])
        count = torch.tensor([float(out_student.numel())], device=indices.device)
        estimate = torch.cat([sums, count])
        dist_utils.all_reduce_sum(estimate)
        self.normalizers.copy_(torch.where(self.normalizers < 0,
                                           estimate[:2] / estimate[2] * self.size, self.normalizers))
        out_student = out_student / self.normalizers[0]
        out_teacher = out_teacher / self.normalizers[1]
        with torch.no_grad():
            for bank, embedding in ((self.bank_student, embed_student),
                                    (self.bank_teacher, embed_teacher)):
                rows, _ = dist_utils.all_gather_rows(embedding.detach())
                mixed = bank[global_indices] * self.momentum + rows * (1 - self.momentum)
                bank.index_copy_(0, global_indices,
                                 mixed / mixed.pow(2).sum(1, keepdim=True).pow(0.5))
        return out_student, out_teacher


def _dot_with_rows(bank: torch.Tensor, embedding: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, R) dot products <bank[rows[b, r]], embedding[b]>, what the reference gets from a
    (B, R, d) gather of bank rows and a batched product. Here every bank row meets every
    embedding once, bank @ embedding^T (N x B), and the R wanted products are picked from that:
    cheaper whenever the bank has fewer rows than R * d (CIFAR-100: 50,000 against 16385 * 128),
    and it never holds the B x R x d gathered copy (537 MB per bank on CIFAR-100 at batch 64).
    The product keeps a copy of the bank for its backward (N x d, 26 MB on CIFAR-100): the bank
    itself takes this batch's update before the backward runs."""
    return torch.gather((bank.clone() @ embedding.t()).t(), 1, rows)


@DISTILLERS.register("crd",
                     family="features",
                     summary=("Contrastive: an image's student embedding near the teacher's, far "
                              "from other images'"),
                     published_as=("CRD", "CRD+KD [S]"),
                     paper=('Contrastive Representation Distillation, Tian, Krishnan & Isola ICLR '
                            '2020 (code HobbitLong/RepDistiller `crd/`)'),
                     recipe=('CE 1, 0.8 x the NCE terms of both anchors: the pooled embeddings '
                             'mapped by trained heads (linear + L2 norm, `feat_dim` 128) and '
                             'scored (`nce_t` 0.07) against momentum (`nce_m` 0.5) memory banks of'
                             ' the whole training set, K = 16384 negatives per sample from other '
                             'classes (`nce_k`; at most the training set minus its largest class);'
                             ' CRD+KD: `kd_weight: 1` (T 4)'),
                     table_row=13,
                     edges={"nce_t": {"huge": OVERFLOW},
                            "nce_m": {"0": "CRD's memory bank takes each new embedding as it is"}})
class CRD(SelfSyncedBuffers, FeatureDistiller):
    def __init__(self, student, teacher, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 crd_weight: float = 0.8, temperature: float = 4.0, feat_dim: int = 128,
                 nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5,
                 nce_replace: bool = False, student_layer: str | None = None,
                 teacher_layer: str | None = None, *, info: BuildInfo):
        student_layer, teacher_layer = self.layer_pair(student_layer, teacher_layer, info,
                                                       "pooled")
        super().__init__(student, teacher, [student_layer], [teacher_layer])
        labels = info.train_labels
        if labels is None:
            raise ConfigError("CRD keeps a memory bank over the training set and draws negatives "
                              "by label, but this dataset does not expose its labels",
                              key="distiller", allowed="a dataset with labels (TensorImageDataset "
                              "labels or ImageFolder targets)")
        labels = torch.as_tensor(labels, dtype=torch.long)
        smallest_pool = int(labels.shape[0] - torch.bincount(labels).max())
        if not nce_replace and nce_k > smallest_pool:
            raise ConfigError(
                f"CRD draws {nce_k} negatives per sample without replacement from the other "
                f"classes, but the largest class leaves only {smallest_pool} of the "
                f"{labels.shape[0]} training samples", key="distiller.nce_k",
                allowed=f"at most {smallest_pool} here (16384 is CIFAR-100's), or "
                        "distiller.nce_replace=true")
        widths = [int(shape[1:].numel()) for shape in
                  (*layer_shapes(student, [student_layer], info),
                   *layer_shapes(teacher, [teacher_layer], info))]
        self.add_trained("embed_student", Embed(widths[0], feat_dim))
        self.add_trained("embed_teacher", Embed(widths[1], feat_dim))
        self.add_trained("memory", ContrastMemory(feat_dim, labels, nce_k, nce_t, nce_m,
                                                  info.seed, nce_replace))
        self.ce_weight, self.kd_weight, self.crd_weight = ce_weight, kd_weight, crd_weight
        self.temperature = temperature

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", kd_weight=">=0", crd_weight=">=0", temperature=">0",
                feat_dim="int>0", nce_k="int>0", nce_t=">0", nce_m="[0,1]", nce_replace="bool")

    def self_synced_buffers(self):
        return [self.memory.bank_student, self.memory.bank_teacher, self.memory.normalizers]

    def forward(self, images, targets, ctx: StepContext):
        if ctx.indices is None:
            raise ValueError("CRD needs the batch's training-set indices (StepContext.indices), "
                             "which the trainer gives")
        logits, logits_teacher, (feat_s,), (feat_t,) = self.forward_features(images)
        out_s, out_t = self.memory(self.embed_student(feat_s), self.embed_teacher(feat_t),
                                   ctx.indices, ctx.step)
        terms = {"ce": self.ce_weight * self.cross_entropy(logits, targets, ctx)}
        if self.kd_weight:
            terms["kd"] = self.kd_weight * kd_loss(logits, logits_teacher, self.temperature)
        terms["crd"] = self.crd_weight * (crd_nce_loss(out_s, self.memory.size)
                                          + crd_nce_loss(out_t, self.memory.size))
        return logits, terms
