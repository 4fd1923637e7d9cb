"""The training loop: SGD with momentum and multi-step LR, a checkpoint every epoch, resume.

``fit`` trains a student on in-memory images with any criterion of the losses contract,
``parts = criterion(student, teacher, x, y)`` returning a dict whose ``"loss"`` is
backpropagated (paper eq. 1, 2, 5, 6, 7 live in ``kdiga.losses``).

Reproducibility: the data order and the augmentation of epoch ``e`` come from generators
seeded with ``(cfg.seed, e)`` alone; the global torch RNG (PGD random starts inside losses,
dropout) is forked for the run, seeded with ``cfg.seed`` and saved in every checkpoint. A run
killed at any point and started again on the same checkpoint path ends with the same weights,
bit for bit on CPU, as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kdiga.data import AUGMENTATIONS, augment, to_float
from kdiga.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_weighted_mean,
    barrier,
    broadcast_buffers,
    check_run,
    check_same_on_all_ranks,
    current,
    data_parallel,
    rank_seed,
    rank_slice,
    shard_indices,
)
from kdiga.errors import KdigaError
from kdiga.models import CheckpointError
from kdiga.progress import ProgressFn, Tracker
from kdiga.utils import atomic_torch_save, eval_mode

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "kdiga.train/1"
_AUG_SEED_OFFSET = 500009  # keeps the augmentation stream apart from the data-order stream
# Fields that may differ between a checkpoint and the run resuming it (they change neither
# what an epoch computes nor, on CPU, how).
_RESUMABLE_CHANGES = frozenset(
    {"epochs", "amp", "channels_last", "compile_teacher", "checkpoint_every"}
)


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


def _epoch_generators(seed: int, epoch: int) -> tuple[torch.Generator, torch.Generator]:
    """(data order, augmentation) generators of epoch ``epoch`` (0-based), for any seed >= 0:
    the generator seeds wrap at 2**64 (no wrap below seed 1.8e13: runs keep their bytes)."""
    base = (int(seed) * 1000003 + int(epoch)) % 2**64
    return (
        torch.Generator().manual_seed(base),
        torch.Generator().manual_seed((base + _AUG_SEED_OFFSET) % 2**64),
    )


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


def maybe_compile_teacher(
    teacher: nn.Module | None, enabled: bool, device: torch.device
) -> nn.Module | None:
    """``torch.compile(teacher)`` when ``enabled`` on CUDA, else ``teacher`` unchanged.

    Only the teacher's forward and its backward to x are compiled (inductor refuses double
    backward, which the teacher never needs). On CPU compiling was measured slower than eager
    (0.83x after a 66 s compile, input gradients 0.45% of their maximum apart), so there it
    is a no-op with a log line.
    """
    if not enabled or teacher is None:
        return teacher
    if device.type != "cuda":
        logger.info("compile_teacher=True is ignored on %s (it compiles on CUDA only)", device)
        return teacher
    logger.info("compiling the teacher (torch.compile; the first steps pay the compilation)")
    return torch.compile(teacher)


def _prepare_teacher(teacher: nn.Module | None, device: torch.device, cl: bool) -> None:
    if teacher is None:
        return
    teacher.to(device)
    if cl:
        teacher.to(memory_format=torch.channels_last)
    teacher.eval()
    teacher.requires_grad_(False)


_START_OVER = "delete it to start this run over"
_CKPT_FIELDS = ("model", "optimizer", "scheduler", "epoch", "history", "rng", "config")


def _short(text: object, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": leaf}`` (a leaf: anything but a non-empty mapping)."""
    if not isinstance(value, Mapping) or not value:
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _check_record(path: Path, theirs: Any, mine: Mapping[str, Any] | None) -> None:
    """Refuse a checkpoint made for another record than this run's (its job, params, inputs,
    code): a checkpoint copied under another run's name is not that run."""
    if mine is None:
        return
    if theirs is None:
        raise CheckpointError(
            f"{path}: resume checkpoint records no run (made by an older kdiga), so it cannot "
            f"be told to be this run's; {_START_OVER}"
        )
    old, new = _flat(theirs), _flat(_plain(mine))
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
        key = differ[0]
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise CheckpointError(
            f"{path}: resume checkpoint was made for another run: {key} is "
            f"{_short(repr(old.get(key)), 80)} in it, {_short(repr(new.get(key)), 80)} now{more}; "
            f"{_START_OVER}"
        )


