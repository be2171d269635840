"""Every method x a student from each model family: a few real optimizer steps, then what trained
and what did not. Plus the layer and connector rules of the feature methods."""
import pytest
import torch
import torch.nn.functional as F

from _compose import method_options
from distill.distillers.connectors import ConvRegressor, build_connector
from distill.engine.trainer import auxiliary_parameter_count
from distill.errors import ConfigError
from distill.losses import at_loss, fitnet_loss, kd_loss, rkd_loss
from distill.method import (DISTILLERS, MAIN_STAGE, BuildInfo, Staged, StepContext, TrainsOnViews,
                            build_distiller, teacher_requests)
from distill.models import create_model, model_spec

CTX = StepContext(epoch=0, step=0, epochs=1, indices=torch.arange(4))
# a training set of CIFAR-100's size (CRD's memory bank and its 16384 negatives)
TRAIN_SIZE = 50_000
# one student per family of the model zoo, each with a teacher of another size or family
PAIRS = [("resnet14", "resnet8"), ("wrn_16_2", "wrn_16_1"), ("vgg11", "vgg8"),
         ("resnet8x4", "mobilenetv2"), ("resnet8x4", "shufflenetv1"), ("resnet14", "shufflenetv2"),
         ("vgg8", "resnet18"), ("resnet8", "tv_resnet18")]
# torchvision's ResNet downsamples 32x32 inputs 4x in its stem: its middle stage (4x4) is
# bridged to the teacher's 8x8 layer3 (a 16x16 layer2 is too far: a clear error, tested below)
PAIR_OPTIONS = {("fitnet", "tv_resnet18"): {"teacher_layer": "layer3"},
                # its last stage is 1x1 on 32x32 images: FT's factor map would be constant
                ("ft", "tv_resnet18"): {"student_layer": "layer3"}}
# Methods that take some pairs only refuse the others with a clear error naming the option:
# KD-SVD and FSP compare student and teacher channel by channel (the reference runs them on
# same-family pairs), AB and OFD need pre-activation layers, declared for the ResNets, WRN and VGG
CHANNEL_FOR_CHANNEL = {"kdsvd": "distiller.student_layers", "fsp": "distiller.student_layers",
                       "ab": "distiller.student_layers", "ofd": "distiller.student_layers"}
# Weights whose gradient is ~0 at the start by construction, so two steps leave them as they
# were: BYOT's attention masks (the official code's) put a BatchNorm right after their SepConv's
# last BN + ReLU, and BN(relu(g * x)) = BN(relu(x)) for g > 0 while that BN's bias is 0
SCALE_FREE = {"byot": (".attention.conv.op.6.weight",)}


def _build(method, teacher_name, student_name, options=None, classes=10):
    """The method built as a run builds it: its composed options, a model for each teacher it
    requests (TAKD: the last assistant), untrained. Returns (distiller, student, the part
    `teacher` or None)."""
    torch.manual_seed(0)
    cls = DISTILLERS.get(method)
    options = {**method_options(method, teacher_name, student_name),
               **PAIR_OPTIONS.get((method, student_name), {}), **(options or {})}
    requests = teacher_requests(cls, options, {"name": teacher_name})
    student = create_model(student_name, num_classes=classes)
    teachers = {r.role: create_model(r.arch, num_classes=classes) for r in requests}
    info = BuildInfo(model_spec(student_name), model_spec(requests[0].arch) if requests else None,
                     (3, 32, 32), num_classes=classes, student_arch=student_name,
                     train_labels=torch.arange(TRAIN_SIZE) % classes)
    distiller = build_distiller(method, student, teachers, options, info)
    return distiller, student, teachers.get("teacher")


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


