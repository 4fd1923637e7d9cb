"""``fit``: the training run, from its checks to its last checkpoint.

After every epoch the model, optimiser, scheduler, RNG state, config and history are saved
atomically to ``checkpoint_path``; if that file exists when ``fit`` starts, training resumes
from it (``cfg.epochs`` may grow); with ``cfg.checkpoint_every`` = k > 0 also every k steps,
and a run killed mid-epoch resumes at the step after its last checkpoint.

Under torchrun (a process group initialised by :func:`kdiga.distributed.init_from_env` with
world size W > 1) every rank calls ``fit`` alike: the student is wrapped in DDP, each rank
trains on its ``cfg.batch_size / W`` slice of every global batch, the history holds
global-batch means on every rank, and only rank 0 writes the checkpoint (the others wait);
resuming reads it on every rank (a filesystem shared by the nodes). ``on_epoch`` and
``on_batch`` run on every rank. What is exactly the single-process run, and what is refused,
is in :mod:`kdiga.distributed`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdiga.distributed import (
    all_gather_object,
    barrier,
    broadcast_buffers,
    check_run,
    check_same_on_all_ranks,
    current,
    data_parallel,
    rank_seed,
)
from kdiga.progress import ProgressFn, Tracker
from kdiga.train.checkpoint import (
    Position,
    checkpoint_position,
    load_checkpoint,
    restore_states,
    save_checkpoint,
)
from kdiga.train.config import BatchStream, TrainConfig, check_inputs
from kdiga.train.epoch import run_epoch
from kdiga.train.evaluation import evaluate
from kdiga.train.optim import build_optimizer
from kdiga.train.rng import restore_rng, rng_state, seed_rng
from kdiga.train.steps import Step, epoch_steps

# one logger for the training package: the stage logs name its lines kdiga.train
logger = logging.getLogger("kdiga.train")


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


@dataclass
class _Inputs:
    """What ``fit`` trains on: in-memory ``images`` and ``labels`` or a ``stream``, the
    validation set ``val``, and ``teacher_cache`` or ``batch_source`` (teacher signals)."""

    images: Tensor | None
    labels: Tensor | None
    stream: BatchStream | None
    val: tuple[Tensor, Tensor] | None
    teacher_cache: Callable[[Tensor], Any] | None
    batch_source: Callable[[Tensor, int], tuple[Tensor, Any]] | None

    @classmethod
    def checked(
        cls,
        criterion: Callable[..., dict[str, Tensor]],
        images: Tensor | None,
        labels: Tensor | None,
        cfg: TrainConfig,
        stream: BatchStream | None,
        val: tuple[Tensor, Tensor] | None,
        teacher_cache: Callable[[Tensor], Any] | None,
        batch_source: Callable[[Tensor, int], tuple[Tensor, Any]] | None,
    ) -> _Inputs:
        """The inputs as :func:`kdiga.train.config.check_inputs` checks and returns them."""
        images, labels, val = check_inputs(
            criterion, images, labels, cfg, stream, val, teacher_cache, batch_source
        )
        return cls(images, labels, stream, val, teacher_cache, batch_source)

    def to(self, device: torch.device) -> None:
        """Hold the in-memory images and labels on ``device`` (a stream is left as it is)."""
        if self.stream is None:
            self.images, self.labels = self.images.to(device), self.labels.to(device)

    def steps(
        self, cfg: TrainConfig, epoch: int, device: torch.device, pos: Position
    ) -> tuple[int, Iterator[Step], Callable[[], Tensor | None]]:
        """:func:`kdiga.train.steps.epoch_steps` of these inputs: epoch ``epoch``'s steps."""
        return epoch_steps(
            self.stream,
            self.images,
            self.labels,
            cfg,
            epoch,
            device,
            self.teacher_cache,
            self.batch_source,
            pos,
        )


@dataclass(frozen=True)
class _Callbacks:
    """``fit``'s callbacks (each may be None)."""

    on_epoch: Callable[[dict], None] | None
    on_batch: Callable[[dict], None] | None
    progress: ProgressFn | None