def _plain(value: Any) -> Any:
    """``value`` as a checkpoint holds it (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _load_checkpoint(
    path: Path, cfg: TrainConfig, record: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types on a bad file
        raise CheckpointError(
            f"{path}: resume checkpoint is corrupt or truncated and does not load "
            f"({type(err).__name__}: {_short(err)}); {_START_OVER}"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a kdiga training checkpoint ({CHECKPOINT_FORMAT}); {_START_OVER}"
        )
    missing = [k for k in _CKPT_FIELDS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: resume checkpoint is incomplete (no {', '.join(missing)}); {_START_OVER}"
        )
    mine = dataclasses.asdict(cfg)
    diff = {
        k: (v, mine.get(k))
        for k, v in ckpt["config"].items()
        if k not in _RESUMABLE_CHANGES and (tuple(v) if isinstance(v, list) else v) != mine.get(k)
    }
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"{path}: checkpoint was made with another config ({shown}); only "
            f"{sorted(_RESUMABLE_CHANGES)} may change on resume: delete it to start over"
        )
    _check_record(path, ckpt.get("record"), record)
    if ckpt["epoch"] > cfg.epochs:
        raise CheckpointError(
            f"{path}: checkpoint is at epoch {ckpt['epoch']}, past the requested "
            f"epochs={cfg.epochs}; it cannot be rewound: {_START_OVER}"
        )
    return ckpt


def _keys(keys: list[str], limit: int = 3) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _state_mismatch(model: nn.Module, state: Any) -> str | None:
    """Why ``state`` cannot load into ``model`` (keys, shapes), or None if it looks like it can."""
    if not isinstance(state, Mapping):
        return f"its weights are a {type(state).__name__}, not a state_dict"
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if missing:
        problems.append(f"missing keys {_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_keys(unexpected)}")
    for key, mine in own.items():
        theirs = state.get(key)
        if isinstance(theirs, Tensor) and isinstance(mine, Tensor) and theirs.shape != mine.shape:
            problems.append(
                f"size mismatch for {key}: {list(theirs.shape)} in the checkpoint, "
                f"{list(mine.shape)} in the model"
            )
            break
    return "; ".join(problems) or None


def _restore_states(
    path: Path,
    ckpt: Mapping[str, Any],
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Load the checkpoint's model, optimizer and scheduler states, or raise CheckpointError
    (checked before loading, so a checkpoint of another model leaves ``student`` untouched)."""
    reason = _state_mismatch(student, ckpt["model"])
    if reason is not None:
        raise CheckpointError(_misfit(path, "model", reason))
    what = "model"
    try:
        student.load_state_dict(ckpt["model"])
        what = "optimizer"
        optimizer.load_state_dict(ckpt["optimizer"])
        what = "LR scheduler"
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(_misfit(path, what, _short(err))) from err


def _misfit(path: Path, what: str, reason: str) -> str:
    return (
        f"{path}: resume checkpoint does not fit this {what}, it was left by another "
        f"architecture or run ({_short(reason, 300)}); {_START_OVER}"
    )


@dataclass
class _Position:
    """How far an epoch got: steps done, the sample-weighted sums of the loss parts and the
    number of samples behind them, and (in-memory data) the augmentation generator's state."""

    batch: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    aug_state: Tensor | None = None


Step = tuple[Tensor, Tensor, dict[str, Any], int]  # x, y on the device, criterion kwargs, b


def _memory_steps(
    images: Tensor,
    labels: Tensor,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device,
    teacher_cache: Callable[[Tensor], Any] | None,
    batch_source: Callable[[Tensor, int], tuple[Tensor, Any]] | None,
    pos: _Position,
) -> tuple[int, Iterator[Step], Callable[[], Tensor | None]]:
    """(steps of the epoch, its steps from ``pos.batch`` on, the augmentation state getter)
    for in-memory data: order and augmentation from ``(cfg.seed, epoch)``."""
    order_gen, aug_gen = _epoch_generators(cfg.seed, epoch)
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


def _stream_steps(
    stream: BatchStream, epoch: int, device: torch.device, pos: _Position
) -> tuple[int, Iterator[Step], Callable[[], Tensor | None]]:
    """The same for a :class:`BatchStream`: its batches from ``pos.batch`` on."""

    def steps() -> Iterator[Step]:
        for x, y in stream.batches(epoch, pos.batch):
            y = torch.as_tensor(y)
            yield to_float(x.to(device, non_blocking=True)), y.to(device).long(), {}, y.numel()

    return int(stream.steps_per_epoch), steps(), lambda: None


