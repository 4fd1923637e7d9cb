"""Saving and loading kdiga model files.

A model file is a safetensors file (``kdiga-model/2``, :mod:`kdiga.artifacts`): the raw net's
state_dict (``model.net``) as tensors, and in its header the JSON record::

    {"format": "kdiga-model/2", "arch", "num_classes", "in_chans", "image_size",
     "mean", "std", "kwargs", "meta", "tensors_sha256"}

The same weights and record always give the same bytes, and reading a file runs no code.

Reading checks the file before anything is built from it:

- ``tensors_sha256`` (:func:`kdiga.artifacts.tensors_sha256`, computed when the file is
  written) must be the hash of the tensors in the file: weights changed after the job wrote
  them are refused, naming both hashes and the job to re-run. Files without it (the
  ``kdiga-model/1`` format and the first ``kdiga-model/2`` files of an older kdiga) are
  refused too, and so is any other ``format``;
- the header's architecture, classes, input shape and options must be what the caller
  expects (``load_model(..., expect=...)``: the study's declared architecture and data);
- the model the header describes is first built on PyTorch's meta device and its tensor
  names and shapes compared with the file's, so a header cannot make the reader allocate a
  model that its tensors do not fill.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdiga.artifacts import load_tensors, save_tensors, tensors_sha256
from kdiga.files import ArtifactError, is_safetensors
from kdiga.models.errors import CheckpointError, CheckpointNotFoundError
from kdiga.models.normalized import NormalizedModel
from kdiga.models.registry import build_model, external_only_kwargs, state_shapes

logger = logging.getLogger(__name__)

FORMAT = "kdiga-model/2"
#: the record's hash of the file's tensors
HASH_KEY = "tensors_sha256"
FIELDS = ("arch", "num_classes", "in_chans", "image_size", "mean", "std", "kwargs", "state_dict")
#: the header fields a reader may require (:func:`load_model`'s ``expect``)
EXPECTED_FIELDS = ("arch", "num_classes", "in_chans", "image_size", "kwargs")
_SHOWN = 80  # characters of a header value quoted in a message


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
    state = model.net.state_dict()
    record = {
        "format": FORMAT,
        **model_spec(model),
        "kwargs": _plain(model.build_kwargs, "the model's build kwargs"),
        "meta": _plain(meta or {}, "meta"),
        HASH_KEY: tensors_sha256(state),
    }
    save_tensors(state, path, meta=record)
    logger.debug("saved %s to %s", model.arch, path)


def read_model_record(path: str | os.PathLike) -> Any:
    """What a model file holds: for a kdiga model file its record with the
    ``state_dict``; for any other checkpoint what :func:`read_checkpoint` returns."""
    path = Path(path)
    if not (path.is_file() and (path.suffix == ".safetensors" or is_safetensors(path))):
        return read_checkpoint(path)
    try:
        tensors, record = load_tensors(path)
    except ArtifactError as exc:
        raise CheckpointError(f"{exc}; {_ACCEPTED}") from exc
    return {**record, "state_dict": tensors}


def path_problem(path: str | os.PathLike) -> str | None:
    """What keeps ``path`` from being read as a file (``"does not exist"``, ``"is a
    directory"``, ``"is a character device"``, ...), or None for a regular file (a symlink
    is judged by its target)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist" if not os.path.islink(path) else "is a broken symlink"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    )
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"is {kind}, not a file"


def check_model_path(path: str | os.PathLike, what: str = "model file") -> None:
    """Raise unless ``path`` is a regular file: :class:`CheckpointNotFoundError` if it does
    not exist, :class:`CheckpointError` saying what it is otherwise (a directory, a
    device, ...)."""
    problem = path_problem(path)
    if problem == "does not exist":
        raise CheckpointNotFoundError(f"{what} {path} does not exist")
    if problem is not None:
        raise CheckpointError(f"{what} {path} {problem}")


_ACCEPTED = (
    "accepted: a safetensors file (a kdiga model file or a state_dict) or a torch.save file "
    "(zip or legacy) of a state_dict"
)


