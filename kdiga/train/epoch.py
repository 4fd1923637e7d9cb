"""One epoch of training: the criterion's loss parts, their check, the SGD step, the means."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdiga.distributed import DistInfo, all_reduce_weighted_mean, current
from kdiga.errors import KdigaError
from kdiga.progress import Tracker
from kdiga.train.checkpoint import Position
from kdiga.train.config import TrainConfig
from kdiga.train.steps import Step


class NonFiniteLossError(KdigaError, FloatingPointError):
    """The loss was NaN or infinite; nothing of that epoch was checkpointed."""

    def __init__(self, epoch: int, batch: int, parts: Mapping[str, float]) -> None:
        self.epoch, self.batch, self.parts = epoch, batch, dict(parts)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.parts.items())
        super().__init__(
            f"non-finite loss at epoch {epoch}, batch {batch} ({shown}); the last checkpoint "
            "(the end of an earlier epoch, or an earlier step with checkpoint_every) is "
            "unchanged: lower the learning rate or loss weights"
        )


def _step_record(
    parts: Any, n_local: int, info: DistInfo, epoch: int, b: int
) -> tuple[dict[str, float], int]:
    """(loss parts as floats, samples in the global batch) of step ``b``: the criterion's
    ``parts`` checked, and under DDP their global-batch means; NonFiniteLossError for a NaN or
    infinite part."""
    if not isinstance(parts, Mapping) or "loss" not in parts:
        raise ValueError(f"criterion must return a dict with a 'loss' key; got {type(parts)}")
    if not parts["loss"].requires_grad:
        raise ValueError("criterion's 'loss' has no gradient (computed under no_grad?)")
    names = list(parts)
    values = torch.stack([parts[k].detach().float().reshape(()) for k in names])
    n_global = n_local
    if info.is_distributed:  # global-batch means; a NaN on any rank stops every rank
        values, total = all_reduce_weighted_mean(values, n_local)
        n_global = round(total)
    values = values.tolist()
    record = dict(zip(names, values, strict=True))
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteLossError(epoch + 1, b, record)
    return record, n_global


def run_epoch(
    student: nn.Module,
    criterion: Callable[..., dict[str, Tensor]],
    teacher: nn.Module | None,
    source: tuple[int, Iterator[Step], Callable[[], Tensor | None]],
    cfg: TrainConfig,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    on_batch: Callable[[dict], None] | None,
    pos: Position,
    save: Callable[[Position], None] | None = None,
    track: Tracker | None = None,
) -> dict[str, float]:
    """One pass over the data from ``pos``; returns the sample-weighted mean of each loss part.

    Under DDP this rank trains on its slice of each global batch and the returned means (and
    ``on_batch`` records) are over the global batch, identical on all ranks. With ``save`` and
    ``cfg.checkpoint_every`` > 0, ``save(position)`` runs after every that many steps (not
    after the last one: the end of the epoch is checkpointed by the caller). ``track`` counts
    the run's steps (epoch ``epoch`` begins at ``epoch * num_batches``).
    """
    num_batches, steps, aug_state = source
    info = current()
    cuda = device.type == "cuda"
    sums, seen = dict(pos.sums), pos.seen
    where = f"epoch {epoch + 1}/{cfg.epochs}, step"
    if track is not None:
        track.total = cfg.epochs * num_batches
        track.at(epoch * num_batches + pos.batch, f"{where} {pos.batch}/{num_batches}")
    student.train()
    for b, (x, y, kwargs, n_local) in enumerate(steps, start=pos.batch):
        if cuda and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and cfg.amp):
            parts = criterion(student, teacher, x, y, **kwargs)
        record, n_global = _step_record(parts, n_local, info, epoch, b)
        # DDP averages gradients over ranks: W·B_r/B keeps an uneven last batch exact
        scale = n_local * info.world_size / n_global
        (parts["loss"] if scale == 1 else parts["loss"] * scale).backward()
        optimizer.step()
        for k, v in record.items():
            sums[k] = sums.get(k, 0.0) + v * n_global
        seen += n_global
        if on_batch is not None:
            on_batch({"epoch": epoch + 1, "batch": b, "num_batches": num_batches, **record})
        done, every = b + 1, cfg.checkpoint_every
        if track is not None:
            track.at(epoch * num_batches + done, f"{where} {done}/{num_batches}")
        if save is not None and every and done % every == 0 and done < num_batches:
            save(Position(done, dict(sums), seen, aug_state()))
    if seen == 0:
        raise ValueError(f"epoch {epoch + 1} had no batch to train on")
    return {k: v / seen for k, v in sums.items()}
