"""The wrapper every kdiga model wears: input normalisation inside the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def resolve_stats(
    mean: Sequence[float] | Tensor | None,
    std: Sequence[float] | Tensor | None,
    in_chans: int,
    default: tuple[Sequence[float], Sequence[float]] | None = None,
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std as two lists of length ``in_chans``.

    A missing value takes ``default`` (a pair), or the identity (mean 0, std 1). A single value
    is repeated over the channels; a default whose length differs from ``in_chans`` (an RGB
    pretrained config on a grey model) is averaged first.
    """
    if default is None:
        default = ((0.0,) * in_chans, (1.0,) * in_chans)

    def one(
        values: Sequence[float] | Tensor | None, fallback: Sequence[float], what: str
    ) -> list[float]:
        if values is None:
            fallback = [float(v) for v in fallback]
            if len(fallback) != in_chans:
                fallback = [sum(fallback) / len(fallback)]
            values = fallback
        if isinstance(values, Tensor):
            values = values.flatten().tolist()
        try:
            out = [float(v) for v in values]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what} must be a sequence of numbers, got {values!r}") from exc
        if len(out) == 1:
            out = out * in_chans
        if len(out) != in_chans:
            raise ValueError(
                f"{what} has {len(out)} values; allowed: 1 or in_chans={in_chans} values"
            )
        return out

    m = one(mean, default[0], "mean")
    s = one(std, default[1], "std")
    if any(not v > 0 for v in s):
        raise ValueError(f"std must be positive in every channel, got {s}")
    return m, s


class NormalizedModel(nn.Module):
    """An architecture with its input normalisation: ``forward(x) = net((x - mean) / std)``.

    Inputs are images in [0, 1], shape [B, C, H, W]; outputs are logits [B, N]. Attacks,
    radii and input gradients are therefore all in pixel space.

    Attributes:
        net: the raw architecture (its ``state_dict`` is what checkpoints hold).
        mean, std: buffers [1, C, 1, 1].
        arch: registry name (``"resnet18"``, ``"timm:vit_small_patch16_224"``, ...).
        num_classes, in_chans, image_size: what the model was built for.
        build_kwargs: the extra keyword arguments given to the builder (kept by
            ``save_model`` so that ``load_model`` rebuilds the same architecture).
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        arch: str,
        num_classes: int,
        in_chans: int,
        image_size: int,
        build_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        mean_l, std_l = resolve_stats(mean, std, in_chans)
        self.net = net
        self.register_buffer("mean", torch.tensor(mean_l, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std_l, dtype=torch.float32).view(1, -1, 1, 1))
        self.arch = arch
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.image_size = int(image_size)
        self.build_kwargs = dict(build_kwargs or {})

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, N] for images ``x`` [B, C, H, W] in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{self.arch} expects images [B, {self.in_chans}, H, W], got {tuple(x.shape)}"
            )
        return self.net((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, num_classes={self.num_classes}, in_chans={self.in_chans}, "
            f"image_size={self.image_size}, mean={self.mean.flatten().tolist()}, "
            f"std={self.std.flatten().tolist()}"
        )
