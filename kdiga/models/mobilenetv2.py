"""CIFAR-style MobileNetV2: stride-1 stem and stride-1 second stage (total stride 8).

The inverted-residual stages are the paper's (expansion, channels, blocks, stride) table with
the stem and the 24-channel stage set to stride 1, as the common CIFAR variant does; that
variant also keeps the 1x1 expansion conv in the first stage and adds a 1x1-conv shortcut to
stride-1 blocks that change width. Parameter names follow it (``conv1``, ``layers.0.conv1``,
``layers.1.shortcut.0``, ``conv2``, ``linear``). ``width_mult`` scales the channels (rounded
to multiples of 8; the 1280-channel head only grows). About 0.09 GMACs per 32x32 image.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

#: (expansion, out channels, blocks, stride of the first block)
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
STAGES += ((6, 160, 3, 2), (6, 320, 1, 1))


def _divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never below 90% of it."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (strided), 1x1 linear projection; residual if stride 1."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        planes = expansion * in_planes
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for small images: [B, C, H, W] -> logits [B, N]."""

    def __init__(self, num_classes: int, in_chans: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        stem = _divisible(32 * width_mult)
        self.conv1 = nn.Conv2d(in_chans, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        blocks, in_planes = [], stem
        for expansion, channels, n, stride in STAGES:
            out_planes = _divisible(channels * width_mult)
            for j in range(n):
                blocks.append(
                    InvertedResidual(in_planes, out_planes, expansion, stride if j == 0 else 1)
                )
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        head = _divisible(1280 * max(1.0, width_mult))
        self.conv2 = nn.Conv2d(in_planes, head, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head)
        self.linear = nn.Linear(head, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, N] for (normalised) inputs [B, C, H, W]."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(self.layers(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def mobilenet_v2(
    num_classes: int, in_chans: int, image_size: int, *, width_mult: float = 1.0
) -> CifarMobileNetV2:
    """CIFAR MobileNetV2; ``width_mult`` < 1 for reduced-width benchmarks and tests."""
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    return CifarMobileNetV2(num_classes, in_chans, width_mult)
