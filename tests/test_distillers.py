import pytest
import torch

from distill.errors import ConfigError
from distill.method import StepContext, build_distiller
from distill.models import create_model

CTX = StepContext(epoch=0, step=0, epochs=1)


pytestmark = pytest.mark.fast   # the inner-loop tier (make test-fast): method options and errors


def test_kd_terms_are_the_configured_weights_times_the_losses():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet8", num_classes=10)
    d = build_distiller("kd", student, teacher, {"ce_weight": 0.25, "kd_weight": 2.0, "temperature": 3.0})
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    d.eval()
    _, losses = d(x, y, CTX)
    from distill.losses import kd_loss
    s, t = student(x), teacher(x)
    assert losses["ce"].item() == pytest.approx(0.25 * torch.nn.functional.cross_entropy(s, y).item(), rel=1e-5)
    assert losses["kd"].item() == pytest.approx(2.0 * kd_loss(s, t, 3.0).item(), rel=1e-5)


def test_none_ignores_teacher_and_has_only_ce():
    d = build_distiller("none", create_model("resnet8", num_classes=10), None, {})
    _, losses = d(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), CTX)
    assert set(losses) == {"ce"} and not d.frozen_parts() and list(d.trained_parts()) == ["student"]


def test_kd_without_teacher_is_a_config_error():
    with pytest.raises(ConfigError, match="teacher"):
        build_distiller("kd", create_model("resnet8", num_classes=10), None, {})


def test_unknown_option_names_the_key_and_close_match():
    with pytest.raises(ConfigError) as err:
        build_distiller("kd", create_model("resnet8", num_classes=10),
                        create_model("resnet8", num_classes=10), {"temprature": 2.0})
    assert err.value.key == "distiller.temprature" and "temperature" in str(err.value)


def test_mistyped_option_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        build_distiller("kd", create_model("resnet8", num_classes=10),
                        create_model("resnet8", num_classes=10), {"temperature": "hot"})
    assert err.value.key == "distiller.temperature"


def test_unknown_distiller_suggests_close_match():
    with pytest.raises(ConfigError, match="kd"):
        build_distiller("kdd", create_model("resnet8", num_classes=10), None, {})
