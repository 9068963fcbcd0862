"""Model zoo: CIFAR ResNets and torchvision ImageNet models, looked up by name.

Each name maps to a :class:`ModelSpec` that also records the layer the paper distils
(``default_layer``, a :mod:`kcd.features` layer spec) and the input resolution.

- CIFAR ResNets (``resnet20/32/44/56/110`` and their ``_0.5x`` variants): ``"layer3"``,
  the output of the third residual stage (paper Section 4.3).
- ResNet-18/50/152: ``"layer4"``, the last residual stage.
- MobileNetV2-0.5x: ``"features.18"``, the last 1x1 convolution (1280 channels).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kcd.errors import KcdError
from kcd.registry import Registry

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DETECTOR_BACKBONES", "MODELS", "ModelSpec", "build_model", "model_names", "model_spec"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a named model and where the paper taps its features.

    The registry is light: it imports no torch, so the workflow can validate a config (names,
    layers, channel counts) without it; :meth:`build` imports the model's module.

    Attributes:
        name: registry name, e.g. ``"resnet20_0.5x"``.
        builder: ``"module:function"`` of a callable taking ``num_classes`` (and ``kwargs``)
            and returning a fresh, randomly initialised model.
        family: ``"cifar"`` (32x32 inputs) or ``"imagenet"`` (224x224 inputs).
        default_layer: the distillation layer as a :mod:`kcd.features` layer spec.
        input_size: side of the square training input in pixels.
        channels: channels of ``default_layer`` (checked against the built model in a test).
        kwargs: extra keyword arguments of the builder.
    """

    name: str
    builder: str
    family: Literal["cifar", "imagenet"]
    default_layer: str
    input_size: int
    channels: int
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, num_classes: int) -> nn.Module:
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)(num_classes=num_classes, **self.kwargs)


MODELS: Registry[ModelSpec] = Registry("model")

DETECTOR_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
"""Backbones of the Faster R-CNN + FPN detectors (:mod:`kcd.detection`): torchvision ResNets."""


def _register_builtin_models() -> None:
    """Register the CIFAR ResNets (full and half width) and the torchvision models."""
    for depth in (20, 32, 44, 56, 110):
        for suffix, width in (("", 1.0), ("_0.5x", 0.5)):
            name = f"resnet{depth}{suffix}"
            MODELS.register(name, ModelSpec(
                name, "kcd.models.cifar_resnet:CifarResNet", "cifar", "layer3", 32,
                channels=int(64 * width), kwargs={"depth": depth, "width_mult": width}))
    for name, builder, layer, channels in (
        ("resnet18", "resnet18", "layer4", 512),
        ("resnet50", "resnet50", "layer4", 2048),
        ("resnet152", "resnet152", "layer4", 2048),
        ("mobilenetv2_0.5x", "mobilenetv2_half", "features.18", 1280),
    ):
        MODELS.register(name, ModelSpec(name, f"kcd.models.imagenet:{builder}", "imagenet",
                                        layer, 224, channels=channels))


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
    return spec.build(num_classes)