def _sniff(path: Path) -> str | None:
    """Why ``path`` cannot be a torch.save file, from its first bytes; None if it may be one."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        return "it is empty"
    if head.startswith((b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")):
        return None  # torch.save's zip format, or a pickle (torch.save's legacy format)
    return f"it starts with {head!r}, as no checkpoint does (a text file?)"


def read_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` that turns every failure into :class:`CheckpointError`.

    Only tensors, plain containers and globals allowlisted by the caller (the
    ``torch.serialization.safe_globals`` context manager) are unpickled, never code. A file
    that needs more raises :class:`CheckpointError` naming ``path``, with the
    ``pickle.UnpicklingError`` as its ``__cause__``. A path that is not a regular file, or a
    file that does not start as a torch.save file does (a text file), is refused before
    torch reads it.
    """
    path = Path(path)
    check_model_path(path)
    why = _sniff(path)
    if why is not None:
        raise CheckpointError(f"{path} is not a model checkpoint: {why}; {_ACCEPTED}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text is several lines and suggests weights_only off; keep its core only
        detail = str(exc).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise CheckpointError(
            f"{path}: cannot be unpickled safely, kdiga never unpickles code "
            f"({_shown(' '.join(detail.split()), 300)})"
        ) from exc
    except Exception as exc:  # torch raises many types on a bad file (KeyError, IndexError...)
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: "
            f"{_shown(str(exc), 200)}); {_ACCEPTED}"
        ) from exc


def load_model(
    path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    arch: str | None = None,
    expect: Mapping[str, Any] | None = None,
) -> tuple[NormalizedModel, dict[str, Any]]:
    """Rebuild the model saved at ``path`` and return it with its ``meta`` dict.

    Args:
        arch: if given, the architecture the file must hold (a file of another model at
            this path is refused rather than evaluated under the wrong name).
        expect: header fields the file must hold (any of :data:`EXPECTED_FIELDS`: arch,
            num_classes, in_chans, image_size, kwargs), e.g. the study's declared model.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, not a kdiga model file (or
            one of another format), its tensors are not those it was written with, it holds
            another architecture or header than expected, or its weights do not fit.
    """
    path = Path(path)
    record = read_model_record(path)
    if not is_model_record(record):
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(
            f"{path}: not a kdiga model file (format {_shown(found)}, expected {FORMAT!r}); "
            "raw state_dicts load with kdiga.teachers.load_teacher('file:...', arch=...)"
        )
    if arch is not None and record.get("arch") != arch:
        raise CheckpointError(
            f"{path} holds a {_shown(record.get('arch'))} model, but {arch!r} is expected "
            f"there; the file was made for another model: {_rerun(record)}"
        )
    model = model_from_record(record, path, expect={**(expect or {}), "arch": arch})
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model, dict(record.get("meta") or {})


def is_model_record(obj: Any) -> bool:
    """Whether ``obj`` (a loaded checkpoint) is a kdiga model record, of any format version
    (:func:`model_from_record` reads :data:`FORMAT` only, and refuses the others)."""
    fmt = obj.get("format") if isinstance(obj, dict) else None
    return isinstance(fmt, str) and fmt.startswith("kdiga-model/")


