"""Model zoo: CIFAR ResNets and torchvision ImageNet models, looked up by name.

Each name maps to a :class:`ModelSpec` that also records the layer the paper distils
(``default_layer``, a :mod:`kcd.features` layer spec) and the input resolution.

- CIFAR ResNets (``resnet20/32/44/56/110`` and their ``_0.5x`` variants): ``"layer3"``,
  the output of the third residual stage (paper Section 4.3).
- ResNet-18/50/152: ``"layer4"``, the last residual stage.
- MobileNetV2-0.5x: ``"features.18"``, the last 1x1 convolution (1280 channels).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal

from torch import nn

from kcd.errors import KcdError
from kcd.models import imagenet
from kcd.models.cifar_resnet import CifarResNet
from kcd.registry import Registry

__all__ = ["MODELS", "ModelSpec", "build_model", "model_names", "model_spec"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a named model and where the paper taps its features.

    Attributes:
        name: registry name, e.g. ``"resnet20_0.5x"``.
        builder: callable taking ``num_classes`` and returning a fresh, randomly
            initialised model.
        family: ``"cifar"`` (32x32 inputs) or ``"imagenet"`` (224x224 inputs).
        default_layer: the distillation layer as a :mod:`kcd.features` layer spec.
        input_size: side of the square training input in pixels.
    """

    name: str
    builder: Callable[[int], nn.Module]
    family: Literal["cifar", "imagenet"]
    default_layer: str
    input_size: int


MODELS: Registry[ModelSpec] = Registry("model")


def _register_builtin_models() -> None:
    """Register the CIFAR ResNets (full and half width) and the torchvision models."""
    for depth in (20, 32, 44, 56, 110):
        for suffix, width in (("", 1.0), ("_0.5x", 0.5)):
            name = f"resnet{depth}{suffix}"
            builder = partial(CifarResNet, depth, width_mult=width)
            MODELS.register(name, ModelSpec(name, builder, "cifar", "layer3", 32))
    for name, builder, layer in (
        ("resnet18", imagenet.resnet18, "layer4"),
        ("resnet50", imagenet.resnet50, "layer4"),
        ("resnet152", imagenet.resnet152, "layer4"),
        ("mobilenetv2_0.5x", imagenet.mobilenetv2_half, "features.18"),
    ):
        MODELS.register(name, ModelSpec(name, builder, "imagenet", layer, 224))


_register_builtin_models()


def model_names() -> list[str]:
    """Names of all registered models, in registration order."""
    return MODELS.names()


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name``; unknown names raise :class:`KcdError`."""
    return MODELS.get(name)


def build_model(name: str, num_classes: int = 100) -> nn.Module:
    """Build a fresh, randomly initialised model ``name`` with ``num_classes`` outputs.

    Raises:
        KcdError: unknown ``name`` (the message lists the known ones) or ``num_classes < 1``.
    """
    spec = model_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KcdError(f"num_classes must be a positive integer, got {num_classes!r}")
    return spec.builder(num_classes)
