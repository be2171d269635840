"""Schemes beyond one frozen teacher: Hinton's specialists and Born-Again generations.

- The specialists' math against transcriptions of the paper's definitions on fixed inputs: the
  collapsed (subset + dustbin) distribution, the active set, the objective's gradient (autograd
  of eq. 5) and its solution, which must beat the generalist alone and the plain average.
- Subsets found by clustering a planted generalist; the enriched sampler; a specialist's training
  step (starts as the generalist, CE over subset + dustbin).
- End to end from the config on fake data, each run cut by trainer.max_steps and resumed
  bit-exactly: `specialists` (its specialists trained for the zoo first) and `born_again` with
  the ensemble of generations (each generation a zoo link).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _compose import make_cfg
from _golden import fixed_teacher
from distill.app import run
from distill.checkpoint import read_checkpoint
from distill.distillers.specialists import cluster_subsets, dustbin_shift
from distill.engine.sampler import EpochSampler
from distill.errors import ConfigError
from distill.losses.specialists import (active_specialists, collapsed_log_probs, collapsed_targets,
                                        solve_specialists_target, specialists_objective)
from distill.method import DISTILLERS, BuildInfo, StepContext, build_distiller
from distill.models import create_model
from distill.zoo import TeacherZoo

g = torch.Generator().manual_seed(3)
N, C = 32, 10
SUBSETS = [[3, 5, 8], [4, 9], [1, 7]]
GENERALIST = torch.randn(N, C, generator=g) * 2
SPECIALIST_LOGITS = [torch.randn(N, C, generator=g) * 2 for _ in SUBSETS]


def _collapsed64(logits, subset, shift=0.0, temperature=1.0):
    """The paper's specialist distribution, written out: softmax over [z_S..., dustbin], the
    dustbin's logit log(sum of exp of the other logits) + shift, all over T."""
    z = logits.double().numpy()
    rows = []
    for row in z:
        others = [row[c] for c in range(len(row)) if c not in subset]
        dustbin = math.log(sum(math.exp(v) for v in others)) + shift
        scaled = np.array([row[c] for c in subset] + [dustbin]) / temperature
        rows.append(scaled - np.log(np.exp(scaled).sum()))
    return np.array(rows)


def test_collapsed_distribution_targets_and_active_set_match_transcriptions():
    for subset in SUBSETS:
        got = collapsed_log_probs(SPECIALIST_LOGITS[0], subset, 3.0, 0.7)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.double().numpy(),
                                   _collapsed64(SPECIALIST_LOGITS[0], subset, 0.7, 3.0), atol=1e-5)
    targets = torch.tensor([3, 5, 8, 0, 9, 4])
    assert collapsed_targets(targets, [3, 5, 8]).tolist() == [0, 1, 2, 3, 3, 3]
    logits = torch.tensor([[0.0, 9, 1, 2, 3, 4, 5, 8, 0, 0]])   # top classes: 1, then 7
    assert active_specialists(logits, SUBSETS, 1).tolist() == [[False, False, True]]
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 9, 5, 6, 0, 8]])   # top-2: 5 and 9
    assert active_specialists(logits, SUBSETS, 2).tolist() == [[True, True, False]]
    # the prior correction: none without enrichment, log 3 for a quarter of the data drawn half
    assert dustbin_shift(0.3, 0.3) == pytest.approx(0.0, abs=1e-12)
    assert dustbin_shift(0.25, 0.5) == pytest.approx(math.log(3))


def _problem(temperature):
    log_p_g = F.log_softmax(GENERALIST / temperature, 1)
    specialists = [collapsed_log_probs(z, s, temperature) for z, s in zip(SPECIALIST_LOGITS, SUBSETS)]
    return log_p_g, specialists, active_specialists(GENERALIST, SUBSETS, 2)


