"""Every method x a student from each model family: a few real optimizer steps, then what trained
and what did not. Plus the layer and connector rules of the feature methods."""
import pytest
import torch
import torch.nn.functional as F

from distill.distillers import DISTILLERS, BuildInfo, StepContext, build_distiller
from distill.distillers.connectors import ConvRegressor, build_connector
from distill.errors import ConfigError
from distill.losses import at_loss, fitnet_loss, kd_loss, rkd_loss
from distill.models import create_model, model_spec

CTX = StepContext(epoch=0, step=0, epochs=1)
# one student per family of the model zoo, each with a teacher of another size or family
PAIRS = [("resnet14", "resnet8"), ("wrn_16_2", "wrn_16_1"), ("vgg11", "vgg8"),
         ("resnet8x4", "mobilenetv2"), ("resnet8x4", "shufflenetv1"), ("resnet14", "shufflenetv2"),
         ("vgg8", "resnet18"), ("resnet8", "tv_resnet18")]
METHODS = ["none", "kd", "dkd", "fitnet", "at", "rkd", "takd", "noisy_kd"]
OPTIONS = {"takd": {"assistants": ["resnet8"]}}   # the chain itself is built by the app
# torchvision's ResNet downsamples 32x32 inputs 4x in its stem: its middle stage (4x4) is
# bridged to the teacher's 8x8 layer3 (a 16x16 layer2 is too far: a clear error, tested below)
PAIR_OPTIONS = {("fitnet", "tv_resnet18"): {"teacher_layer": "layer3"}}


def _build(method, teacher_name, student_name, options=None, classes=10):
    torch.manual_seed(0)
    student = create_model(student_name, num_classes=classes)
    teacher = create_model(teacher_name, num_classes=classes)
    info = BuildInfo(model_spec(student_name), model_spec(teacher_name), (3, 32, 32))
    options = {**OPTIONS.get(method, {}), **PAIR_OPTIONS.get((method, student_name), {}),
               **(options or {})}
    return build_distiller(method, student, teacher, options, info), student, teacher


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_every_method_is_registered():
    assert set(METHODS) <= set(DISTILLERS.list())


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_student_and_connectors_only(method, teacher_name, student_name):
    distiller, student, teacher = _build(method, teacher_name, student_name)
    teacher_before = _snapshot(teacher)
    student_before = _snapshot(student)
    connector_before = {k: v.clone() for k, v in distiller.connector_state_dict().items()}
    params = distiller.trainable_parameters()
    assert {id(p) for p in params} == (
        {id(p) for p in student.parameters()}
        | {id(p) for n, p in distiller.named_parameters() if not n.startswith(("student.", "teacher."))})
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    distiller.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for step in range(2):
        logits, losses = distiller(x, y, StepContext(epoch=5, step=step, epochs=10))
        assert logits.shape == (4, 10) and losses
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # gradients reach the student (its classifier always) and every connector parameter ...
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        for name, p in distiller.named_parameters():
            if not name.startswith(("student.", "teacher.")):
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # ... and never the teacher
        assert all(p.grad is None for p in teacher.parameters())
        if method == "none":
            assert distiller.teacher is None
        else:
            assert not any(p.requires_grad for p in teacher.parameters())
        optimizer.step()
    assert method == "none" or not teacher.training
    after = _snapshot(teacher)   # weights AND buffers (BN statistics) bitwise unchanged
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    for k, v in distiller.connector_state_dict().items():
        if v.is_floating_point() and k.endswith("weight"):
            assert not torch.equal(connector_before[k], v), f"connector {k} did not train"
    assert distiller.connector_parameter_count() == sum(
        p.numel() for n, p in distiller.named_parameters() if not n.startswith(("student.", "teacher.")))


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
