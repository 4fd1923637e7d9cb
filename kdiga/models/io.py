"""Saving and loading kdiga model files.

A model file is a safetensors file (``kdiga-model/2``, :mod:`kdiga.artifacts`): the raw net's
state_dict (``model.net``) as tensors, and in its header the JSON record::

    {"format": "kdiga-model/2", "arch", "num_classes", "in_chans", "image_size",
     "mean", "std", "kwargs", "meta"}

The same weights and record always give the same bytes, and reading a file runs no code.
Files of the earlier ``kdiga-model/1`` format (one ``torch.save``d dict holding the same
fields and ``state_dict``) are still read, with ``torch.load(weights_only=True)``.
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

from kdiga.artifacts import load_tensors, save_tensors
from kdiga.files import ArtifactError, is_safetensors
from kdiga.models.normalized import NormalizedModel
from kdiga.models.registry import build_model

logger = logging.getLogger(__name__)

FORMAT = "kdiga-model/2"
LEGACY_FORMATS = ("kdiga-model/1",)
FIELDS = ("arch", "num_classes", "in_chans", "image_size", "mean", "std", "kwargs", "state_dict")


class CheckpointError(ValueError):
    """A model file that does not load (missing, corrupt, truncated, wrong format or keys)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The model file does not exist."""


class WeightsUnavailableError(CheckpointError, RuntimeError):
    """Weights to download (a ``url:`` teacher, timm or torchvision pretrained weights) could
    not be had: offline, or the server refused."""


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
    """Write ``model`` (architecture, normalisation, weights) and ``meta`` to ``path``
    (atomic, byte-stable: ``kdiga-model/2``, a safetensors file; name it ``*.safetensors``)."""
    if not isinstance(model, NormalizedModel):
        raise ValueError(
            f"save_model takes a NormalizedModel (from build_model), got {type(model).__name__}"
        )
    record = {
        "format": FORMAT,
        **model_spec(model),
        "kwargs": _plain(model.build_kwargs, "the model's build kwargs"),
        "meta": _plain(meta or {}, "meta"),
    }
    save_tensors(model.net.state_dict(), path, meta=record)
    logger.debug("saved %s to %s", model.arch, path)


def read_model_record(path: str | os.PathLike) -> Any:
    """What a model file holds: for a kdiga model file (either format) its record with the
    ``state_dict``; for any other checkpoint what :func:`read_checkpoint` returns."""
    path = Path(path)
    if not (path.is_file() and (path.suffix == ".safetensors" or is_safetensors(path))):
        return read_checkpoint(path)
    try:
        tensors, record = load_tensors(path)
    except ArtifactError as exc:
        raise CheckpointError(str(exc)) from exc
    return {**record, "state_dict": tensors}


def read_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` that turns every failure into :class:`CheckpointError`.

    Only tensors, plain containers and globals allowlisted by the caller (the
    ``torch.serialization.safe_globals`` context manager) are unpickled, never code. A file
    that needs more raises :class:`CheckpointError` naming ``path``, with the
    ``pickle.UnpicklingError`` as its ``__cause__``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"model file {path} does not exist (or is not a file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text is several lines and suggests weights_only off; keep its core only
        detail = str(exc).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise CheckpointError(
            f"{path}: cannot be unpickled safely, kdiga never unpickles code "
            f"({' '.join(detail.split())})"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def load_model(
    path: str | os.PathLike, *, map_location: Any = "cpu", arch: str | None = None
) -> tuple[NormalizedModel, dict[str, Any]]:
    """Rebuild the model saved at ``path`` and return it with its ``meta`` dict.

    Args:
        arch: if given, the architecture the file must hold (a file of another model at
            this path is refused rather than evaluated under the wrong name).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, not a kdiga model file,
            holds another architecture than ``arch``, or its weights do not fit.
    """
    path = Path(path)
    record = read_model_record(path)
    if not is_model_record(record):
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(
            f"{path}: not a kdiga model file (format {found!r}, expected {FORMAT!r}); raw "
            "state_dicts load with kdiga.teachers.load_teacher('file:...', arch=...)"
        )
    if arch is not None and record.get("arch") != arch:
        raise CheckpointError(
            f"{path} holds a {record.get('arch')!r} model, but {arch!r} is expected there; "
            "the file was made for another model: delete it and re-run the job that writes it"
        )
    model = model_from_record(record, path)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model, dict(record.get("meta") or {})


def is_model_record(obj: Any) -> bool:
    """Whether ``obj`` (a loaded checkpoint) is a kdiga model record (either format)."""
    return isinstance(obj, dict) and obj.get("format") in (FORMAT, *LEGACY_FORMATS)


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