def _objective64(q, p_g, p_specialists, active):
    """Eq. 5 in float64 from its definition: KL(p_g, q) + sum over active m of KL(p_m, q_m)."""
    total = (p_g * (np.log(p_g) - np.log(q))).sum(1)
    for m, (p_m, subset) in enumerate(zip(p_specialists, SUBSETS)):
        outside = [c for c in range(C) if c not in subset]
        q_m = np.concatenate([q[:, subset], q[:, outside].sum(1, keepdims=True)], 1)
        total += active[:, m] * (p_m * (np.log(p_m) - np.log(q_m))).sum(1)
    return total


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_specialists_target_beats_the_generalist_and_the_plain_average(temperature):
    log_p_g, specialists, active = _problem(temperature)
    p_g = log_p_g.double().exp().numpy()
    p_s = [s.double().exp().numpy() for s in specialists]
    act = active.numpy().astype(float)
    assert act.sum(1).max() >= 2 and (act.sum(1) == 0).any()   # both cases occur
    q = solve_specialists_target(log_p_g, specialists, SUBSETS, active).double().exp().numpy()
    np.testing.assert_allclose(q[act.sum(1) == 0], p_g[act.sum(1) == 0], atol=1e-6)
    # the plain average: the generalist and each active specialist, a specialist's dustbin mass
    # spread over the classes it does not model as the generalist spreads it
    average = p_g.copy()
    for m, (p_m, subset) in enumerate(zip(p_s, SUBSETS)):
        outside = [c for c in range(C) if c not in subset]
        full = np.zeros_like(p_g)
        full[:, subset] = p_m[:, :-1]
        full[:, outside] = p_m[:, -1:] * p_g[:, outside] / p_g[:, outside].sum(1, keepdims=True)
        average += act[:, m:m + 1] * full
    average /= average.sum(1, keepdims=True)
    solved, alone, mean = (_objective64(x, p_g, p_s, act) for x in (q, p_g, average))
    assert (solved <= alone + 1e-6).all() and (solved <= mean + 1e-6).all()
    assert solved.mean() < min(0.5 * alone.mean(), mean.mean() - 1e-3)   # strictly better
    # the float32 objective agrees with the float64 transcription
    ours = specialists_objective(torch.from_numpy(np.log(q)).float(), log_p_g, specialists,
                                 SUBSETS, active)
    np.testing.assert_allclose(ours.double().numpy(), solved, rtol=1e-4, atol=1e-5)
    # and the solution is a minimum: eq. 5's gradient (autograd) vanishes there, each step helps
    z = torch.from_numpy(np.log(q)).float().requires_grad_()
    (grad,) = torch.autograd.grad(specialists_objective(F.log_softmax(z, 1), log_p_g, specialists,
                                                        SUBSETS, active).sum(), z)
    assert grad.abs().max() < 5e-3
    values = [specialists_objective(solve_specialists_target(log_p_g, specialists, SUBSETS, active,
                                                             steps), log_p_g, specialists,
                                    SUBSETS, active).mean().item() for steps in range(0, 8)]
    assert values == sorted(values, reverse=True)


def test_clustering_finds_the_planted_confusable_groups():
    """A generalist that spreads its probability within {0,1,2}, {3,4,5,6} and {7,8,9}: K-means
    on the covariance of its predictions gives those groups."""
    groups = [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]

    class Planted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            labels = x.flatten(1)[:, 0].long()
            logits = torch.full((len(x), C), -4.0)
            noise = torch.Generator().manual_seed(int(labels.sum()))
            for i, y in enumerate(labels.tolist()):
                group = next(gr for gr in groups if y in gr)
                logits[i, group] = torch.rand(len(group), generator=noise) * 2
                logits[i, y] += 2
            return logits * self.scale

    images = torch.arange(200).remainder(C).float()[:, None, None, None].expand(-1, 1, 2, 2)
    dataset = torch.utils.data.TensorDataset(images.contiguous(), torch.zeros(200, dtype=torch.long))
    assert cluster_subsets(Planted(), dataset, torch.device("cpu"), 3, 1.0) == groups
    with pytest.raises(ConfigError) as exc:
        cluster_subsets(Planted(), dataset, torch.device("cpu"), 11, 1.0)
    assert exc.value.key == "distiller.num_specialists"


