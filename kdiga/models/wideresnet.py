"""``wrn_34_10``: WideResNet-34-10 in the key layout of the TRADES checkpoint.

TRADES (Zhang et al. 2019, yaodongyu/TRADES ``models/wideresnet.py``) names its parameters::

    conv1.weight
    block{1,2,3}.layer.{i}.bn1.*, .conv1.weight, .bn2.*, .conv2.weight
    block{1,2,3}.layer.0.convShortcut.weight      (only where the width changes)
    bn1.*, fc.weight, fc.bias

Its original file also builds ``sub_block1``, a copy of ``block1`` that ``forward`` never
uses, so ``model_cifar_wrn.pt`` (RobustBench ``Zhang2019Theoretically``) carries
``sub_block1.*`` keys. Here those keys are accepted and dropped on load (a load pre-hook), so
that checkpoint loads with ``strict=True`` and the net has no unused parameters (which DDP
would reject). The forward is TRADES's pre-activation block: where the width changes the
shortcut takes the activated input. No normalisation (mean 0, std 1) for TRADES weights.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

UNUSED_PREFIXES = ("sub_block1.",)


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with a 1x1 ``convShortcut`` on width change."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.equal_in_out else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """``n`` wide blocks in ``.layer`` (the TRADES name); the first one may stride."""

    def __init__(
        self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, s, drop_rate)
                for i, s in enumerate([stride] + [1] * (n - 1))
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def _drop_unused_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Load pre-hook: remove TRADES's unused ``sub_block1.*`` entries before the strict check."""
    dropped = [k for k in state_dict if k.startswith(tuple(prefix + p for p in UNUSED_PREFIXES))]
    for key in dropped:
        del state_dict[key]
    if dropped:
        logger.debug("dropped %d unused TRADES keys (sub_block1.*)", len(dropped))


class WideResNet(nn.Module):
    """WideResNet-depth-k (Zagoruyko & Komodakis 2016), TRADES layout: [B, C, H, W] -> [B, N]."""

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}"
            )
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        self.register_load_state_dict_pre_hook(_drop_unused_keys)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, N] for inputs [B, C, H, W] (8x8 final map at 32x32, pooled globally)."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wrn_34_10(
    num_classes: int,
    in_chans: int,
    image_size: int,
    *,
    depth: int = 34,
    widen_factor: int = 10,
    drop_rate: float = 0.0,
) -> WideResNet:
    """WRN-34-10 (6.66 GMACs per 32x32 image); ``depth``/``widen_factor`` shrink it for tests."""
    return WideResNet(depth, widen_factor, num_classes, in_chans, drop_rate)
