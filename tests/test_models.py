"""The model zoo: faithful parameter counts, forward shapes, registry behaviour, tv adapters."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from distill.errors import ConfigError
from distill.models import MODELS, ModelSpec, create_model, list_models, model_spec

CIFAR_ZOO = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2", "shufflenetv1", "shufflenetv2",
    "resnet18", "resnet50",
]

# Parameter counts at 100 classes. The first ten are the published reference numbers; the rest
# were checked against an independent analytic count (layer-by-layer arithmetic, not model code)
# and, for resnet18/50, against torchvision's counts minus the 7x7 stem and the 1000-way fc.
PARAM_COUNTS = {
    "resnet8": 83_892, "resnet20": 278_324, "resnet56": 861_620, "resnet110": 1_736_564,
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860, "wrn_16_2": 703_284, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg13": 9_462_180,
    "wrn_16_1": 180_916, "wrn_40_1": 569_780, "mobilenetv2": 812_836,
    "shufflenetv1": 949_258, "shufflenetv2": 1_355_528,
    "resnet18": 11_220_132, "resnet50": 23_705_252,
}


@functools.lru_cache(maxsize=None)
def built(name: str, num_classes: int = 100) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cifar_zoo_is_registered():
    assert set(CIFAR_ZOO) <= set(list_models())


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_count_matches_reference(name):
    assert n_params(built(name)) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", CIFAR_ZOO)
def test_forward_gives_logits(name):
    model = create_model(name, num_classes=7) if name in ("resnet8", "wrn_16_1") else built(name)
    num_classes = 7 if name in ("resnet8", "wrn_16_1") else 100
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_vgg_blocks_end_with_relu_and_state_dict_keys_match_reference():
    model = built("vgg8")
    assert isinstance(model.block0[-1], nn.ReLU)
    # reference keys: block0.0 conv, block0.1 bn; the kept trailing ReLU adds no key
    keys = [k for k in model.state_dict() if k.startswith("block0.")]
    assert keys == ["block0.0.weight", "block0.0.bias", "block0.1.weight", "block0.1.bias",
                    "block0.1.running_mean", "block0.1.running_var", "block0.1.num_batches_tracked"]


def test_reference_attribute_names():
    sd = built("wrn_16_2").state_dict()
    assert "block1.layer.0.convShortcut.weight" in sd and "bn1.running_var" in sd
    sd = built("mobilenetv2").state_dict()
    assert "blocks.0.0.conv.0.weight" in sd and "classifier.0.weight" in sd and "conv2.0.weight" in sd
    assert "layer1.0.downsample.0.weight" in built("resnet8x4").state_dict()
    assert "layer2.0.shortcut.0.weight" in built("resnet18").state_dict()
    assert "conv2.weight" in built("shufflenetv2").state_dict()


def test_list_models_wildcards():
    assert list_models("wrn_*") == ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
    assert list_models("vgg*") == ["vgg11", "vgg13", "vgg16", "vgg19", "vgg8"]
    assert "tv_resnet18" in list_models("tv_*")
    assert list_models("no_such_*") == []
    assert list_models() == sorted(list_models())


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ConfigError) as info:
        create_model("resnet2")
    assert info.value.key == "model"
    assert "resnet20" in info.value.message
    with pytest.raises(ConfigError):
        model_spec("wrn_40_3")


def test_bad_kwarg_is_config_error():
    with pytest.raises(ConfigError) as info:
        create_model("resnet20", width=3)
    assert info.value.key == "model"


def test_model_spec():
    spec = model_spec("resnet20")
    assert spec == ModelSpec(("layer1", "layer2", "layer3"), "fc", 32, "resnet",
                             stem="layer1:in",
                             preact=("layer1.2:preact", "layer2.2:preact", "layer3.2:preact"))
    assert model_spec("mobilenetv2").classifier == "classifier.0"
    with pytest.raises(Exception):
        spec.classifier = "x"  # frozen
    # every registry entry carries the spec fields as meta
    assert MODELS.meta("vgg13")["classifier"] == "classifier"


def test_torchvision_resnet18():
    model = create_model("tv_resnet18", num_classes=10)
    assert model.fc.out_features == 10
    spec = model_spec("tv_resnet18")
    assert spec.classifier == "fc" and spec.stages[-1] == "layer4" and spec.input_size is None
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_torchvision_classifier_found_lazily():
    assert model_spec("tv_mobilenet_v3_small").classifier == "classifier.3"
    assert model_spec("tv_vit_b_16").classifier == "heads.head"
    # the spec points at real modules of a real instance
    model = create_model("tv_mobilenet_v2", num_classes=5)
    spec = model_spec("tv_mobilenet_v2")
    modules = dict(model.named_modules())
    assert all(s in modules for s in spec.stages)
    assert isinstance(modules[spec.classifier], nn.Linear)
    assert modules[spec.classifier].out_features == 5


def test_pretrained_download_failure_is_config_error(monkeypatch):
    import torchvision

    real = torchvision.models.get_model

    def offline(name, weights=None, **kw):
        if weights is not None:
            raise OSError("network is unreachable")
        return real(name, weights=weights, **kw)

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(ConfigError) as info:
        create_model("tv_resnet18", num_classes=10, pretrained=True)
    assert "tv_resnet18" in info.value.message
    assert torch.hub.get_dir() in info.value.hint


def test_pretrained_head_is_replaced_for_other_class_counts(monkeypatch):
    import torchvision

    real = torchvision.models.get_model

    def fake_default(name, weights=None, **kw):  # stands in for a cached ImageNet download
        return real(name, weights=None, **({"num_classes": 1000} if weights else kw))

    monkeypatch.setattr(torchvision.models, "get_model", fake_default)
    model = create_model("tv_mobilenet_v3_small", num_classes=10, pretrained=True)
    assert model.classifier[3].out_features == 10