def test_enriched_sampler_draws_half_from_the_subset_and_is_a_function_of_seed_and_epoch():
    labels = torch.arange(1000).remainder(10)
    inside = torch.isin(labels, torch.tensor([3, 5]))
    weights = torch.where(inside, 0.5 / inside.sum(), 0.5 / (~inside).sum())
    sampler = EpochSampler(1000, 7, global_batch=100, weights=weights)
    sampler.set_epoch(2)
    order = list(sampler)
    assert len(order) == 1000 and abs(inside[order].float().mean().item() - 0.5) < 0.05
    again = EpochSampler(1000, 7, global_batch=100, weights=weights)
    again.set_epoch(2, first_batch=3)
    assert list(again) == order[300:]
    ranks = [EpochSampler(1000, 7, global_batch=100, rank=r, world_size=2, weights=weights)
             for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    shares = [list(s) for s in ranks]
    assert sorted(shares[0] + shares[1]) == sorted(order)
    with pytest.raises(ValueError):
        EpochSampler(10, 0, global_batch=5, weights=torch.zeros(10))


def test_a_specialist_starts_as_its_generalist_and_learns_subset_plus_dustbin():
    torch.manual_seed(0)
    generalist = create_model("resnet8", num_classes=10)
    labels = torch.arange(40).remainder(10)
    info = BuildInfo(num_classes=10, train_labels=labels)
    distiller = build_distiller("specialist", create_model("resnet8", num_classes=10), generalist,
                                {"subset": [2, 7], "enrichment": 0.5}, info)
    for key, value in generalist.state_dict().items():
        assert torch.equal(distiller.student.state_dict()[key], value)
    weights = distiller.sample_weights()
    assert weights[torch.isin(labels, torch.tensor([2, 7]))].sum().item() == pytest.approx(0.5)
    distiller.eval()
    images, targets = torch.randn(6, 3, 32, 32), torch.tensor([2, 7, 0, 1, 2, 9])
    logits, terms = distiller(images, targets, StepContext(0, 0, 1))
    want = -_collapsed64(logits.detach(), [2, 7])[np.arange(6), [0, 1, 2, 2, 0, 2]].mean()
    assert terms["ce"].item() == pytest.approx(want, rel=1e-5)
    assert "specialist" not in DISTILLERS.list() and "specialists" in DISTILLERS.list()
    with pytest.raises(ConfigError) as exc:
        build_distiller("specialist", create_model("resnet14", num_classes=10), generalist,
                        {"subset": [2, 7]}, info)
    assert exc.value.key == "student"


def test_specialists_options_are_checked():
    cls = DISTILLERS.get("specialists")
    for bad in ({"subsets": [[1, 2], []]}, {"subsets": [1, 2]}, {"subsets": [["a"]]},
                {"top_n": 0}, {"enrichment": 0}, {"num_specialists": 0},
                {"specialist_checkpoints": ["a.safetensors"]},   # no subsets to pair them with
                {"specialist_checkpoints": ["a.safetensors"], "subsets": [[1, 2], [3, 4]]}):
        with pytest.raises(ConfigError) as exc:
            cls.check_values(bad)
        assert exc.value.key == f"distiller.{next(iter(bad))}"
    requests = cls.teacher_requests({"subsets": [[4, 2], [7, 8]], "specialist_checkpoints":
                                     [None, "s1.safetensors"]}, {"name": "resnet14"})
    assert [(r.role, r.checkpoint, r.distill_options, r.made_by) for r in requests[1:]] == [
        ("specialist0", None, {"subset": [2, 4], "enrichment": 0.5}, "specialist"),
        ("specialist1", "s1.safetensors", {"subset": [7, 8], "enrichment": 0.5}, "specialist")]
    teachers = {"teacher": create_model("resnet8", num_classes=10)}
    for subsets in ([[1, 12]], [[1, 1]], [list(range(10))]):
        with pytest.raises(ConfigError) as exc:
            build_distiller("specialists", create_model("resnet8", num_classes=10), teachers,
                            {"subsets": subsets}, BuildInfo(num_classes=10))
        assert exc.value.key == "distiller.subsets"


def test_born_again_requests_a_chain_of_generations():
    cls = DISTILLERS.get("born_again")
    teacher = {"name": "resnet56", "checkpoint": None, "pretrained": False}
    (last,) = cls.teacher_requests({"architecture": "resnet8", "generations": 3}, teacher)
    chain = [last]
    while chain[-1].distilled_from is not None:
        chain.append(chain[-1].distilled_from)
    assert [r.arch for r in chain] == ["resnet8"] * 3   # never the run's teacher=resnet56
    assert last.distill_options == {"ce_weight": 0.0, "kd_weight": 1.0, "temperature": 1.0}
    assert chain[-1].distill_options == {} and chain[-1].distilled_from is None
    every = cls.teacher_requests({"architecture": "resnet8", "generations": 3, "ensemble": True},
                                 teacher)
    assert [r.role for r in every] == ["gen0", "gen1", "gen2"]
    assert cls.teacher_label({"architecture": "resnet8", "generations": 3}, "resnet56") \
        == "resnet8-gen3"
    with pytest.raises(ConfigError) as exc:
        build_distiller("born_again", create_model("resnet8", num_classes=10),
                        {"teacher": create_model("resnet14", num_classes=10)},
                        {"architecture": "resnet14"}, BuildInfo(num_classes=10,
                                                                student_arch="resnet8"))
    assert exc.value.key == "distiller.architecture"


BASE = ["dataset=fake", "dataset.train_size=64", "dataset.val_size=32", "student=resnet8",
        "trainer.batch_size=16", "trainer.log_every=1", "device=cpu", "zoo.publish=false",
        "trainer.epochs=2", "teacher.auto_train_epochs=1"]
RUNS = {
    "specialists": ["distiller=specialists", "teacher=resnet14", "distiller.subsets=[[0,1],[2,3,4]]"],
    "born_again": ["distiller=born_again", "distiller.generations=2", "distiller.ensemble=true",
                   "teacher.auto_train=true"],
}
# the frozen parts each run resolves, and the zoo entries made for it
EXPECTED = {"specialists": ({"teacher", "specialist0", "specialist1"}, "resnet14@specialist-"),
            "born_again": ({"gen0", "gen1"}, "resnet8@kd-resnet8")}


@pytest.mark.parametrize("name", list(RUNS))
def test_trains_and_resumes_bit_exactly(name, tmp_path):
    args = [*BASE, *RUNS[name]]
    if name == "specialists":
        args.append(f"teacher.checkpoint={fixed_teacher(tmp_path)}")
    straight = run(make_cfg(tmp_path, *args, run="straight"))
    run(make_cfg(tmp_path, *args, "trainer.max_steps=3", run="resumed"))
    resumed = run(make_cfg(tmp_path, *args, run="resumed"))
    assert straight["steps"] == resumed["steps"] == 8
    a, b = (read_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("straight", "resumed"))
    for key, value in a["parts"]["student"].items():
        assert torch.equal(value, b["parts"]["student"][key]), key
    roles, zoo_prefix = EXPECTED[name]
    assert {t["role"] for t in straight["teachers"]} == roles
    assert straight["teachers"] == resumed["teachers"]   # the same weights (sha256) both times
    zoo = TeacherZoo(tmp_path / "zoo")
    made = [p.name for p in (tmp_path / "zoo" / "fake").iterdir() if p.name.startswith(zoo_prefix)]
    assert len(made) == (2 if name == "specialists" else 1)
    if name == "specialists":   # each specialist's zoo entry says which classes it models
        subsets = sorted(zoo.versions("fake", m)[0].meta["specialist"]["subset"] for m in made)
        assert subsets == [[0, 1], [2, 3, 4]]


def test_a_resumed_run_refuses_a_specialist_made_for_other_classes(tmp_path):
    """A resumed run takes its teachers by their recorded sha256; a specialist's zoo entry also
    says which classes it models, and a run whose subsets came out differently is refused
    rather than collapsing the old specialist over the new classes."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from distill.method import TeacherRequest
    from distill.teachers import TeacherResolver
    from distill.zoo import file_sha256

    weights = tmp_path / "s.safetensors"
    save_file(create_model("resnet8", num_classes=10).state_dict(), str(weights))
    zoo = TeacherZoo(tmp_path / "zoo")
    made = {"subset": [0, 1], "enrichment": 0.5}
    zoo.publish("fake", "resnet8@specialist-resnet8.0000abcd", weights,
                {"top1": 1.0, "specialist": made})
    cfg = make_cfg(tmp_path, "dataset=fake")
    resolver = TeacherResolver(cfg, OmegaConf.to_container(cfg.dataset, resolve=True), 10, zoo,
                               [], None)
    parent = TeacherRequest("parent", "resnet8")

    def request(subset):
        return TeacherRequest("specialist0", "resnet8", key="distiller.subsets",
                              distilled_from=parent, made_by="specialist",
                              distill_options={"subset": subset, "enrichment": 0.5})
    digest = file_sha256(weights)
    assert resolver.resolve(request([0, 1]), digest).sha256 == digest
    with pytest.raises(ConfigError) as exc:
        resolver.resolve(request([0, 2]), digest)
    assert exc.value.key == "distiller.subsets" and "[0, 1]" in exc.value.message


def test_refusals_before_anything_is_trained():
    from distill.validation import check_run_features

    trainer = {"compile": "none", "precision": "fp32", "channels_last": False, "sync_bn": True}
    with pytest.raises(ConfigError) as exc:   # BSS's second forward is on some ranks only
        check_run_features("bss", DISTILLERS.get("bss"), trainer, world_size=2)
    assert exc.value.key == "trainer.sync_bn"
    check_run_features("bss", DISTILLERS.get("bss"), trainer, world_size=1)   # no DDP: fine
    with pytest.raises(ConfigError) as exc:   # BYOT's feature term is over the whole batch
        check_run_features("byot", DISTILLERS.get("byot"), {**trainer, "sync_bn": False}, 2)
    assert exc.value.key == "distiller"
    for count in (1, 10, 20):   # specialists: 2 to C-1 clusters, checked when first built
        with pytest.raises(ConfigError) as exc:
            build_distiller("specialists", create_model("resnet8", num_classes=10),
                            {"teacher": create_model("resnet8", num_classes=10)},
                            {"num_specialists": count}, BuildInfo(num_classes=10))
        assert exc.value.key == "distiller.num_specialists"
    with pytest.raises(ConfigError) as exc:   # a subset the training split has no item of
        build_distiller("specialist", create_model("resnet8", num_classes=10),
                        create_model("resnet8", num_classes=10), {"subset": [7]},
                        BuildInfo(num_classes=10, train_labels=torch.arange(40) % 5))
    assert exc.value.key == "distiller.subsets"
