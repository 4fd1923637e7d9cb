"""Saving and loading kdiga model files (``kdiga-model/1``).

A file is one ``torch.save``d dict::

    {"format": "kdiga-model/1", "arch", "num_classes", "in_chans", "image_size",
     "mean", "std", "kwargs", "state_dict", "meta"}

``state_dict`` is the raw net's (``model.net``); ``kwargs`` and ``meta`` hold plain JSON
values only, so files load with ``torch.load(weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from kdiga.models.normalized import NormalizedModel
from kdiga.models.registry import build_model
from kdiga.utils import atomic_torch_save

logger = logging.getLogger(__name__)

FORMAT = "kdiga-model/1"
FIELDS = ("arch", "num_classes", "in_chans", "image_size", "mean", "std", "kwargs", "state_dict")


class CheckpointError(ValueError):
    """A model file that does not load (missing, corrupt, truncated, wrong format or keys)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The model file does not exist."""


def _plain(value: Any, what: str) -> Any:
    """``value`` as plain JSON types (tuples become lists); ValueError if it has none."""
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{what} must hold plain JSON values (str, numbers, lists, dicts): {exc}"
        ) from exc


def model_spec(model: NormalizedModel) -> dict:
    """What rebuilds ``model`` besides its weights: arch, classes, input shape, normalisation."""
    return {
        "arch": model.arch,
        "num_classes": model.num_classes,
        "in_chans": model.in_chans,
        "image_size": model.image_size,
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
    }


def save_model(
    model: NormalizedModel, path: str | os.PathLike, *, meta: dict[str, Any] | None = None
) -> None:
    """Write ``model`` (architecture, normalisation, weights) and ``meta`` to ``path`` (atomic)."""
    if not isinstance(model, NormalizedModel):
        raise ValueError(
            f"save_model takes a NormalizedModel (from build_model), got {type(model).__name__}"
        )
    record = {
        "format": FORMAT,
        **model_spec(model),
        "kwargs": _plain(model.build_kwargs, "the model's build kwargs"),
        "state_dict": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
        "meta": _plain(meta or {}, "meta"),
    }
    atomic_torch_save(record, path)
    logger.debug("saved %s to %s", model.arch, path)


def read_checkpoint(
    path: str | os.PathLike, *, map_location: Any = "cpu", weights_only: bool = True
) -> Any:
    """``torch.load`` that turns every failure into :class:`CheckpointError` naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"model file {path} does not exist (or is not a file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: cannot be unpickled safely ({exc})") from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def load_model(
    path: str | os.PathLike, *, map_location: Any = "cpu"
) -> tuple[NormalizedModel, dict[str, Any]]:
    """Rebuild the model saved at ``path`` and return it with its ``meta`` dict.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, not ``kdiga-model/1``,
            or its weights do not fit the stored architecture.
    """
    path = Path(path)
    record = read_checkpoint(path, map_location=map_location)
    if not is_model_record(record):
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(
            f"{path}: not a kdiga model file (format {found!r}, expected {FORMAT!r}); raw "
            "state_dicts load with kdiga.teachers.load_teacher('file:...', arch=...)"
        )
    model = model_from_record(record, path)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model, dict(record.get("meta") or {})


def is_model_record(obj: Any) -> bool:
    """Whether ``obj`` (a loaded checkpoint) is a ``kdiga-model/1`` record."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def model_from_record(record: dict[str, Any], path: str | os.PathLike) -> NormalizedModel:
    """Rebuild the model of a loaded ``kdiga-model/1`` record (on the CPU).

    Raises:
        CheckpointError: naming ``path`` when fields are missing or the weights do not fit.
    """
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise CheckpointError(f"{path}: kdiga model file lacks fields {missing}")
    try:
        model = build_model(
            record["arch"],
            record["num_classes"],
            in_chans=record["in_chans"],
            image_size=record["image_size"],
            mean=record["mean"],
            std=record["std"],
            **record["kwargs"],
        )
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild {record['arch']!r}: {exc}") from exc
    try:
        model.net.load_state_dict(record["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit {record['arch']!r}: {exc}") from exc
    return model