@dataclass
class _Run:
    """One ``fit`` call's models, optimiser, inputs and callbacks, placed on its device."""

    student: nn.Module
    criterion: Callable[..., dict[str, Tensor]]
    teacher: nn.Module | None
    cfg: TrainConfig
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    inputs: _Inputs
    callbacks: _Callbacks


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
    (mid-epoch too), so its schedule is the uninterrupted run's. Checkpoints and resuming,
    and what every rank does under torchrun: see the module docstring.

    Args:
        student: the model to train (moved to ``device``).
        criterion: ``(student, teacher, x, y, [teacher_out=]) -> dict`` with a "loss" scalar.
        images, labels: uint8 ``[N, C, H, W]`` (or float in [0, 1]; held on ``device`` for
            the run) and int ``[N]``; both None with ``stream``.
        cfg: optimisation settings.
        teacher: moved to ``device``, put in eval mode and frozen (``requires_grad_(False)``).
        stream: batches that come decoded and augmented (:class:`BatchStream`, e.g. streamed
            from shards) instead of ``images``/``labels``; needs augment="none", no
            ``teacher_cache`` and no ``batch_source``. Under DDP each rank passes its own.
        checkpoint_path: where to checkpoint and resume; None: no checkpoints.
        checkpoint_record: what the run is made for (plain JSON values, e.g. the pipeline
            job's params, input hashes and code): stored in every checkpoint; a checkpoint made
            for another record (or none) is not resumed: CheckpointError names the first key
            that differs.
        device: where to train; bf16 autocast and channels_last apply on CUDA only.
        on_epoch: called with each epoch's history record, after its checkpoint is saved.
        on_batch: called after each step with {epoch, batch, num_batches, loss parts...}.
        val: (images, labels) for a held-out validation accuracy after each epoch.
        teacher_cache: ``(indices [B] into images, on CPU) -> TeacherSignals`` passed to the
            criterion as ``teacher_out=`` (precomputed teacher signals; needs augment="none").
        batch_source: ``(indices [B] on CPU, epoch 0-based) -> (x [B, C, H, W] in [0, 1],
            teacher_out)``: replaces the loop's augmentation and ``teacher_cache`` (e.g. a
            ``kdiga.signals.SignalCache`` of K augmented views; needs augment="none").
        progress: gets a :class:`kdiga.progress.Progress` of the task "train" (steps of the
            run, ``cfg.epochs`` x steps per epoch; a resumed run starts at its checkpoint's
            step) at the start of each epoch and after each step.

    Returns:
        one dict per epoch: epoch (1-based), lr, the mean of each loss part, time_s, and
        val_acc when ``val`` is given. Raises NonFiniteLossError on a NaN or infinite loss
        part (epoch and batch named).
    """
    inputs = _Inputs.checked(
        criterion, images, labels, cfg, stream, val, teacher_cache, batch_source
    )
    device = torch.device(device)
    _check_run(criterion, inputs.labels, cfg, inputs.stream, device)
    teacher = _place_models(student, teacher, cfg, device)
    inputs.to(device)
    optimizer, scheduler = build_optimizer(student, cfg)
    if isinstance(criterion, nn.Module):
        criterion.to(device)
    callbacks = _Callbacks(on_epoch, on_batch, progress)
    run = _Run(student, criterion, teacher, cfg, device, optimizer, scheduler, inputs, callbacks)
    return _train(run, checkpoint_path, checkpoint_record)


def _train(
    run: _Run, checkpoint_path: str | Path | None, checkpoint_record: Mapping[str, Any] | None
) -> list[dict[str, float]]:
    """The epochs of ``run`` under the run's own RNG, resumed from ``checkpoint_path`` when that
    file exists; returns the history."""
    info = current()
    cfg, student = run.cfg, run.student
    path = None if checkpoint_path is None else Path(checkpoint_path)
    cuda_index = _cuda_index(run.device)
    # The run's global RNG (dropout, PGD random starts in losses) is its own: seeded from
    # cfg.seed or restored from the checkpoint, and the caller's state is restored afterwards.
    resume = path is not None and path.exists()
    check_same_on_all_ranks(resume, f"whether checkpoint {path} exists (shared filesystem?)")
    with (
        torch.random.fork_rng(devices=[] if cuda_index is None else [cuda_index]),
        contextlib.ExitStack() as stack,
    ):
        start, history, pos = 0, [], Position()
        if resume:
            start, history, pos = _resume(
                path, cfg, checkpoint_record, student, run.optimizer, run.scheduler, cuda_index
            )
        else:
            seed_rng(rank_seed(cfg.seed, info.rank), cuda_index)  # rank 0: cfg.seed
        save = _saver(
            path,
            student,
            run.optimizer,
            run.scheduler,
            cfg,
            history,
            cuda_index,
            checkpoint_record,
        )
        model = stack.enter_context(data_parallel(student, run.device, sync_bn=cfg.sync_bn))
        track = Tracker(run.callbacks.progress, "train", 0, "steps")
        for epoch in range(start, cfg.epochs):
            record = _epoch(run, model, epoch, pos, save, track)
            pos = Position()
            history.append(record)
            save(epoch + 1)
            if info.rank == 0:
                logger.info("epoch %d/%d %s", epoch + 1, cfg.epochs, _fmt(record))
            if run.callbacks.on_epoch is not None:
                run.callbacks.on_epoch(dict(record))
    return history


def _epoch(
    run: _Run,
    model: nn.Module,
    epoch: int,
    pos: Position,
    save: Callable[..., None],
    track: Tracker,
) -> dict[str, float]:
    """Train epoch ``epoch`` (0-based) from ``pos`` with ``model`` (the student, DDP-wrapped
    under torchrun) and step the scheduler; returns the epoch's history record."""
    cfg = run.cfg
    set_epoch = getattr(run.criterion, "set_epoch", None)
    if set_epoch is not None:  # epoch-dependent loss weights, resumed runs included
        set_epoch(epoch, cfg.epochs)
    lr = run.optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    source = run.inputs.steps(cfg, epoch, run.device, pos)
    means = run_epoch(
        model,
        run.criterion,
        run.teacher,
        source,
        cfg,
        epoch,
        run.optimizer,
        run.device,
        run.callbacks.on_batch,
        pos,
        lambda at, epoch=epoch: save(epoch, at),
        track,
    )
    run.scheduler.step()
    broadcast_buffers(run.student)  # DDP: rank 0's BatchNorm running stats everywhere
    record = {"epoch": epoch + 1, "lr": lr, **means}
    record["time_s"] = time.perf_counter() - t0
    if run.inputs.val is not None:
        record["val_acc"] = evaluate(run.student, *run.inputs.val, device=run.device)
    return record