def model_from_record(
    record: dict[str, Any], path: str | os.PathLike, *, expect: Mapping[str, Any] | None = None
) -> NormalizedModel:
    """Rebuild the model of a loaded model record (on the CPU), after checking it: its
    format, its fields, the fields ``expect`` names, the hash of its tensors, and (on the
    meta device) that its tensors fill the model its header describes.

    Raises:
        CheckpointError: naming ``path``, the field and both values, or both hashes.
    """
    _check_format(record, path)
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise CheckpointError(f"{path}: kdiga model file lacks fields {missing}; {_rerun(record)}")
    _check_fields(record, path)
    _check_expected(record, path, expect or {})
    check_tensors(record, path)
    spec = dict(
        in_chans=record["in_chans"],
        image_size=record["image_size"],
        mean=record["mean"],
        std=record["std"],
        **record["kwargs"],
    )
    try:
        shapes = state_shapes(record["arch"], record["num_classes"], **spec)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild {_shown(record['arch'])}: {exc}") from exc
    if shapes is not None:
        _check_shapes(record, shapes, path)
    try:
        model = build_model(record["arch"], record["num_classes"], **spec)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild {_shown(record['arch'])}: {exc}") from exc
    try:
        model.net.load_state_dict(record["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit {record['arch']!r}: {exc}") from exc
    return model


def _shown(value: Any, limit: int = _SHOWN) -> str:
    """``repr(value)`` of a header value, cut to ``limit`` characters (headers are input)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rerun(record: Mapping[str, Any]) -> str:
    """What to do about a bad file: re-run the job its record names, if it names one."""
    meta = record.get("meta")
    prov = meta.get("provenance") if isinstance(meta, dict) else None
    job = prov.get("job") if isinstance(prov, dict) else None
    if isinstance(job, str) and job and len(job) <= 200 and job.isprintable():
        return f"delete it and re-run its job {job!r} (snakemake on the file, or dvc repro {job})"
    return "delete it and re-run the job that wrote it (kdiga.models.save_model writes one)"


def _check_format(record: Mapping[str, Any], path: str | os.PathLike) -> None:
    fmt = record.get("format")
    if fmt != FORMAT:
        raise CheckpointError(
            f"{path}: model file format {_shown(fmt)}, but this kdiga reads {FORMAT!r} only "
            f"(made by another kdiga version); {_rerun(record)}"
        )


def _check_fields(record: Mapping[str, Any], path: str | os.PathLike) -> None:
    """The header's values have the types a model is built from."""
    for key in ("num_classes", "in_chans", "image_size"):
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(
                f"{path}: header field {key} is {_shown(value)}, expected a positive integer"
            )
    if not isinstance(record["arch"], str):
        raise CheckpointError(f"{path}: header field arch is {_shown(record['arch'])}, not a name")
    if not isinstance(record["kwargs"], dict):
        raise CheckpointError(
            f"{path}: header field kwargs is {_shown(record['kwargs'])}, expected a mapping"
        )


def _check_expected(
    record: Mapping[str, Any], path: str | os.PathLike, expect: Mapping[str, Any]
) -> None:
    """Each field ``expect`` names holds its expected value (kwargs: as a model stores them)."""
    unknown = sorted(set(expect) - set(EXPECTED_FIELDS))
    if unknown:
        raise ValueError(f"expect= takes {', '.join(EXPECTED_FIELDS)}; got {unknown}")
    for key, want in expect.items():
        if want is None:
            continue
        if key == "kwargs":
            skip = external_only_kwargs()
            want = _plain({k: v for k, v in want.items() if k not in skip}, "expected kwargs")
        if record[key] != want:
            raise CheckpointError(
                f"{path}: header field {key} is {_shown(record[key])}, expected {_shown(want)} "
                f"(the model this file is loaded as); {_rerun(record)}"
            )


def check_tensors(record: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``record`` (a model record with its
    ``state_dict``) holds the hash of its tensors and they still have it."""
    recorded = record.get(HASH_KEY)
    if recorded is None:
        raise CheckpointError(
            f"{path}: model file of an older kdiga, without the hash of its tensors "
            f"({HASH_KEY}) that this one checks; {_rerun(record)}"
        )
    actual = tensors_sha256(record["state_dict"])
    if actual != recorded:
        raise CheckpointError(
            f"{path}: its tensors have sha256 {actual}, its header records "
            f"{_shown(recorded)}: the weights changed after the file was written; "
            f"{_rerun(record)}"
        )


def _check_shapes(
    record: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], path: str | os.PathLike
) -> None:
    """The file's tensors have the names and shapes of the model its header describes."""
    state = record["state_dict"]
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = [k for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
    if not (missing or unexpected or wrong):
        return
    if wrong:
        k = wrong[0]
        detail = f"{k} is {list(state[k].shape)} in the file, {list(shapes[k])} in the model"
    else:
        detail = f"missing e.g. {missing[:3]}, unexpected e.g. {unexpected[:3]}"
    raise CheckpointError(
        f"{path}: its tensors do not fit the model its header describes "
        f"({_shown(record['arch'])}, num_classes {record['num_classes']}, kwargs "
        f"{_shown(record['kwargs'])}): {detail}; {_rerun(record)}"
    )
