"""The steps of one epoch: ``(x, y, criterion kwargs, b)`` on the device, from in-memory data
(order and augmentation seeded by ``(cfg.seed, epoch)``) or from a :class:`BatchStream`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from kdiga.data import augment, to_float
from kdiga.distributed import current, rank_slice, shard_indices
from kdiga.train.checkpoint import Position
from kdiga.train.config import BatchStream, TrainConfig
from kdiga.train.rng import epoch_generators

Step = tuple[Tensor, Tensor, dict[str, Any], int]  # x, y on the device, criterion kwargs, b


def memory_steps(
    images: Tensor,
    labels: Tensor,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device,
    teacher_cache: Callable[[Tensor], Any] | None,
    batch_source: Callable[[Tensor, int], tuple[Tensor, Any]] | None,
    pos: Position,
) -> tuple[int, Iterator[Step], Callable[[], Tensor | None]]:
    """(steps of the epoch, its steps from ``pos.batch`` on, the augmentation state getter)
    for in-memory data: order and augmentation from ``(cfg.seed, epoch)``."""
    order_gen, aug_gen = epoch_generators(cfg.seed, epoch)
    info = current()
    batches = shard_indices(
        labels.numel(), 0, 1, order_gen, batch_size=cfg.batch_size, drop_last=cfg.drop_last
    )
    if pos.aug_state is not None:
        aug_gen.set_state(pos.aug_state)

    def steps() -> Iterator[Step]:
        for whole in batches[pos.batch :]:
            part = rank_slice(whole.numel(), info.rank, info.world_size)
            idx = whole[part]
            dev_idx = idx.to(device)
            if batch_source is None:  # augmented as a global batch (same draws on every rank)
                aug_idx = dev_idx if cfg.augment == "none" else whole.to(device)
                x = augment(
                    to_float(images[aug_idx]), cfg.augment, aug_gen, padding=cfg.crop_padding
                )
                x = x if cfg.augment == "none" else x[part]
                kwargs = {} if teacher_cache is None else {"teacher_out": teacher_cache(idx)}
            else:  # x and its teacher signals come together (e.g. cached augmented views)
                x, teacher_out = batch_source(idx, epoch)
                x, kwargs = x.to(device), {"teacher_out": teacher_out}
            yield x, labels[dev_idx], kwargs, idx.numel()

    return len(batches), steps(), aug_gen.get_state


def stream_steps(
    stream: BatchStream, epoch: int, device: torch.device, pos: Position
) -> tuple[int, Iterator[Step], Callable[[], Tensor | None]]:
    """The same for a :class:`BatchStream`: its batches from ``pos.batch`` on."""

    def steps() -> Iterator[Step]:
        for x, y in stream.batches(epoch, pos.batch):
            y = torch.as_tensor(y)
            yield to_float(x.to(device, non_blocking=True)), y.to(device).long(), {}, y.numel()

    return int(stream.steps_per_epoch), steps(), lambda: None


def epoch_steps(
    stream: BatchStream | None,
    images: Tensor | None,
    labels: Tensor | None,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device,
    teacher_cache: Callable[[Tensor], Any] | None,
    batch_source: Callable[[Tensor, int], tuple[Tensor, Any]] | None,
    pos: Position,
) -> tuple[int, Iterator[Step], Callable[[], Tensor | None]]:
    """The steps of epoch ``epoch`` from ``pos``: the stream's when there is one, else the
    in-memory data's."""
    if stream is not None:
        return stream_steps(stream, epoch, device, pos)
    return memory_steps(images, labels, cfg, epoch, device, teacher_cache, batch_source, pos)