def _check_run(
    criterion: Callable[..., dict[str, Tensor]],
    labels: Tensor | None,
    cfg: TrainConfig,
    stream: BatchStream | None,
    device: torch.device,
) -> None:
    """:func:`kdiga.distributed.check_run` for this run's training-set size and world."""
    n_train = stream.steps_per_epoch * cfg.batch_size if stream is not None else labels.numel()
    check_run(
        n_train,
        cfg.batch_size,
        cfg.drop_last or stream is not None,
        current().world_size,
        criterion,
        sync_bn=cfg.sync_bn,
        device=device,
    )


def _place_models(
    student: nn.Module, teacher: nn.Module | None, cfg: TrainConfig, device: torch.device
) -> nn.Module | None:
    """Move the student and the teacher to ``device`` (channels_last on CUDA), freeze the
    teacher and compile it when ``cfg.compile_teacher``; returns the teacher to call."""
    cuda = device.type == "cuda"
    student.to(device)
    if cuda and cfg.channels_last:
        student.to(memory_format=torch.channels_last)
    _prepare_teacher(teacher, device, cuda and cfg.channels_last)
    return maybe_compile_teacher(teacher, cfg.compile_teacher, device)


def _cuda_index(device: torch.device) -> int | None:
    """The CUDA device index whose RNG the run owns (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def _resume(
    path: Path,
    cfg: TrainConfig,
    record: Mapping[str, Any] | None,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cuda_index: int | None,
) -> tuple[int, list[dict[str, float]], Position]:
    """(epochs done, history, mid-epoch position) of the checkpoint at ``path``, its model,
    optimiser, scheduler and RNG states restored."""
    ckpt = load_checkpoint(path, cfg, record)
    restore_states(path, ckpt, student, optimizer, scheduler)
    start, history = ckpt["epoch"], list(ckpt["history"])
    pos = checkpoint_position(ckpt)
    restore_rng(ckpt["rng"], current(), cfg.seed + start, cuda_index)
    at = f" step {pos.batch}" if pos.batch else ""
    logger.info("resuming from %s at epoch %d%s of %d", path, start, at, cfg.epochs)
    return start, history, pos


def _saver(
    path: Path | None,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    history: list[dict[str, float]],
    cuda_index: int | None,
    record: Mapping[str, Any] | None,
) -> Callable[..., None]:
    """``save(epochs_done, at=None)``: the checkpoint of the run so far (``history`` as it then
    is), written by rank 0 while the others wait; a no-op without ``path``."""
    info = current()

    def save(epochs_done: int, at: Position | None = None) -> None:
        if path is None:
            return
        rngs = all_gather_object(rng_state(cuda_index)) if info.is_distributed else None
        if info.rank == 0:
            save_checkpoint(
                path,
                student,
                optimizer,
                scheduler,
                cfg,
                epochs_done,
                history,
                cuda_index,
                rngs,
                at,
                record,
            )
        barrier()

    return save


def _fmt(record: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch")