class _Stepper:
    """The trainer's ManualStepper, reduced to plain backward and optimizer steps."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    def backward(self, loss):
        assert torch.isfinite(loss)
        loss.backward()

    def step(self, name):
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)
        return True


# The tiers of the method x model-family matrix: the first pair is the fast tier's one step of
# each method, a cross-family pair (other channels, no pre-activation features) runs in
# `make test` too, the other six pairs only in the slow tier (about 150 s on 2 cores)
PAIR_TIERS = {PAIRS[0]: [pytest.mark.fast], ("resnet8x4", "mobilenetv2"): []}


@pytest.mark.parametrize("teacher_name,student_name",
                         [pytest.param(*pair, marks=PAIR_TIERS.get(pair, [pytest.mark.slow]))
                          for pair in PAIRS])
@pytest.mark.parametrize("method", DISTILLERS.list())
def test_each_method_trains_its_trained_parts_and_never_a_frozen_one(method, teacher_name,
                                                                     student_name):
    """Every registered method on a student of each model family: two real optimizer steps.
    The optimizers hold exactly the trained parts' parameters; gradients reach the student and
    every connector, never a teacher; teachers stay in eval mode with weights AND buffers (BN
    statistics) bitwise unchanged; every trained part changes."""
    try:
        d, _, _ = _build(method, teacher_name, student_name)
    except ConfigError as exc:
        if method not in CHANNEL_FOR_CHANNEL or (teacher_name, student_name) == PAIRS[0]:
            raise
        assert ("channel by channel" in exc.message or "channel counts" in exc.message
                or "no known" in exc.message), exc.message
        assert exc.key == CHANNEL_FOR_CHANNEL[method]
        return
    frozen, trained = d.frozen_parts(), d.trained_parts()
    auxiliary = {r: m for r, m in trained.items() if r not in d.evaluated_parts()}
    frozen_before = {r: _snapshot(m) for r, m in frozen.items()}
    trained_before = {r: _snapshot(m) for r, m in trained.items()}
    groups = d.parameter_groups()
    grouped = {id(p) for params in groups.values() for p in params}
    assert grouped == {id(p) for m in trained.values() for p in m.parameters()}
    assert not grouped & {id(p) for m in frozen.values() for p in m.parameters()}
    assert d.exported is d.part(d.exported_role) and d.exported_role in d.evaluated_parts()
    def factory(params, constant=False, **overrides):
        return torch.optim.SGD(params, lr=0.01, momentum=0.9), None

    optimizers = {name: pair[0] for name, pair in d.configure_optimizers(factory).items()}
    d.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    # one step in each stage a method runs before its main one, then two in the main stage
    stages = [*(stage.name for stage in (d.stages() if isinstance(d, Staged) else [])),
              MAIN_STAGE, MAIN_STAGE]
    for step, stage in enumerate(stages):
        ctx = StepContext(epoch=5, step=step, epochs=10, stage=stage,
                          indices=torch.arange(4) + 4 * step,
                          views={name: torch.randn(4, 3, 32, 32) for name in
                                 (d.views() if isinstance(d, TrainsOnViews) else {})})
        if d.traits.manual_step:
            terms = d.training_step(x, y, ctx, _Stepper(optimizers))
        else:
            logits, terms = d(x, y, ctx)
            assert logits.shape == (4, 10)
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0
                       for p in d.exported.parameters())
            for role, module in auxiliary.items():
                for name, p in module.named_parameters():
                    assert p.grad is not None and torch.isfinite(p.grad).all(), f"{role}.{name}"
            assert all(p.grad is None for m in frozen.values() for p in m.parameters())
            for optimizer in optimizers.values():
                optimizer.step()
        assert terms and all(torch.isfinite(v) for v in terms.values())
    for role, model in frozen.items():
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        after = _snapshot(model)
        assert all(torch.equal(frozen_before[role][k], after[k]) for k in after), role
    for role, module in trained.items():
        after = module.state_dict()   # empty for connectors that are all identities (AB)
        assert not after or any(not torch.equal(trained_before[role][k], v)
                                for k, v in after.items()), role
        if role in auxiliary:   # a connector: every weight trained
            for k, v in after.items():
                if v.is_floating_point() and k.endswith("weight") \
                        and not k.endswith(SCALE_FREE.get(method, ())):
                    assert not torch.equal(trained_before[role][k], v), f"{role}.{k}"
    assert auxiliary_parameter_count(d) == sum(p.numel() for m in auxiliary.values()
                                                for p in m.parameters())


# --- the terms are the weighted losses of distill.losses ----------------------------------------
def test_fitnet_is_ce_plus_weighted_mse_of_the_regressed_middle_stage():
    d, student, teacher = _build("fitnet", "resnet14", "resnet8", {"feat_weight": 7.0})
    assert d.student_layers == ["layer2"] and d.teacher_layers == ["layer2"]
    d.eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, losses = d(x, y, CTX)
    feats = {}
    hs = student.layer2.register_forward_hook(lambda m, a, o: feats.__setitem__("s", o))
    ht = teacher.layer2.register_forward_hook(lambda m, a, o: feats.__setitem__("t", o))
    logits = student(x)
    teacher(x)
    hs.remove(), ht.remove()
    assert set(losses) == {"ce", "hint"}
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    expected = 7.0 * fitnet_loss(d.connector(feats["s"]), feats["t"])
    assert losses["hint"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_fitnet_two_stage_trains_only_the_lower_part_first_then_ce_and_kd():
    d, student, _ = _build("fitnet", "resnet14", "resnet8", {"hint_epochs": 2, "kd_weight": 0.9})
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    d.train()
    _, losses = d(x, y, StepContext(epoch=1, step=0, epochs=10))
    assert set(losses) == {"hint"}
    losses["hint"].backward()
    assert student.fc.weight.grad is None and student.layer3[0].conv1.weight.grad is None
    assert student.layer1[0].conv1.weight.grad is not None
    assert d.connector.conv.weight.grad is not None
    _, losses = d(x, y, StepContext(epoch=2, step=0, epochs=10))
    assert set(losses) == {"ce", "kd"}


def test_at_sums_at_loss_over_stage_pairs_with_weight_1000():
    d, student, teacher = _build("at", "resnet14", "resnet8")
    assert d.student_layers == ["layer1", "layer2", "layer3"] and d.feat_weight == 1000.0
    d.eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, losses = d(x, y, CTX)
    fs = [student.layer1, student.layer2, student.layer3]
    ft = [teacher.layer1, teacher.layer2, teacher.layer3]
    out = {}
    handles = [m.register_forward_hook(lambda m, a, o, i=i, r=r: out.__setitem__((r, i), o))
               for r, mods in (("s", fs), ("t", ft)) for i, m in enumerate(mods)]
    student(x), teacher(x)
    [h.remove() for h in handles]
    expected = 1000.0 * sum(at_loss(out[("s", i)], out[("t", i)], 2) for i in range(3))
    assert losses["at"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_at_pairs_the_deepest_stages_when_counts_differ_and_refuses_unequal_lists():
    d, _, _ = _build("at", "vgg8", "resnet8")     # 4 teacher stages, 3 student stages
    assert d.teacher_layers == ["block2", "block3", "block4"]
    assert d.student_layers == ["layer1", "layer2", "layer3"]
    with pytest.raises(ConfigError) as err:
        _build("at", "vgg8", "resnet8", {"student_layers": ["layer3"],
                                          "teacher_layers": ["block3", "block4"]})
    assert err.value.key == "distiller.student_layers"


def test_rkd_uses_the_pooled_embeddings():
    d, student, teacher = _build("rkd", "resnet14", "vgg8")
    assert d.student_layers == ["classifier:in"] and d.teacher_layers == ["fc:in"]
    d.eval()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    _, losses = d(x, y, CTX)
    out = {}
    hs = student.classifier.register_forward_pre_hook(lambda m, a: out.__setitem__("s", a[0]))
    ht = teacher.fc.register_forward_pre_hook(lambda m, a: out.__setitem__("t", a[0]))
    student(x), teacher(x)
    hs.remove(), ht.remove()
    assert out["s"].shape == (6, 512) and out["t"].shape == (6, 64)
    assert losses["rkd"].item() == pytest.approx(rkd_loss(out["s"], out["t"]).item(), rel=1e-5)


def test_noisy_kd_perturbs_teacher_logits_only_in_training():
    d, student, teacher = _build("noisy_kd", "resnet14", "resnet8", {"sigma": 0.5, "fraction": 1.0})
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    clean = teacher(x)
    d.train()
    assert not torch.allclose(d.teacher_logits(x), clean)
    d.eval()
    assert torch.equal(d.teacher_logits(x), clean)
    quiet, _, _ = _build("noisy_kd", "resnet14", "resnet8", {"sigma": 0.0})
    quiet.train()
    _, losses = quiet(x, y, CTX)
    student.train()
    expected = 0.9 * kd_loss(quiet.student(x), teacher(x), 4.0)
    assert losses["kd"].item() == pytest.approx(expected.item(), rel=1e-4)


# --- layers and connectors: clear errors before the first step ----------------------------------
def test_unbridgeable_shapes_are_a_config_error_naming_the_layers():
    with pytest.raises(ConfigError) as err:   # 8x8 student map onto a 32x32 teacher map
        _build("fitnet", "resnet14", "resnet8", {"student_layer": "layer3", "teacher_layer": "layer1"})
    assert err.value.key == "distiller.student_layer"
    assert "(64, 8, 8)" in str(err.value) and "(16, 32, 32)" in str(err.value)
    assert "distiller.teacher_layer" in str(err.value)


def test_unknown_layer_names_the_option_and_close_matches():
    with pytest.raises(ConfigError) as err:
        _build("fitnet", "resnet14", "resnet8", {"student_layer": "layr2"})
    assert err.value.key == "distiller.student_layer" and "layer2" in str(err.value)


def test_models_without_stage_names_need_explicit_layers():
    with pytest.raises(ConfigError) as err:
        _build("at", "resnet8", "tv_mobilenet_v3_small")
    assert err.value.key == "distiller.student_layers"
    d, _, _ = _build("at", "resnet8", "tv_mobilenet_v3_small",
                     {"student_layers": ["features.1", "features.3", "features.8"]})
    _, losses = d(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), CTX)
    assert torch.isfinite(losses["at"])


@pytest.mark.parametrize("s_hw,t_hw,kind", [((16, 16), (8, 8), "Conv2d"),
                                            ((8, 8), (16, 16), "ConvTranspose2d"),
                                            ((8, 8), (8, 8), "Conv2d"), ((10, 9), (8, 8), "Conv2d")])
def test_conv_regressor_maps_student_maps_onto_teacher_maps(s_hw, t_hw, kind):
    connector = build_connector((2, 5, *s_hw), (2, 7, *t_hw), keys=("a", "b"))
    assert isinstance(connector, ConvRegressor) and type(connector.conv).__name__ == kind
    assert connector(torch.randn(2, 5, *s_hw)).shape == (2, 7, *t_hw)


def test_vector_features_get_a_linear_connector():
    connector = build_connector((2, 64), (2, 256), keys=("a", "b"))
    assert connector(torch.randn(3, 64)).shape == (3, 256)
