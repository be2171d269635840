"""MLKD (Jin, Wang & Lin, CVPR 2023) as the authors' code runs it on CIFAR-100 (KD_ours.py with
mdistiller's KD node: T 4, CE 0.1, KD 0.9): every batch also comes as a strong view (the
crop/flip drawn again, then RandAugment and Cutout: `mlkd_randaugment`); student and teacher
see both views, each in its own forward (so BatchNorm normalises each view on its own, as there);
CE 0.1 on each view plus 0.9 x each of `mlkd_losses`' instance (kd), class (cc) and batch (bc)
terms. Logit standardization is `standardize: true` (KD terms only, as its code does), with its
base temperature and weight per pair in configs/experiment/cifar100_ls/. The reference
trains MLKD for 480 epochs at lr 0.025 (configs/cifar100/ours): an experiment's setting, not a
default of this method.
"""
from __future__ import annotations

from distill.data.augment import AUGMENTATIONS
from distill.losses import mlkd_losses
from distill.method import DISTILLERS, Distiller, StepContext, TrainsOnViews, Traits
from distill.method.checks import require

STRONG_VIEW = "strong"


@DISTILLERS.register("mlkd",
                     family="logits",
                     summary=("KD at several temperatures on instance, class and batch level, on "
                              "two augmented views"),
                     published_as=("MLKD", "MLKD+LS"),
                     published_in=("3d",),
                     paper=('Multi-Level Logit Distillation, Jin, Wang & Lin CVPR 2023 (code '
                            'Jin-Ying/Multi-Level-Logit-Distillation)'),
                     recipe=('a strong view of every batch (crop/flip again, RandAugment of 2 '
                             'random ops at random magnitudes, Cutout: `strong_augment: '
                             'mlkd_randaugment`, both data paths); CE 0.1 on each view, 0.9 x '
                             'instance-level KD at T 4, 3, 5, 2, 6, class- and batch-correlation '
                             'terms, confidence-masked as the code does (`mlkd_losses`); the '
                             'reference trains 480 epochs at lr 0.025 (an experiment setting); '
                             '`standardize: true` for MLKD+LS'),
                     table_row=18)
class MLKD(TrainsOnViews, Distiller):
    traits = Traits(needs_images=True)

    def __init__(self, student, teacher, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 temperature: float = 4.0, standardize: bool = False,
                 strong_augment: str = "mlkd_randaugment"):
        super().__init__(student, teacher)
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self.temperature, self.standardize = temperature, standardize
        self.strong_augment = strong_augment

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", kd_weight=">=0", temperature=">0", standardize="bool")
        if "strong_augment" in options:
            AUGMENTATIONS.get(options["strong_augment"], key="distiller.strong_augment")

    def views(self):
        return {STRONG_VIEW: self.strong_augment}

    def forward(self, images, targets, ctx: StepContext):
        if STRONG_VIEW not in ctx.views:
            raise ValueError("MLKD needs the batch's strong view (StepContext.views['strong']), "
                             "which the trainer gives")
        strong = ctx.views[STRONG_VIEW]
        logits_weak, logits_strong = self.student(images), self.student(strong)
        teacher_weak, teacher_strong = self.teacher_logits(images), self.teacher_logits(strong)
        terms = {"ce": self.ce_weight * (self.cross_entropy(logits_weak, targets, ctx)
                                         + self.cross_entropy(logits_strong, targets, ctx))}
        for name, value in mlkd_losses(logits_weak, logits_strong, teacher_weak, teacher_strong,
                                       self.temperature, self.standardize).items():
            terms[name] = self.kd_weight * value
        return logits_weak, terms