def _run_epoch(
    student: nn.Module,
    criterion: Callable[..., dict[str, Tensor]],
    teacher: nn.Module | None,
    source: tuple[int, Iterator[Step], Callable[[], Tensor | None]],
    cfg: TrainConfig,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    on_batch: Callable[[dict], None] | None,
    pos: _Position,
    save: Callable[[_Position], None] | None = None,
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
            save(_Position(done, dict(sums), seen, aug_state()))
    if seen == 0:
        raise ValueError(f"epoch {epoch + 1} had no batch to train on")
    return {k: v / seen for k, v in sums.items()}


def fit(
    student: nn.Module,
    criterion: Callable[..., dict[str, Tensor]],
    images: Tensor | None,
    labels: Tensor | None,
    cfg: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    stream: BatchStream | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_record: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[dict], None] | None = None,
    on_batch: Callable[[dict], None] | None = None,
    val: tuple[Tensor, Tensor] | None = None,
    teacher_cache: Callable[[Tensor], Any] | None = None,
    batch_source: Callable[[Tensor, int], tuple[Tensor, Any]] | None = None,
    progress: ProgressFn | None = None,
) -> list[dict[str, float]]:
    """Train ``student`` in place for ``cfg.epochs`` epochs; return the per-epoch history.

    Each step: ``parts = criterion(student, teacher, x, y)`` with the student in train mode
    and ``x`` ``[B, C, H, W]`` in [0, 1] (augmented per ``cfg.augment``), then
    ``parts["loss"].backward()`` and an SGD step. A criterion with a ``set_epoch(epoch,
    epochs)`` method (:meth:`kdiga.losses.DistillLoss.set_epoch`) hears the epoch (0-based) and
    ``cfg.epochs`` before each epoch's first step, the first epoch of a resumed run included
    (mid-epoch too), so its schedule is the uninterrupted run's. After every epoch the model,
    optimiser, scheduler, RNG state, config and history are saved atomically to
    ``checkpoint_path``; if that file exists when ``fit`` starts, training resumes from it
    (``cfg.epochs`` may grow); with ``cfg.checkpoint_every`` = k > 0 also every k steps, and a
    run killed mid-epoch resumes at the step after its last checkpoint.

    Under torchrun (a process group initialised by :func:`kdiga.distributed.init_from_env`
    with world size W > 1) every rank calls ``fit`` alike: the student is wrapped in DDP, each
    rank trains on its ``cfg.batch_size / W`` slice of every global batch, the history holds
    global-batch means on every rank, and only rank 0 writes the checkpoint (the others wait);
    resuming reads it on every rank (a filesystem shared by the nodes). ``on_epoch`` and
    ``on_batch`` run on every rank. What is exactly the single-process run, and what is
    refused, is in :mod:`kdiga.distributed`.

    Args:
        student: the model to train (moved to ``device``).
        criterion: ``(student, teacher, x, y, [teacher_out=]) -> dict`` with a "loss" scalar.
        images: uint8 ``[N, C, H, W]`` (or float in [0, 1]); held on ``device`` for the run.
            None with ``stream``.
        labels: int ``[N]`` (None with ``stream``).
        cfg: optimisation settings.
        teacher: moved to ``device``, put in eval mode and frozen (``requires_grad_(False)``).
        stream: batches that come decoded and augmented (:class:`BatchStream`, e.g. streamed
            from shards) instead of ``images``/``labels``; needs augment="none", no
            ``teacher_cache`` and no ``batch_source``. Under DDP each rank passes its own.
        checkpoint_path: where to checkpoint and resume; None: no checkpoints.
        checkpoint_record: what the run is made for (plain JSON values, e.g. the pipeline
            job's params, input hashes and code): stored in every checkpoint, and a checkpoint
            made for another record (or for none) is not resumed: CheckpointError naming the
            first key that differs.
        device: where to train; bf16 autocast and channels_last apply on CUDA only.
        on_epoch: called with each epoch's history record, after its checkpoint is saved.
        on_batch: called after each step with {epoch, batch, num_batches, loss parts...}
            (e.g. to drive a progress bar).
        val: (images, labels) for a held-out validation accuracy after each epoch.
        teacher_cache: ``(indices [B] into images, on CPU) -> TeacherSignals`` passed to the
            criterion as ``teacher_out=`` (precomputed teacher signals; needs augment="none").
        batch_source: ``(indices [B] on CPU, epoch 0-based) -> (x [B, C, H, W] in [0, 1],
            teacher_out)``: replaces the loop's augmentation and ``teacher_cache`` (e.g. a
            ``kdiga.signals.SignalCache`` of K augmented views; needs augment="none").
        progress: called with a :class:`kdiga.progress.Progress` of the task "train" (steps
            of the whole run, ``cfg.epochs`` x steps per epoch; a resumed run starts at its
            checkpoint's step) at the start of each epoch and after each step.

    Returns:
        one dict per epoch: epoch (1-based), lr, the mean of each loss part, time_s, and
        val_acc when ``val`` is given.

    Raises:
        NonFiniteLossError: a NaN or infinite loss part (epoch and batch named).
    """
    info = current()
    if stream is not None:
        _check_stream(stream, images, labels, cfg, teacher_cache, batch_source)
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
    device = torch.device(device)
    n_train = stream.steps_per_epoch * cfg.batch_size if stream is not None else labels.numel()
    check_run(n_train, cfg.batch_size, cfg.drop_last or stream is not None, info.world_size,
              criterion, sync_bn=cfg.sync_bn, device=device)  # fmt: skip
    cuda = device.type == "cuda"
    student.to(device)
    if cuda and cfg.channels_last:
        student.to(memory_format=torch.channels_last)
    _prepare_teacher(teacher, device, cuda and cfg.channels_last)
    teacher = maybe_compile_teacher(teacher, cfg.compile_teacher, device)
    if stream is None:
        images, labels = images.to(device), labels.to(device)

    optimizer = torch.optim.SGD(
        student.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(cfg.milestones), gamma=cfg.lr_gamma
    )
    path = None if checkpoint_path is None else Path(checkpoint_path)
    if isinstance(criterion, nn.Module):
        criterion.to(device)
    cuda_index = None
    if cuda:
        cuda_index = torch.cuda.current_device() if device.index is None else device.index
    # The run's global RNG (dropout, PGD random starts in losses) is its own: seeded from
    # cfg.seed or restored from the checkpoint, and the caller's state is restored afterwards.
    resume = path is not None and path.exists()
    check_same_on_all_ranks(resume, f"whether checkpoint {path} exists (shared filesystem?)")
    with (
        torch.random.fork_rng(devices=[] if cuda_index is None else [cuda_index]),
        contextlib.ExitStack() as stack,
    ):
        start, history, pos = 0, [], _Position()
        if resume:
            ckpt = _load_checkpoint(path, cfg, checkpoint_record)
            _restore_states(path, ckpt, student, optimizer, scheduler)
            start, history = ckpt["epoch"], list(ckpt["history"])
            pos = _position(ckpt)
            _restore_rng(ckpt["rng"], info, cfg.seed + start, cuda_index)
            at = f" step {pos.batch}" if pos.batch else ""
            logger.info("resuming from %s at epoch %d%s of %d", path, start, at, cfg.epochs)
        else:
            _seed_rng(rank_seed(cfg.seed, info.rank), cuda_index)  # rank 0: cfg.seed

        def save(epochs_done: int, at: _Position | None = None) -> None:
            if path is None:
                return
            rngs = all_gather_object(_rng_state(cuda_index)) if info.is_distributed else None
            if info.rank == 0:
                _save_checkpoint(
                    path, student, optimizer, scheduler, cfg, epochs_done, history, cuda_index,
                    rngs, at, checkpoint_record,
                )  # fmt: skip
            barrier()

        model = stack.enter_context(data_parallel(student, device, sync_bn=cfg.sync_bn))
        track = Tracker(progress, "train", 0, "steps")
        set_epoch = getattr(criterion, "set_epoch", None)
        for epoch in range(start, cfg.epochs):
            if set_epoch is not None:  # epoch-dependent loss weights, resumed runs included
                set_epoch(epoch, cfg.epochs)
            lr = optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            if stream is not None:
                source = _stream_steps(stream, epoch, device, pos)
            else:
                source = _memory_steps(
                    images, labels, cfg, epoch, device, teacher_cache, batch_source, pos
                )
            means = _run_epoch(
                model, criterion, teacher, source, cfg, epoch, optimizer, device, on_batch, pos,
                lambda at, epoch=epoch: save(epoch, at), track,
            )  # fmt: skip
            pos = _Position()
            scheduler.step()
            broadcast_buffers(student)  # DDP: rank 0's BatchNorm running stats everywhere
            record = {"epoch": epoch + 1, "lr": lr, **means}
            record["time_s"] = time.perf_counter() - t0
            if val is not None:
                record["val_acc"] = evaluate(student, *val, device=device)
            history.append(record)
            save(epoch + 1)
            if info.rank == 0:
                logger.info("epoch %d/%d %s", epoch + 1, cfg.epochs, _fmt(record))
            if on_epoch is not None:
                on_epoch(dict(record))
    return history


