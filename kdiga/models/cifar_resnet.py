"""CIFAR-style ResNet-18/34/50: 3x3 stride-1 stem, no max-pool, four stages, linear head.

Parameter names follow the layout of the widely shared CIFAR ResNets (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.shortcut.0``, ``linear``), so such checkpoints load as is.
``width`` (default 64) scales every stage (width, 2w, 4w, 8w) for reduced-width benchmarks.
No in-place ops, so double backward through the input gradient is safe.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a projection shortcut when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with BatchNorm and a shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: [B, C, H, W] -> logits [B, N]; total stride 8."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int,
        in_chans: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        stages = []
        for i, n in enumerate(num_blocks):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, N] for (normalised) inputs [B, C, H, W]."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _check_width(width: int) -> None:
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")


def resnet18(num_classes: int, in_chans: int, image_size: int, *, width: int = 64) -> CifarResNet:
    """CIFAR ResNet-18 (BasicBlock, 2-2-2-2); 0.56 GMACs per 32x32 image at width 64."""
    _check_width(width)
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_chans, width)


def resnet34(num_classes: int, in_chans: int, image_size: int, *, width: int = 64) -> CifarResNet:
    """CIFAR ResNet-34 (BasicBlock, 3-4-6-3)."""
    _check_width(width)
    return CifarResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_chans, width)


def resnet50(num_classes: int, in_chans: int, image_size: int, *, width: int = 64) -> CifarResNet:
    """CIFAR ResNet-50 (Bottleneck, 3-4-6-3)."""
    _check_width(width)
    return CifarResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_chans, width)
