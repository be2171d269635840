"""Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018): no teacher; two or more
peers (any architectures) learn together. Peer k minimises CE + 1/(K-1) sum_{l != k}
KL(p_l || p_k) with plain softmax (no temperature), and the peers are updated in turn within
each batch, as the paper's Algorithm 1: after a peer's update its predictions are computed
again before the next peer learns from them. (The authors' TensorFlow code also updates in turn,
but on a fresh batch each time and with the KL terms summed, not averaged; for two peers the
sum and the mean agree.)

Peer 0 is the run's student (`student=`), exported and reported as the student; every peer is
evaluated each epoch (`models` in summary.json). The refreshed predictions are taken with the
peer's BatchNorm buffers put back, so each peer's running statistics see each batch once.
"""
from __future__ import annotations

import torch

from distill.errors import ConfigError
from distill.losses import kd_loss
from distill.method import DISTILLERS, BuildInfo, Distiller, Inputs, Traits, call_model
from distill.method.checks import require, require_models
from distill.models import create_model


@DISTILLERS.register("dml",
                     family="mutual",
                     summary=("No teacher: peers learn together, each matching the others' "
                              "predictions"),
                     published_in=("4d",),
                     paper='Deep Mutual Learning, Zhang et al. CVPR 2018',
                     recipe=('no teacher; `peers` (default two copies of the student, any '
                             'architectures) each trained with CE + the mean KL to the others, '
                             'updated in turn per batch (Algorithm 1); peer 0 is the exported '
                             'student'))
class DML(Distiller):
    traits = Traits(needs_teacher=False, manual_step=True, logit_weights=("ce_weight", "kl_weight"))

    def __init__(self, student, peers: list[str] | None = None, ce_weight: float = 1.0,
                 kl_weight: float = 1.0, *, info: BuildInfo):
        super().__init__(None, None)
        peers = list(peers or [])
        if info.student_arch is not None and peers[0] != info.student_arch:
            raise ConfigError(f"peer 0 is the student ({info.student_arch}), but the list starts "
                              f"with {peers[0]}", key="distiller.peers",
                              hint=f"set student={peers[0]}, or start distiller.peers with "
                                   f"{info.student_arch}")
        models = [student] + [create_model(name, num_classes=info.num_classes, **info.model_options)
                              for name in peers[1:]]
        self.peer_roles = [f"peer{i}" for i in range(len(peers))]
        for role, name, model in zip(self.peer_roles, peers, models):
            self.add_trained(role, model, optimizer=role, evaluated=True, arch=name,
                             exported=role == "peer0", key="distiller.peers")
        self.ce_weight, self.kl_weight = ce_weight, kl_weight

    @classmethod
    def check_values(cls, options):
        require(options, ce_weight=">=0", kl_weight=">=0")
        require_models(options, "peers", at_least=2,
                       allowed="a list of two or more model names, the student first, e.g. "
                               "distiller.peers=[resnet8,resnet8]")

    def training_step(self, inputs, targets, ctx, step):
        peers = [self.part(role) for role in self.peer_roles]
        logits = [call_model(peer, inputs) for peer in peers]   # each peer's graph, kept until its turn
        count, terms = len(peers), {}
        for k, (role, peer) in enumerate(zip(self.peer_roles, peers)):
            ce = self.cross_entropy(logits[k], targets, ctx)
            kl = sum(kd_loss(logits[k], logits[other].detach(), 1.0)
                     for other in range(count) if other != k) / (count - 1)
            step.backward(self.ce_weight * ce + self.kl_weight * kl)
            step.step(role)
            if k < count - 1:
                logits[k] = refreshed_logits(peer, inputs)
            terms[f"{role}/ce"] = self.ce_weight * ce.detach()
            terms[f"{role}/kl"] = self.kl_weight * kl.detach()
        return terms


@torch.no_grad()
def refreshed_logits(model: torch.nn.Module, inputs: Inputs) -> torch.Tensor:
    """The model's training-mode output after its update, its buffers (BN statistics) left as
    they were before this extra forward."""
    saved = [b.clone() for b in model.buffers()]
    logits = call_model(model, inputs)
    for buffer, value in zip(model.buffers(), saved):
        buffer.copy_(value)
    return logits