def _check_stream(
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


def _position(ckpt: Mapping[str, Any]) -> _Position:
    """The mid-epoch position a checkpoint holds (step 0 of its epoch for an end-of-epoch one)."""
    at = ckpt.get("position")
    if not at:
        return _Position()
    return _Position(int(at["batch"]), dict(at["sums"]), int(at["seen"]), at.get("aug_state"))


def _fmt(record: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch")


def _save_checkpoint(
    path: Path,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    epoch: int,
    history: list[dict[str, float]],
    cuda_index: int | None,
    rank_rngs: list[dict[str, Any]] | None = None,
    position: _Position | None = None,
    record: Mapping[str, Any] | None = None,
) -> None:
    rng = _rng_state(cuda_index)
    if rank_rngs is not None:  # DDP: every rank's stream, rank 0's also as the plain one
        rng["ranks"] = rank_rngs
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "config": dataclasses.asdict(cfg),
        "history": history,
    }
    if record is not None:
        state["record"] = _plain(record)
    if position is not None and position.batch:  # mid-epoch: how far epoch `epoch` + 1 got
        state["position"] = {
            "batch": position.batch,
            "sums": position.sums,
            "seen": position.seen,
            "aug_state": position.aug_state,
        }
    atomic_torch_save(state, path)


def _rng_state(cuda_index: int | None) -> dict[str, Any]:
    """This process's global RNG state (CPU, and the CUDA device's when training there)."""
    cuda = None if cuda_index is None else torch.cuda.get_rng_state(cuda_index)
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _seed_rng(seed: int, cuda_index: int | None) -> None:
    torch.default_generator.manual_seed(seed)
    if cuda_index is not None:
        torch.cuda.default_generators[cuda_index].manual_seed(seed)


def _restore_rng(
    rng: Mapping[str, Any], info: DistInfo, fallback_seed: int, cuda_index: int | None
) -> None:
    """Restore this rank's RNG stream from a checkpoint's ``rng``.

    A checkpoint of another world size holds no stream for ranks > 0: they are re-seeded
    (``fallback_seed``) and the run is no longer bit-identical to an uninterrupted one.
    """
    ranks = rng.get("ranks") or [rng]
    if len(ranks) != info.world_size:
        if info.rank == 0:
            logger.warning(
                "checkpoint was written by %d process(es), resumed by %d: the RNG streams "
                "of ranks > 0 are re-seeded", len(ranks), info.world_size,
            )  # fmt: skip
        if info.rank > 0:
            _seed_rng(rank_seed(fallback_seed, info.rank), cuda_index)
            return
    own = ranks[info.rank] if len(ranks) == info.world_size else rng
    torch.set_rng_state(own["torch"])
    if cuda_index is not None and own.get("cuda") is not None:
        torch.cuda.set_rng_state(own["cuda"], cuda_index)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def predict(
    model: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> Tensor:
    """Logits ``[N, K]`` (float32, on CPU) of ``model`` on images ``[N, C, H, W]``, eval mode.

    ``device`` None uses the model's own device; otherwise the model is moved there. The
    model's train/eval mode is restored afterwards.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W]; got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    dev = _model_device(model) if device is None else torch.device(device)
    model.to(dev)
    out = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            x = to_float(images[start : start + batch_size].to(dev))
            out.append(model(x).float().cpu())
    if not out:
        raise ValueError("no images to predict (N = 0)")
    return torch.cat(out)


def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> float:
    """Clean accuracy of ``model`` on (images ``[N, C, H, W]``, labels ``[N]``), in eval mode."""
    images, labels = check_data(images, labels, "evaluation")
    logits = predict(model, images, batch_size=batch_size, device=device)
    return (logits.argmax(1) == labels.cpu()).float().mean().item()
