"""ImageNet-size models from torchvision, always randomly initialised (``weights=None``).

The KCD paper uses ResNet-18/50/152 and MobileNetV2-0.5x (torchvision's
``mobilenet_v2(width_mult=0.5)``; its last 1x1 convolution keeps 1280 channels).
"""
from __future__ import annotations

from torch import nn
from torchvision import models as tvm


def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision ResNet-18 (BasicBlock), no pretrained weights."""
    return tvm.resnet18(weights=None, num_classes=num_classes)


def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision ResNet-50 (Bottleneck), no pretrained weights."""
    return tvm.resnet50(weights=None, num_classes=num_classes)


def resnet152(num_classes: int = 1000) -> nn.Module:
    """torchvision ResNet-152 (Bottleneck), no pretrained weights."""
    return tvm.resnet152(weights=None, num_classes=num_classes)


def mobilenetv2_half(num_classes: int = 1000) -> nn.Module:
    """torchvision MobileNetV2 with width multiplier 0.5, no pretrained weights."""
    return tvm.mobilenet_v2(weights=None, width_mult=0.5, num_classes=num_classes)
