"""Model zoo: names, parameter counts, widths, output shapes, errors."""
from __future__ import annotations

import pytest
import torch

from kcd.errors import KcdError
from kcd.features import FeatureTap, resolve_layer
from kcd.models import MODELS, ModelSpec, build_model, model_names, model_spec


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered_names() -> None:
    cifar = [f"resnet{d}{s}" for d in (20, 32, 44, 56, 110) for s in ("", "_0.5x")]
    assert set(model_names()) == set(cifar) | {"resnet18", "resnet50", "resnet152", "mobilenetv2_0.5x"}
    assert all(isinstance(MODELS.get(name), ModelSpec) for name in model_names())


@pytest.mark.parametrize("name, published", [("resnet20", 0.27e6), ("resnet56", 0.85e6), ("resnet110", 1.7e6)])
def test_cifar_parameter_counts_match_published(name: str, published: float) -> None:
    count = n_params(build_model(name, num_classes=10))
    assert abs(count - published) / published < 0.02, count


def test_half_width_stage_widths() -> None:
    half = build_model("resnet20_0.5x")
    full = build_model("resnet20")
    assert half.conv1.out_channels == 8
    x = torch.randn(2, 3, 32, 32)
    with FeatureTap(half, ["layer1", "layer2", "layer3"]) as tap_half, FeatureTap(full, ["layer3"]) as tap_full:
        half(x)
        full(x)
        widths = [tap_half.features[k].shape[1] for k in ("layer1", "layer2", "layer3")]
        assert widths == [8, 16, 32]
        assert tap_full.features["layer3"].shape == (2, 64, 8, 8)


def test_cifar_structure_mirrors_torchvision() -> None:
    model = build_model("resnet32")
    children = [name for name, _ in model.named_children()]
    assert children == ["conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc"]
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 5
    block = model.layer3[0]
    assert {"conv1", "bn1", "relu", "conv2", "bn2", "shortcut"} <= {n for n, _ in block.named_children()}
    assert isinstance(model.avgpool, torch.nn.AdaptiveAvgPool2d)


@pytest.mark.parametrize("name", ["resnet20", "resnet20_0.5x", "resnet44"])
def test_cifar_output_shape(name: str) -> None:
    model = build_model(name, num_classes=100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv2_0.5x"])
def test_torchvision_models_build_with_class_count(name: str) -> None:
    model = build_model(name, num_classes=7)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_resnet152_builds() -> None:
    model = build_model("resnet152", num_classes=100)
    assert model.fc.out_features == 100
    assert len(model.layer3) == 36


def test_specs() -> None:
    assert model_spec("resnet56").default_layer == "layer3"
    assert model_spec("resnet56").family == "cifar" and model_spec("resnet56").input_size == 32
    assert model_spec("resnet50").default_layer == "layer4"
    assert model_spec("mobilenetv2_0.5x").default_layer == "features.18"
    assert model_spec("resnet18").family == "imagenet" and model_spec("resnet18").input_size == 224


@pytest.mark.parametrize("name", model_names())
def test_default_layers_resolve(name: str) -> None:
    spec = model_spec(name)
    model = build_model(name)
    resolve_layer(model, spec.default_layer)
    resolve_layer(model, spec.default_layer + ":pre_relu")


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(KcdError) as info:
        build_model("resnet21")
    assert "resnet20" in str(info.value) and "mobilenetv2_0.5x" in str(info.value)
    with pytest.raises(KcdError, match="resnet56"):
        model_spec("nope")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_classes(bad: object) -> None:
    with pytest.raises(KcdError, match="num_classes"):
        build_model("resnet20", num_classes=bad)  # type: ignore[arg-type]


def test_bad_depth() -> None:
    from kcd.models.cifar_resnet import CifarResNet

    with pytest.raises(KcdError, match="6n\\+2"):
        CifarResNet(21)


@pytest.mark.parametrize("name", model_names())
def test_registry_channels_match_the_built_model(name: str) -> None:
    """The registry's light channel table (read by config validation without torch) is what
    a forward pass of the built model gives at its distillation layer."""
    from kcd.features import feature_shapes

    spec = model_spec(name)
    size = 32 if spec.family == "cifar" else 64
    shapes = feature_shapes(build_model(name, 10), [spec.default_layer], size)
    assert shapes[spec.default_layer][0] == spec.channels
