"""The training checkpoint (format ``kdiga.train/1``): saved atomically, checked before it is
resumed (its format, fields, config, the run it was made for, its model's keys and shapes), and
the mid-epoch :class:`Position` it may hold."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdiga.models import CheckpointError
from kdiga.train.config import TrainConfig
from kdiga.train.rng import rng_state
from kdiga.utils import atomic_torch_save

CHECKPOINT_FORMAT = "kdiga.train/1"
# Fields that may differ between a checkpoint and the run resuming it (they change neither
# what an epoch computes nor, on CPU, how).
_RESUMABLE_CHANGES = frozenset(
    {"epochs", "amp", "channels_last", "compile_teacher", "checkpoint_every"}
)


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


def load_checkpoint(
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


def restore_states(
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
class Position:
    """How far an epoch got: steps done, the sample-weighted sums of the loss parts and the
    number of samples behind them, and (in-memory data) the augmentation generator's state."""

    batch: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    aug_state: Tensor | None = None


def checkpoint_position(ckpt: Mapping[str, Any]) -> Position:
    """The mid-epoch position a checkpoint holds (step 0 of its epoch for an end-of-epoch one)."""
    at = ckpt.get("position")
    if not at:
        return Position()
    return Position(int(at["batch"]), dict(at["sums"]), int(at["seen"]), at.get("aug_state"))


def save_checkpoint(
    path: Path,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    epoch: int,
    history: list[dict[str, float]],
    cuda_index: int | None,
    rank_rngs: list[dict[str, Any]] | None = None,
    position: Position | None = None,
    record: Mapping[str, Any] | None = None,
) -> None:
    rng = rng_state(cuda_index)
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
