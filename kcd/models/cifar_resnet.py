"""CIFAR ResNets (He et al. 2016, Section 4.2) with an optional width multiplier.

A network of depth ``6n + 2`` is a 3x3 stem convolution followed by three stages of
``n`` basic blocks with 16, 32 and 64 channels (times ``width_mult``; ResNet20-0.5x of
the KCD paper has 8/16/32 channels and an 8-channel stem), global average pooling and a
linear classifier.

Shortcut: where a block changes shape (first block of stages 2 and 3), the shortcut is a
strided 1x1 convolution followed by batch norm (projection, option B of the ResNet
paper applied only at the two shape changes); all other shortcuts are identities. This is
the shortcut of the common PyTorch CIFAR ResNets used in distillation work. It adds 2,752
parameters to the full-width networks compared with the parameter-free zero-padding
shortcut (option A), so the counts with 10 classes still match the published ones:
ResNet20 272,474 (0.27M), ResNet56 855,770 (0.85M), ResNet110 1,730,714 (1.7M).

Module names follow torchvision's ResNet (``conv1, bn1, relu, layer1..layer3, avgpool,
fc``; blocks with ``conv1, bn1, relu, conv2, bn2``), so feature taps such as
``"layer3"`` and ``"layer3:pre_relu"`` mean the same thing on both model families.
"""
from __future__ import annotations

import torch
from torch import nn

from kcd.errors import KcdError


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection, structured like torchvision's.

    One ``nn.ReLU`` module (``self.relu``) is applied twice: after ``bn1`` and after the
    residual addition, so the input of its last call is the block's pre-activation output.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: stem, three stages of ``(depth - 2) / 6`` basic blocks, head.

    Args:
        depth: total number of weighted layers, ``6n + 2`` with ``n >= 1`` (20, 32, 44, 56, 110).
        num_classes: size of the classifier output.
        width_mult: multiplier on the stage widths 16/32/64 (0.5 gives 8/16/32).
    """

    def __init__(self, depth: int, num_classes: int = 100, width_mult: float = 1.0) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise KcdError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56, ...), got {depth}")
        if width_mult <= 0:
            raise KcdError(f"CIFAR ResNet width multiplier must be positive, got {width_mult}")
        blocks_per_stage = (depth - 2) // 6
        widths = [max(1, int(round(w * width_mult))) for w in (16, 32, 64)]

        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        stages = []
        for index, planes in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if block_index == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))

