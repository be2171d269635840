"""DIST (Huang et al., NeurIPS 2022) with the official CIFAR-100 recipe (dist_cifar.yaml:
`kd: dist_t4`, ori_loss_weight 1, kd_loss_weight 2): CE 1 + 2 x `dist_loss` at T 4 with
beta = gamma = 1 inside it, i.e. the paper's beta = gamma = 2."""
from __future__ import annotations

from distill.losses import dist_loss
from distill.method import DISTILLERS, Distiller, Traits, call_model
from distill.method.checks import OFF, OVERFLOW, require


@DISTILLERS.register("dist",
                     family="logits",
                     summary=("The student matches how the teacher's predictions correlate across "
                              "classes and samples"),
                     published_as=("DIST (source not stated)",),
                     published_in=("3a",),
                     paper=('DIST, Huang et al. NeurIPS 2022 (code hunto/image_classification_sota'
                            ' `dist_kd.py`)'),
                     recipe=('CE 1, 2 x (inter-class + intra-class Pearson-correlation losses of '
                             'softmax(z/4), each times T^2), beta = gamma = 1 inside '
                             '(`dist_cifar.yaml`)'),
                     table_row=17,
                     edges={"beta": {"0": OFF, "huge": OVERFLOW},
                            "gamma": {"0": OFF, "huge": OVERFLOW}})
class DIST(Distiller):
    # the intra-class term correlates each class's column over the batch: one item has zero
    # variance there, and the term divides by it
    traits = Traits(teacher_outputs_only=True, logit_weights=("ce_weight", "dist_weight"),
                    min_batch=2)

    def __init__(self, student, teacher, ce_weight: float = 1.0, dist_weight: float = 2.0,
                 beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0):
        super().__init__(student, teacher)
        self.ce_weight, self.dist_weight = ce_weight, dist_weight
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    @classmethod
    def check_values(cls, options):
        require(options, temperature=">0", ce_weight=">=0", dist_weight=">=0", beta=">=0",
                gamma=">=0")

    @classmethod
    def loss_term_weights(cls, options):
        weights = {k: options[k] for k in ("ce_weight", "dist_weight") if k in options}
        if "dist_weight" in weights:   # DIST's term vanishes when both of its parts do
            weights["dist_weight"] *= options.get("beta", 1.0) + options.get("gamma", 1.0)
        return weights

    def forward(self, inputs, targets, ctx):
        logits = call_model(self.student, inputs)
        logits_teacher = self.teacher_logits(inputs)
        return logits, {
            "ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
            "dist": self.dist_weight * dist_loss(logits, logits_teacher, self.beta, self.gamma,
                                                 self.temperature),
        }
