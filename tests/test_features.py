"""Forward-hook feature extraction on the zoo models."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from distill.errors import ConfigError
from distill.features import FeatureHooks, feature_shapes, unwrap_model
from distill.models import create_model, list_models, model_spec

# the CIFAR zoo (image models; the text models have no stages)
ZOO = [n for n in list_models() if not n.startswith(("tv_", "timm_"))
       and model_spec(n).inputs == "images"]


@functools.lru_cache(maxsize=None)
def built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=10).eval()


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", ZOO)
def test_stage_and_pooled_features(name):
    model, spec = built(name), model_spec(name)
    modules = dict(model.named_modules())
    assert spec.stages and all(s in modules for s in spec.stages)
    classifier = modules[spec.classifier]
    assert isinstance(classifier, nn.Linear)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        with FeatureHooks(model, [*spec.stages, f"{spec.classifier}:in"]) as hooks:
            hooked = model(x)
    assert torch.equal(plain, hooked)  # hooks do not change the output
    for stage in spec.stages:
        assert hooks.features[stage].dim() == 4 and hooks.features[stage].shape[0] == 2
    pooled = hooks.features[f"{spec.classifier}:in"]
    assert pooled.shape == (2, classifier.in_features)
    # the pooled feature really is what the classifier sees
    assert torch.allclose(classifier(pooled), plain, atol=1e-5)
    assert hook_count(model) == 0


def test_pooled_feature_equals_manual_recomputation_resnet20():
    model = built("resnet20")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), FeatureHooks(model, ["layer3", "fc:in"]) as hooks:
        model(x)
        manual = model.avgpool(hooks.features["layer3"]).flatten(1)
    assert torch.equal(hooks.features["fc:in"], manual)
    assert hooks.features["layer3"].shape == (2, 64, 8, 8)


def test_vgg_stage_features_are_post_relu():
    model = built("vgg8")
    with torch.no_grad(), FeatureHooks(model, ["block2"]) as hooks:
        model(torch.randn(2, 3, 32, 32))
    assert (hooks.features["block2"] >= 0).all()


def test_features_keep_grad_and_refresh_each_forward():
    model = create_model("resnet8", num_classes=10).train()
    hooks = FeatureHooks(model, ["layer2", "fc:in"])
    model(torch.randn(2, 3, 32, 32))
    first = hooks.features["layer2"]
    hooks.features["fc:in"].pow(2).mean().backward()
    assert model.conv1.weight.grad is not None
    model(torch.randn(3, 3, 32, 32))
    assert hooks.features["layer2"] is not first and hooks.features["layer2"].shape[0] == 3
    hooks.remove()
    assert hook_count(model) == 0
    model(torch.randn(1, 3, 32, 32))  # no capture after remove
    assert hooks.features["layer2"].shape[0] == 3


def test_unknown_module_lists_close_matches():
    with pytest.raises(ConfigError) as info:
        FeatureHooks(built("resnet20"), ["layer4"])
    assert info.value.key == "features"
    assert "layer1" in info.value.message or "layer3" in info.value.message
    assert hook_count(built("resnet20")) == 0


def test_unwraps_dataparallel_and_compiled_wrappers():
    model = create_model("resnet8", num_classes=10).eval()
    wrapped = nn.DataParallel(model)  # on CPU it just calls the module
    assert unwrap_model(wrapped) is model
    with FeatureHooks(wrapped, ["layer1", "fc:in"]) as hooks, torch.no_grad():
        wrapped(torch.randn(1, 3, 32, 32))
    assert set(hooks.features) == {"layer1", "fc:in"}

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, x):
            return self._orig_mod(x)

    assert unwrap_model(Compiled(wrapped)) is model


def test_feature_shapes_restores_modes():
    model = create_model("wrn_16_1", num_classes=10).train()
    model.block1.eval()  # a mixed state must survive
    shapes = feature_shapes(model, ["block1", "block3", "fc:in"], (1, 3, 32, 32))
    assert shapes == {"block1": (1, 16, 32, 32), "block3": (1, 64, 8, 8), "fc:in": (1, 64)}
    assert model.training and not model.block1.training and model.block2.training
    assert hook_count(model) == 0


def test_feature_shapes_reports_modules_that_did_not_run():
    # vgg's pool3 only runs for 64x64 inputs
    with pytest.raises(ConfigError):
        feature_shapes(built("vgg8"), ["pool3"], (1, 3, 32, 32))
    assert feature_shapes(built("vgg8"), ["pool3"], (1, 3, 64, 64))["pool3"] == (1, 512, 4, 4)
