"""An ensemble of specialists (Hinton, Vinyals & Dean 2015, section 5), distilled into one
student. A generalist (the run's teacher) sees every class; each specialist models a subset of
classes that the generalist confuses, all others merged into one dustbin class.

- Subsets: `distiller.subsets` by hand, or K-means on the columns of the covariance matrix of
  the generalist's predicted distributions over the whole training split (the paper's section
  5.3), with `num_specialists` clusters (default round(sqrt(C))); clusters of one class are
  dropped. The predictions are taken at the KD temperature: the paper's JFT generalist was
  right a quarter of the time, ours are nearly always right, and the covariance of near
  one-hot predictions shows class frequencies, not confusions (at T=1 on digits K-means puts 8
  of the 10 classes in one group). The clustering depends on the generalist and the data only
  (its own fixed seed), so every seed of a sweep finds the same subsets and specialists.
- Specialists (`specialist`, an internal method run for the zoo like TAKD's links): initialised
  from the generalist, trained with the dataset's recipe on data where `enrichment` (half, as
  the paper) of the items drawn come from the subset, on CE over the subset and the dustbin.
  Cached in the teacher zoo under the generalist's weights and the subset.
- The student's target, per example: the specialists whose subset holds the generalist's top
  `top_n` classes (the paper's n = 1) are active; q minimises KL(p_g, q) + sum_m KL(p_m, q)
  (`solve_specialists_target`: the objective's EM fixed point, where the paper takes gradient
  steps on q's logits; same minimum, far fewer steps), every distribution at the KD temperature; the student learns CE + KD to q (the reference KD
  weights). A specialist's dustbin logit is first corrected for its enriched training data:
  the paper adds the log of the subset's oversampling; we add the exact prior correction,
  log((1-pi)/(1-e)) - log(pi/e) for a subset of training share pi drawn at rate e.
- Where the paper's specialists have |S|+1 outputs (a new dustbin unit), ours keep the
  generalist's C-way head and read the dustbin as the log-sum-exp of the other classes'
  logits: the specialist then starts exactly as the generalist collapsed to S + dustbin.
There is no reference code (the paper's specialists were JFT-scale and never released).
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from distill import distributed as dist_utils
from distill.checkpoint import preserved_rng
from distill.errors import ConfigError
from distill.inputs import to_device
from distill.losses import soft_target_loss
from distill.losses.specialists import (active_specialists, collapsed_log_probs,
                                        collapsed_targets, solve_specialists_target)
from distill.method import (DISTILLERS, BuildInfo, Distiller, OwnTeachers, TeacherRequest, Traits,
                            WeightedSampling, call_model, teacher_requests)
from distill.method.checks import require

log = logging.getLogger("distill")
SPECIALIST_OPTIONS = ("enrichment",)   # what each specialist's training run takes
CLUSTER_SEED = 0                         # K-means's own seed: subsets do not follow the run's seed


@DISTILLERS.register("specialists",
                     family="several teachers",
                     summary=("KD to a generalist combined with specialists of its most confused "
                              "classes"),
                     published_in=("4h",),
                     paper='Specialists, Hinton et al. 2015 (section 5)',
                     recipe=('the teacher is the generalist; `subsets` of confusable classes by '
                             'hand, or K-means (`num_specialists`, default round(sqrt(C))) on the '
                             "covariance of the generalist's predictions at T over the training "
                             'split; each specialist starts from the generalist and learns CE over'
                             ' its subset + a dustbin on data drawn half from its subset '
                             '(`enrichment` 0.5), kept in the zoo; the student learns CE 0.1 + KD '
                             '0.9 (T=4) to the q minimising KL(p_g, q) + sum KL(p_m, q) over the '
                             "specialists that hold the generalist's top-1 class (`top_n`)"))
class Specialists(OwnTeachers, Distiller):
    traits = Traits(teacher_outputs_only=True)

    def __init__(self, student, teacher_models, subsets: list[list[int]] | None = None,
                 num_specialists: int | None = None, top_n: int = 1, enrichment: float = 0.5,
                 ce_weight: float = 0.1, kd_weight: float = 0.9, temperature: float = 4.0,
                 solver_steps: int = 50, specialist_checkpoints: list[str] | None = None, *,
                 info: BuildInfo):
        super().__init__(student, None)
        self.add_frozen("teacher", teacher_models["teacher"])
        if num_specialists is not None and not subsets and not 2 <= num_specialists < info.num_classes:
            raise ConfigError(f"{num_specialists} specialists for {info.num_classes} classes",
                              key="distiller.num_specialists",
                              allowed=f"2 to {info.num_classes - 1} (or null: round(sqrt(C)))")
        self.subsets = [list(s) for s in subsets or []]
        for subset in self.subsets:
            check_subset(subset, info.num_classes)
        self.specialist_roles = [f"specialist{m}" for m in range(len(self.subsets))
                                 if f"specialist{m}" in teacher_models]
        for role in self.specialist_roles:
            self.add_frozen(role, teacher_models[role])
        shifts = [0.0] * len(self.specialist_roles)
        if self.specialist_roles:
            labels = require_labels(info)
            shifts = [dustbin_shift(share(labels, s), enrichment) for s in self.subsets]
        self.dustbin_shifts = shifts
        self.top_n, self.solver_steps = top_n, solver_steps
        self.ce_weight, self.kd_weight, self.temperature = ce_weight, kd_weight, temperature

    @classmethod
    def check_values(cls, options):
        require(options, top_n="int>0", enrichment="(0,1]", ce_weight=">=0", kd_weight=">=0",
                temperature=">0", solver_steps="int>0")
        if options.get("num_specialists") is not None:
            require(options, num_specialists="int>0")
        subsets = options.get("subsets")
        checkpoints = options.get("specialist_checkpoints")
        if checkpoints is not None and (subsets is None or not isinstance(checkpoints, (list, tuple))
                                        or len(checkpoints) != len(subsets)):
            raise ConfigError(f"invalid value {checkpoints!r}", key="distiller.specialist_checkpoints",
                              allowed="null (from the zoo, trained when missing), or one weights "
                                      "file (or null) per entry of distiller.subsets, given too")
        if subsets is not None and (
                not isinstance(subsets, (list, tuple)) or not subsets
                or not all(isinstance(s, (list, tuple)) and s for s in subsets)
                or not all(isinstance(c, int) and not isinstance(c, bool)
                           for s in subsets for c in s)):
            raise ConfigError(f"invalid value {subsets!r}", key="distiller.subsets",
                              allowed="null (clustered from the generalist's predictions), or "
                                      "a list of non-empty lists of class indices, e.g. "
                                      "[[3,5,8],[4,9]]")

    @classmethod
    def teacher_requests(cls, options, teacher):
        (generalist,) = teacher_requests(Distiller, options, teacher)
        defaults = inspect.signature(cls.__init__).parameters
        made = {k: options.get(k, defaults[k].default) for k in SPECIALIST_OPTIONS}
        subsets = options.get("subsets") or []
        checkpoints = options.get("specialist_checkpoints") or [None] * len(subsets)
        return [generalist] + [
            TeacherRequest(f"specialist{m}", generalist.arch, key="distiller.subsets",
                           checkpoint=checkpoint, checkpoint_key="distiller.specialist_checkpoints",
                           distilled_from=replace(generalist, role="parent"),
                           distill_options={"subset": sorted(subset), **made},
                           made_by="specialist")
            for m, (subset, checkpoint) in enumerate(zip(subsets, checkpoints))]

    @classmethod
    def complete_options(cls, options, teachers, data, device):
        if options.get("subsets") is not None:
            return options
        defaults = inspect.signature(cls.__init__).parameters
        temperature = options.get("temperature", defaults["temperature"].default)
        # dataset.train_fraction keeps a Subset of the training split; the generalist and its
        # specialists are zoo models of the whole split, and so are the subsets
        train = data.train.dataset if isinstance(data.train, Subset) else data.train
        subsets = dist_utils.on_main(lambda: cluster_subsets(
            teachers["teacher"], train, device, options.get("num_specialists"), temperature))
        return {**options, "subsets": subsets}

    def forward(self, inputs, targets, ctx):
        logits = call_model(self.student, inputs)
        with torch.no_grad():
            generalist = call_model(self.teacher, inputs).float()
            specialists = [collapsed_log_probs(call_model(self.part(role), inputs), subset,
                                               self.temperature, shift)
                           for role, subset, shift in zip(self.specialist_roles, self.subsets,
                                                          self.dustbin_shifts)]
            active = active_specialists(generalist, self.subsets, self.top_n)
            target = solve_specialists_target(F.log_softmax(generalist / self.temperature, 1),
                                              specialists, self.subsets, active,
                                              self.solver_steps)
        return logits, {
            "ce": self.ce_weight * self.cross_entropy(logits, targets, ctx),
            "kd": self.kd_weight * soft_target_loss(logits, target, self.temperature),
        }


@DISTILLERS.register("specialist", internal=True)
class Specialist(WeightedSampling, Distiller):
    """One specialist, trained for the zoo by `specialists` (not a method of its own): the
    student is the generalist's architecture, starts from its weights (the teacher here), and
    learns CE over its subset and the dustbin on data drawn `enrichment` from the subset."""

    def __init__(self, student, teacher, subset: list[int], enrichment: float = 0.5, *,
                 info: BuildInfo):
        super().__init__(student, teacher)
        check_subset(subset, info.num_classes)
        try:
            student.load_state_dict(teacher.state_dict())
        except RuntimeError:
            raise ConfigError("a specialist starts from its generalist's weights: the two must "
                              "be the same architecture", key="student") from None
        self.subset = list(subset)
        labels = require_labels(info)
        inside = torch.isin(labels, torch.as_tensor(self.subset))
        if not bool(inside.any()) or bool(inside.all()):
            raise ConfigError(f"the training split has {'no' if not inside.any() else 'only'} "
                              f"items of classes {self.subset}", key="distiller.subsets",
                              allowed="subsets of classes the training split has, not all of it")
        self._weights = torch.where(inside, enrichment / max(int(inside.sum()), 1),
                                    (1 - enrichment) / max(int((~inside).sum()), 1)).double()

    def sample_weights(self):
        return self._weights

    def forward(self, inputs, targets, ctx):
        logits = call_model(self.student, inputs)
        log_probs = collapsed_log_probs(logits, self.subset)
        return logits, {"ce": F.nll_loss(log_probs, collapsed_targets(targets, self.subset))}


def check_subset(subset, num_classes: int) -> None:
    bad = [c for c in subset if not 0 <= c < num_classes]
    if bad or len(set(subset)) != len(subset) or len(set(subset)) >= num_classes:
        raise ConfigError(f"invalid subset {list(subset)}", key="distiller.subsets",
                          allowed=f"distinct class indices in [0, {num_classes - 1}], fewer "
                                  f"than all {num_classes} classes (the rest is the dustbin)")


def require_labels(info: BuildInfo) -> torch.Tensor:
    if info.train_labels is None:
        raise ConfigError("specialists need the training set's labels, and this dataset does not "
                          "expose them", key="dataset")
    return info.train_labels


def share(labels: torch.Tensor, subset: list[int]) -> float:
    return float(torch.isin(labels, torch.as_tensor(subset)).float().mean())


def dustbin_shift(pi: float, enrichment: float) -> float:
    """The dustbin logit's correction for a specialist trained on data drawn `enrichment` from
    a subset whose share of the training set is `pi`: Bayes' prior shift between the two
    class priors (0 when the data was not enriched)."""
    pi = min(max(pi, 1e-6), 1 - 1e-6)
    rest = max(1 - enrichment, 1e-6)
    return math.log((1 - pi) / rest) - math.log(pi / enrichment)


@torch.no_grad()
def generalist_probs(model: torch.nn.Module, dataset, device: torch.device, temperature: float,
                     batch_size: int = 256) -> torch.Tensor:
    """(N, C) softmax(logits / T) of `model` on every training item, in eval mode, the
    training augmentation drawn from a fixed seed (the random state left as it was)."""
    model = model.to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=0)
    with preserved_rng():
        torch.manual_seed(CLUSTER_SEED)
        return torch.cat([F.softmax(call_model(model, to_device(inputs, device)).float()
                                    / temperature, 1).cpu() for inputs, _ in loader])


def cluster_subsets(model: torch.nn.Module, train, device: torch.device,
                    num_specialists: int | None, temperature: float) -> list[list[int]]:
    """The paper's subsets: K-means on the columns of the covariance matrix of the
    generalist's predictions (classes often predicted together share a cluster); clusters of
    one class are dropped (a specialist needs classes to tell apart)."""
    from sklearn.cluster import KMeans   # scikit-learn is a dependency (digits); slow import

    probs = generalist_probs(model, train, device, temperature).double().numpy()
    num_classes = probs.shape[1]
    k = num_specialists or max(2, round(math.sqrt(num_classes)))
    if k > num_classes:
        raise ConfigError(f"{k} specialists for {num_classes} classes", key="distiller.num_specialists",
                          allowed=f"at most {num_classes}")
    covariance = torch.from_numpy(probs).T.cov().numpy()
    labels = KMeans(n_clusters=k, n_init=10, random_state=CLUSTER_SEED).fit_predict(covariance)
    subsets = sorted(sorted(int(c) for c in range(num_classes) if labels[c] == cluster)
                     for cluster in range(k))
    subsets = [s for s in subsets if 1 < len(s) < num_classes]
    if not subsets:
        raise ConfigError(f"clustering the generalist's predictions into {k} groups gave no "
                          "group of two or more classes", key="distiller.num_specialists",
                          hint="ask for fewer specialists, or give distiller.subsets by hand")
    log.info("specialist subsets (K-means on the covariance of the generalist's predictions at "
             "T=%g over %d training images): %s", temperature, probs.shape[0], subsets)
    return subsets
