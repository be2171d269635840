"""The feature and relation methods of the CRD table end to end: each method trains from its config,
resumes bit-exactly from a checkpoint in every stage, and its terms are the weighted losses of
distill.losses on the features its hooks take.

Fake data, 64 images in batches of 16 (4 steps an epoch), resnet14 -> resnet8, a fixed random
teacher (no teacher training).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from _compose import make_cfg, method_options
from _golden import fixed_teacher
from distill.app import run
from distill.checkpoint import read_checkpoint
from distill.losses import nst_loss, pkt_loss, sp_loss
from distill.method import MAIN_STAGE, BuildInfo, StepContext, build_distiller
from distill.models import create_model, model_spec

CANON = ("nst", "sp", "pkt", "cc", "vid", "kdsvd", "ft", "ab", "fsp")
BASE = ["dataset=fake", "dataset.train_size=64", "dataset.val_size=32", "student=resnet8",
        "teacher=resnet14", "trainer.batch_size=16", "trainer.log_every=1", "device=cpu",
        "zoo.publish=false", "trainer.epochs=2"]
# a method's stages get one epoch each here, so a run of 2 main epochs crosses every boundary
STAGED = {m: ["distiller.init_epochs=1"] for m in ("ft", "ab", "fsp")}


def _stop_points(method: str) -> list[int]:
    """Steps to stop at and resume from: mid-epoch in every stage (FT: step 2 of its init
    stage, then step 6, in the main stage's first epoch)."""
    return [2, 6] if method in STAGED else [3]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return fixed_teacher(tmp_path_factory.mktemp("teacher"))


def _parts(run_dir):
    return read_checkpoint(run_dir / "checkpoints" / "last.pt")["parts"]


@pytest.mark.parametrize("method", CANON)
def test_trains_and_resumes_bit_exactly_in_every_stage(method, teacher, tmp_path):
    args = [*BASE, f"distiller={method}", f"teacher.checkpoint={teacher}", *STAGED.get(method, [])]
    straight = run(make_cfg(tmp_path, *args, run="straight"))
    for stop in _stop_points(method):
        run(make_cfg(tmp_path, *args, f"trainer.max_steps={stop}", run="resumed"))
    resumed = run(make_cfg(tmp_path, *args, run="resumed"))
    assert straight["steps"] == resumed["steps"] == 4 * (2 + (1 if method in STAGED else 0))
    a, b = _parts(tmp_path / "straight"), _parts(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for role in a:
        for key, value in a[role].items():
            assert torch.equal(value, b[role][key]), f"{role}.{key}"
    assert load_file(str(tmp_path / "straight" / "student.safetensors")).keys() == \
        load_file(str(tmp_path / "resumed" / "student.safetensors")).keys()
    assert straight["last_top1"] == resumed["last_top1"]
    if method in STAGED:
        assert [h["stage"] for h in straight["history"]] == ["init", MAIN_STAGE, MAIN_STAGE]


def _build(method: str, **options):
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet14",
                                                                             num_classes=10)
    info = BuildInfo(model_spec("resnet8"), model_spec("resnet14"), (3, 32, 32), 10,
                     student_arch="resnet8")
    options = {**method_options(method), **options}
    return build_distiller(method, student, teacher, options, info).train()


@pytest.mark.parametrize("method,loss,layers", [
    ("nst", nst_loss, ["layer1", "layer2", "layer3"]),
    ("sp", sp_loss, ["layer3"]),
    ("pkt", pkt_loss, ["fc:in"]),
])
def test_terms_are_the_weighted_losses_on_the_reference_layers(method, loss, layers):
    """NST on every stage output (feat[1:-1]), SP on the last one (feat[-2]), PKT on the pooled
    embedding (feat[-1]), each with the reference weight and CE 1."""
    d = _build(method, feat_weight=3.0)
    assert d.student_layers == layers and d.teacher_layers == layers
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, terms = d(x, y, StepContext(epoch=0, step=0, epochs=1))
    feats_s = [d.student_hooks.features[n] for n in layers]
    feats_t = [d.teacher_hooks.features[n] for n in layers]
    assert torch.allclose(terms["ce"], F.cross_entropy(logits, y))
    expected = 3.0 * sum(loss(s, t) for s, t in zip(feats_s, feats_t))
    assert torch.allclose(terms[method], expected)
    assert method_options(method)["feat_weight"] == {"nst": 50.0, "sp": 3000.0,
                                                     "pkt": 30000.0}[method]


def test_ft_trains_the_paraphraser_first_then_student_and_translator():
    """The init stage steps only the paraphraser (MSE reconstruction of the teacher's last stage
    output) with its own constant lr (0.01 for a ResNet student, the reference's); the main stage
    steps the student and translator with CE + 200 x ft_loss, the paraphraser left as it is."""
    d = _build("ft")
    assert [(s.name, s.epochs) for s in d.stages()] == [("init", 30)]
    stepped = []

    class Step:
        optimizers = {}

        def backward(self, loss):
            loss.backward()

        def step(self, name):
            stepped.append(name)

    before = {k: v.clone() for k, v in d.paraphraser.state_dict().items()}
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    terms = d.training_step(x, y, StepContext(0, 0, 31, stage="init"), Step())
    assert set(terms) == {"paraphrase"} and stepped == ["init"]
    assert all(p.grad is None for p in d.student.parameters())
    assert all(p.grad is not None for p in d.paraphraser.parameters())
    d.zero_grad(set_to_none=True)
    terms = d.training_step(x, y, StepContext(30, 4, 31, stage=MAIN_STAGE), Step())
    assert set(terms) == {"ce", "ft"} and stepped == ["init", "main"]
    assert all(p.grad is None for p in d.paraphraser.parameters())
    assert all(torch.equal(v, d.paraphraser.state_dict()[k]) for k, v in before.items())
    groups = d.parameter_groups()
    assert {id(p) for p in groups["init"]} == {id(p) for p in d.paraphraser.parameters()}
    assert d.init_lr == 0.01 and method_options("ft")["feat_weight"] == 200.0


@pytest.mark.parametrize("method", ["ab", "fsp"])
def test_ab_and_fsp_train_the_body_first_then_ce_alone(method):
    """Init stage: the student's body (not its classifier) and AB's connectors, with the feature
    loss alone, at the run's lr (constant); main stage: the student with CE alone."""
    d = _build(method)
    assert [(s.name, s.epochs) for s in d.stages()] == [("init", 30)]
    if method == "ab":
        assert d.student_layers == ["layer1.0:preact", "layer2.0:preact", "layer3.0:preact"]
        assert d.layer_weights == [0.25, 0.5, 1.0]
    else:
        assert d.student_layers == ["layer1:in", "layer1", "layer2", "layer3"]
    seen = {}

    def factory(params, constant=False, **overrides):
        seen.setdefault("calls", []).append((constant, overrides, {id(p) for p in params}))
        return torch.optim.SGD(params, lr=0.1), None

    optimizers = d.configure_optimizers(factory)
    (main, init) = seen["calls"]
    assert main[0] is False and init[0] is True and init[1] == {}
    fc = {id(p) for p in d.student.fc.parameters()}
    assert main[2] == {id(p) for p in d.student.parameters()}
    body = {id(p) for p in d.student.parameters()} - fc
    extra = {id(p) for p in d.parameter_groups().get("init", [])}
    assert init[2] == body | extra and not init[2] & fc
    stepped = []

    class Step:
        def backward(self, loss):
            loss.backward()

        def step(self, name):
            stepped.append(name)

    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    terms = d.training_step(x, y, StepContext(0, 0, 31, stage="init"), Step())
    assert set(terms) == {method} and stepped == ["init"] and terms[method] > 0
    assert d.student.fc.weight.grad is None
    d.zero_grad(set_to_none=True)
    terms = d.training_step(x, y, StepContext(30, 4, 31, stage=MAIN_STAGE), Step())
    assert set(terms) == {"ce"} and stepped == ["init", "main"]
    assert torch.allclose(terms["ce"], F.cross_entropy(d.student(x), y))
    assert optimizers.keys() == {"main", "init"}
