"""ResNet-20/32/56 for CIFAR (He et al. 2016, section 4.2).

Three stages of ``n`` basic blocks with 16-32-64 channels, BatchNorm after
every conv, global average pooling and a Linear classifier (6n+2 layers).

Shortcut when the shape changes (stage 2 and 3 entry):
* ``"B"`` (default): 1x1 strided conv + BatchNorm projection, as most DST
  codebases (RigL, ITOP) use; these 1x1 convs are sparsified like any conv;
* ``"A"``: the parameter-free option of the original paper (stride-2
  subsampling and zero-padded channels).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SHORTCUTS = ("A", "B")


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = 0
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            else:
                self.shortcut = _SubsampleAndPad(stride, planes - in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _SubsampleAndPad(nn.Module):
    def __init__(self, stride: int, extra: int):
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: str = "B", width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; choose one of {list(SHORTCUTS)}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(num_classes: int = 10, shortcut: str = "B", width: int = 16) -> CifarResNet:
    return CifarResNet(20, num_classes, shortcut=shortcut, width=width)


def resnet32(num_classes: int = 10, shortcut: str = "B", width: int = 16) -> CifarResNet:
    return CifarResNet(32, num_classes, shortcut=shortcut, width=width)


def resnet56(num_classes: int = 10, shortcut: str = "B", width: int = 16) -> CifarResNet:
    return CifarResNet(56, num_classes, shortcut=shortcut, width=width)


# Config keys these constructors read (build_model passes them): constructor parameter <- config key.
for _fn in (resnet20, resnet32, resnet56):
    _fn.config_options = {"shortcut": "shortcut"}
