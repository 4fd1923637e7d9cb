"""What a training run is given: its settings (:class:`TrainConfig`) and its data, in memory
(checked by :func:`check_data`) or a :class:`BatchStream`, and the checks of how they combine."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from kdiga.data import AUGMENTATIONS
from kdiga.distributed import check_same_on_all_ranks


class BatchStream(Protocol):
    """Training batches that arrive decoded and augmented, e.g. streamed from WebDataset shards
    by DataLoader workers (``kdiga.stream``), for data that is not held in memory.

    ``batches(epoch, start_batch)`` yields this process's ``(x, y)`` of each step of epoch
    ``epoch`` (0-based) from step ``start_batch`` on: ``x`` uint8 (or float in [0, 1])
    ``[b, C, H, W]``, ``y`` int ``[b]``. It must be a pure function of its arguments (the
    order and the augmentation seeded by the epoch, not by wall-clock or worker timing), so
    that a run resumed mid-epoch sees exactly the batches an uninterrupted one sees, and
    under DDP every rank must yield ``steps_per_epoch`` batches of its own samples.
    """

    steps_per_epoch: int

    def batches(self, epoch: int, start_batch: int = 0) -> Iterable[tuple[Tensor, Tensor]]: ...


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training run (the paper's values live in the presets).

    The learning rate is ``lr * lr_gamma ** (number of milestones <= epoch)`` (MultiStepLR,
    epochs counted from 0); it does not depend on ``epochs``, so a run can be extended.
    ``amp`` (bf16 autocast of the forward) and ``channels_last`` apply on CUDA only.
    ``crop_padding`` is the padding of the "crop"/"crop_flip" augmentations (4 on CIFAR-10's
    32 px; less on 16 px digits). ``drop_last`` drops a final partial batch (train-mode
    BatchNorm fails on a batch of one). Under DDP (see :mod:`kdiga.distributed`)
    ``batch_size`` is the global batch, split over the ranks, and ``sync_bn`` synchronises
    BatchNorm statistics across them (CUDA only; no effect on one process).
    ``compile_teacher`` runs the teacher through ``torch.compile`` (its forward and input
    gradient: first order only, the student's double backward is never compiled); CUDA only,
    elsewhere a no-op with a log line. It pays a compilation at the start of each run for a
    faster teacher per step: see :func:`maybe_compile_teacher`. ``checkpoint_every`` > 0 also
    checkpoints every that many steps within an epoch (with the epoch's position), so a run
    killed mid-epoch loses at most that many steps; 0 checkpoints at the end of epochs only.
    """

    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    nesterov: bool = False
    seed: int = 0
    augment: str = "none"
    crop_padding: int = 4
    amp: bool = True
    channels_last: bool = True
    drop_last: bool = False
    sync_bn: bool = False
    compile_teacher: bool = False
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        checks = [
            ("epochs", self.epochs >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "> 0 and finite"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("lr_gamma", 0 < self.lr_gamma <= 1, "in (0, 1]"),
            (
                "milestones",
                all(m >= 1 for m in self.milestones)
                and all(a < b for a, b in zip(self.milestones, self.milestones[1:], strict=False)),
                "strictly increasing epochs >= 1",
            ),
            ("augment", self.augment in AUGMENTATIONS, f"one of {AUGMENTATIONS}"),
            ("crop_padding", self.crop_padding >= 0, ">= 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0: at the end of epochs)"),
            ("nesterov", not self.nesterov or self.momentum > 0, "False when momentum is 0"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{key}={getattr(self, key)!r}; allowed: {allowed}")


def check_data(images: Tensor, labels: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Images [N, C, H, W] (uint8 or float) and int labels [N], N > 0; labels as int64."""
    if images.ndim != 4:
        raise ValueError(f"{what} images must be [N, C, H, W]; got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"{what} images must be uint8 or float in [0, 1]; got {images.dtype}")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.numel() != images.shape[0] or labels.is_floating_point():
        raise ValueError(
            f"{what} labels must be int [N] with N={images.shape[0]}; "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError(f"{what} set is empty")
    return images, labels.long()


def check_stream(
    stream: BatchStream,
    images: Tensor | None,
    labels: Tensor | None,
    cfg: TrainConfig,
    teacher_cache: Callable[[Tensor], Any] | None,
    batch_source: Callable[[Tensor, int], tuple[Tensor, Any]] | None,
) -> None:
    """A stream replaces the in-memory data and its augmentation: refuse a mix of the two."""
    if images is not None or labels is not None:
        raise ValueError("pass either images and labels or stream=, not both")
    if cfg.augment != "none":
        raise ValueError(
            f"stream= batches come augmented by their loader: augment={cfg.augment!r} needs "
            "augment='none'"
        )
    if teacher_cache is not None or batch_source is not None:
        raise ValueError("stream= takes no teacher_cache or batch_source (signals need indices)")
    steps = getattr(stream, "steps_per_epoch", None)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"stream.steps_per_epoch must be an int >= 1, got {steps!r}")
    check_same_on_all_ranks(steps, "stream.steps_per_epoch (every rank must take as many steps)")


def check_inputs(
    criterion: Callable[..., Any],
    images: Tensor | None,
    labels: Tensor | None,
    cfg: TrainConfig,
    stream: BatchStream | None,
    val: tuple[Tensor, Tensor] | None,
    teacher_cache: Callable[[Tensor], Any] | None,
    batch_source: Callable[[Tensor, int], tuple[Tensor, Any]] | None,
) -> tuple[Tensor | None, Tensor | None, tuple[Tensor, Tensor] | None]:
    """``fit``'s data and how it combines with ``cfg`` and the criterion: (images, labels,
    val) checked (labels as int64), or ValueError saying what is wrong."""
    if stream is not None:
        check_stream(stream, images, labels, cfg, teacher_cache, batch_source)
    else:
        images, labels = check_data(images, labels, "train")
    if val is not None:
        val = check_data(*val, "val")
    if stream is None and cfg.drop_last and labels.numel() < cfg.batch_size:
        raise ValueError(
            f"drop_last with N={labels.numel()} < batch_size={cfg.batch_size} leaves no batch"
        )
    if teacher_cache is not None and cfg.augment != "none":
        raise ValueError(
            f"teacher_cache holds signals of unaugmented images; augment={cfg.augment!r} "
            "needs augment='none' or no cache"
        )
    if batch_source is not None and (teacher_cache is not None or cfg.augment != "none"):
        raise ValueError(
            "batch_source augments x itself and returns its teacher signals: it needs "
            f"augment='none' (got {cfg.augment!r}) and no teacher_cache"
        )
    cached = teacher_cache is not None or batch_source is not None
    if cached and getattr(criterion, "accepts_teacher_cache", True) is False:
        raise ValueError(
            f"criterion {getattr(criterion, 'method', criterion)!r} cannot use cached teacher "
            "signals (accepts_teacher_cache is False, e.g. kdiga_arda needs the teacher at "
            "x+delta): train it with teacher= and no teacher_cache/batch_source"
        )
    return images, labels, val
