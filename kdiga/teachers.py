"""Teachers: fetch a robust model by its source and say where it came from.

A teacher is named by a source string:

- ``file:<path>``: a local checkpoint, either a kdiga model file (``save_model``) or a raw
  / RobustBench-style checkpoint for ``arch`` (a bare ``state_dict`` such as TRADES's
  ``model_cifar_wrn.pt``; a dict holding it under ``"state_dict"``, ``"model"`` or ``"net"``;
  ``"module."`` prefixes from DataParallel; the robustness library's layout with
  ``module.model.*`` for the net, ``module.attacker.*`` duplicates and the input
  normalisation in ``module.normalizer.new_mean``/``new_std``). ``sha256`` is verified when
  given.
- ``url:<https://...>``: downloaded once into ``cache_dir`` (atomically), verified against
  the required ``sha256`` and reused from the cache afterwards without network. Only
  ``https://`` (and ``file://`` of a regular file, for local mirrors and tests); ``http://``
  is refused. A download stops at ``max_download_mb`` (a server that sends without end, a
  ``file:///dev/zero``), and a temporary file left by a killed download is removed by the
  next one.
- ``timm:<name>``: a timm model with its pretrained weights (downloaded by timm), or with
  ``weights=<local file>`` offline.
- ``train:...`` teachers are trained by the pipeline (``teacher`` stage), not here.

Every teacher comes back frozen (``requires_grad_(False)``) and in eval mode, with a
:class:`TeacherMeta` (architecture, normalisation, source, sha256; ``clean_acc`` and
``robust_acc`` are filled by the evaluation and stored with the teacher artifact).

A kdiga model file is checked before anything is built from it (:mod:`kdiga.models.io`):
the hash of its tensors, and its header against what the caller asks for (``arch``,
``num_classes``, ``in_chans``, ``image_size``, ``model_kwargs``, when given): a header
cannot make the loader build another or a larger model than the study declares.

No code is ever run from a checkpoint: every file is read with
``torch.load(weights_only=True)`` (or safetensors), which unpickles only tensors, plain
containers and the few inert types in :data:`SAFE_CHECKPOINT_GLOBALS`. Anything else is
refused with a :class:`~kdiga.models.CheckpointError` naming the offending globals and how to
convert the file, with or without ``sha256`` (a digest proves which file it is, not that it
is harmless).
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from kdiga.files import ArtifactError, atomic_path, is_safetensors, read_meta, sha256_file
from kdiga.models import (
    CheckpointError,
    CheckpointNotFoundError,
    NormalizedModel,
    build_model,
    is_model_record,
    model_from_record,
    read_checkpoint,
    read_model_record,
)
from kdiga.models.errors import WeightsUnavailableError
from kdiga.models.external import timm_default_stats
from kdiga.models.io import (
    check_model_path,
    check_tensors,
    path_problem,
)

logger = logging.getLogger(__name__)

SCHEMES = ("file", "url", "timm")
CHECKPOINT_FORMATS = ("auto", "kdiga", "state_dict")
URL_SCHEMES = ("https", "file")  # file:// is for local mirrors and tests
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_NORMALIZER_PREFIXES = ("normalizer.", "normalize.")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: built for a raw checkpoint when the caller gives no num_classes, in_chans, image_size
RAW_DEFAULTS = {"num_classes": 10, "in_chans": 3, "image_size": 32}
MAX_DOWNLOAD_MB = 2048.0
_CHUNK = 1 << 20

# The only globals a checkpoint may name beyond tensors and plain containers (applied with
# torch.serialization.safe_globals around each load). Each builds inert data, and runs no
# code of the file's choosing:
SAFE_CHECKPOINT_GLOBALS: tuple[Any, ...] = (
    # The training ``args`` that the robustness library and many research checkpoints store:
    # a bare attribute bag; unpickling it only fills its __dict__.
    argparse.Namespace,
    # NumPy scalars (e.g. ``best_acc = np.float64(...)``), pickled as
    # ``numpy._core.multiarray.scalar(dtype, raw bytes)``: it copies the bytes into a number.
    np.float64(0).__reduce__()[0],
    # ... and their dtype, ``np.dtype("f8", ...)`` plus the per-type class it is built as
    # (numpy.dtypes.Float64DType, ...): descriptions of numeric types, no behaviour. Numeric
    # types only; object arrays and ndarrays are not allowed.
    np.dtype,
    *(
        type(np.dtype(t))
        for t in (
            *(np.bool_, np.int8, np.int16, np.int32, np.int64),
            *(np.uint8, np.uint16, np.uint32, np.uint64),
            *(np.float16, np.float32, np.float64, np.complex64, np.complex128),
        )
    ),
)
_CONVERT = (
    "kdiga never unpickles code from a checkpoint, sha256 or not. To convert it, load it once "
    "in a Python session you trust (torch.load with weights_only set to False) and save only "
    'the weights: torch.save(obj["state_dict"], "clean.pt") or '
    'safetensors.torch.save_file(state_dict, "clean.safetensors"); then point file: at the '
    "new file"
)

M = TypeVar("M", bound=nn.Module)


@dataclass
class TeacherMeta:
    """Where a teacher came from and how good it is (the paper's bracketed numbers).

    ``robust_acc`` maps an attack-and-radius label (e.g. ``"pgd20@8/255"``) to an accuracy.
    """

    arch: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    sha256: str | None = None
    clean_acc: float | None = None
    robust_acc: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists for mean/std)."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TeacherMeta:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ``ValueError``."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        unknown, missing = set(data) - names, required - set(data)
        if unknown or missing:
            raise ValueError(
                f"bad teacher metadata: unknown keys {sorted(unknown)}, missing keys "
                f"{sorted(missing)}; allowed keys: {sorted(names)}"
            )
        values = dict(data)
        values["mean"] = tuple(float(v) for v in values["mean"])
        values["std"] = tuple(float(v) for v in values["std"])
        if values.get("robust_acc") is not None:
            values["robust_acc"] = {str(k): float(v) for k, v in values["robust_acc"].items()}
        return cls(**values)


def freeze(model: M) -> M:
    """Freeze ``model`` in place (no parameter gradients, eval mode) and return it."""
    model.requires_grad_(False)
    model.eval()
    return model


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if not _SHA256.fullmatch(digest):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return digest


def _verify(path: Path, expected: str | None, sha256_key: str = "sha256") -> str:
    actual = sha256_file(path)
    if expected is not None and actual != expected:
        raise CheckpointError(
            f"sha256 mismatch for {path}: expected {expected}, actual {actual} (another file "
            f"than the one named: check {sha256_key} and the file)"
        )
    return actual


def _parse_source(
    source: str, checkpoint_format: str, weights: str | os.PathLike | None
) -> tuple[str, str]:
    """(scheme, rest) of a teacher ``source``; ValueError for a bad source, a bad
    ``checkpoint_format`` or ``weights`` given for a source other than ``timm:``."""
    scheme, sep, rest = source.partition(":")
    if scheme == "train":
        raise ValueError(
            f"{source!r}: 'train:' teachers are trained by the pipeline's teacher stage "
            "(PGD-AT or TRADES, see params.yaml), not loaded by kdiga.teachers"
        )
    if not sep or scheme not in SCHEMES or not rest:
        raise ValueError(
            f"bad teacher source {source!r}; allowed: 'file:<path>', 'url:<https://...>', "
            "'timm:<name>' (and 'train:' in the pipeline)"
        )
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format {checkpoint_format!r} not in {', '.join(CHECKPOINT_FORMATS)}"
        )
    if weights is not None and scheme != "timm":
        raise ValueError(f"weights= is for 'timm:' sources; for {scheme}: the file is the source")
    return scheme, rest


def load_teacher(
    source: str,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    sha256: str | None = None,
    cache_dir: str | os.PathLike = "data/teachers/cache",
    checkpoint_format: str = "auto",
    model_kwargs: Mapping[str, Any] | None = None,
    weights: str | os.PathLike | None = None,
    timeout: float = 60.0,
    max_download_mb: float = MAX_DOWNLOAD_MB,
    sha256_key: str = "sha256",
) -> tuple[NormalizedModel, TeacherMeta]:
    """Load the teacher named by ``source``, frozen and in eval mode, with its metadata.

    Args:
        source: ``"file:<path>"``, ``"url:<https://...>"`` or ``"timm:<name>"``.
        arch: registry name for raw checkpoints (required unless the file is a kdiga model
            file, whose stored architecture must then equal ``arch`` if given).
        num_classes, in_chans, image_size: what to build ``arch`` for (None: 10, 3 and 32,
            see :data:`RAW_DEFAULTS`). A kdiga model file stores its own: those given must
            equal them (None: any).
        mean, std: input normalisation; default: the checkpoint's own (robustness-library
            normalizer, kdiga file), timm's pretrained config, else mean 0, std 1.
        sha256: expected digest of the weights file (required for ``url:``).
        cache_dir: where ``url:`` downloads are kept.
        checkpoint_format: ``"auto"``, ``"kdiga"`` (must be a kdiga model file) or
            ``"state_dict"`` (a raw / RobustBench-style checkpoint for ``arch``).
        model_kwargs: extra architecture options for ``build_model`` (e.g. ``depth``); a kdiga
            model file's stored options must equal them (None: any).
        weights: for ``timm:``, a local weights file to use instead of downloading.
        timeout: seconds to wait for the network (``url:``).
        max_download_mb: a ``url:`` download larger than this stops (MB of 10^6 bytes).
        sha256_key: how a wrong ``sha256`` is named in the message (the params key).

    Returns:
        (model, meta): model maps images [B, C, H, W] in [0, 1] to logits [B, N].
    """
    scheme, rest = _parse_source(source, checkpoint_format, weights)
    digest = _check_sha256(sha256)
    given = {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size}
    expect = {**given, "kwargs": None if model_kwargs is None else dict(model_kwargs)}
    spec = dict(
        arch=arch,
        **{k: RAW_DEFAULTS[k] if v is None else v for k, v in given.items()},
        mean=mean,
        std=std,
        checkpoint_format=checkpoint_format,
        model_kwargs=dict(model_kwargs or {}),
        expect=expect,
        sha256_key=sha256_key,
    )
    if scheme == "file":
        model, meta = _from_file(Path(rest).expanduser(), source, digest, **spec)
    elif scheme == "url":
        if digest is None:
            raise ValueError(f"{source!r}: url sources need sha256= (the file's hex digest)")
        path = fetch_url(rest, digest, cache_dir, timeout=timeout, max_mb=max_download_mb)
        model, meta = _from_file(path, source, digest, **spec)
    else:
        model, meta = _from_timm(rest, source, digest, weights, **spec)
    logger.info("teacher %s: %s (sha256 %s)", source, meta.arch, meta.sha256)
    return freeze(model), meta


def _meta(model: NormalizedModel, source: str, digest: str | None, extra: Mapping) -> TeacherMeta:
    robust = extra.get("robust_acc")
    return TeacherMeta(
        arch=model.arch,
        num_classes=model.num_classes,
        in_chans=model.in_chans,
        image_size=model.image_size,
        mean=tuple(model.mean.flatten().tolist()),
        std=tuple(model.std.flatten().tolist()),
        source=source,
        sha256=digest,
        clean_acc=extra.get("clean_acc"),
        robust_acc=dict(robust) if robust is not None else None,
    )


def _from_file(
    path: Path,
    source: str,
    expected: str | None,
    *,
    arch: str | None,
    checkpoint_format: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    expect: Mapping[str, Any],
    sha256_key: str,
    default_stats: tuple[Sequence[float], Sequence[float]] | None = None,
    **build: Any,
) -> tuple[NormalizedModel, TeacherMeta]:
    if not os.path.lexists(path):
        raise CheckpointNotFoundError(
            f"teacher file {path} does not exist: put the checkpoint there or give another "
            "'file:<path>' (with arch= for a raw state_dict, and its sha256=)"
        )
    check_model_path(path, "checkpoint")  # a directory, a device, a FIFO: said as such
    digest = _verify(path, expected, sha256_key)
    obj = _read_weights(path)
    if is_model_record(obj) and checkpoint_format != "state_dict":
        if arch is not None and arch != obj.get("arch"):
            raise CheckpointError(
                f"{path} holds a {str(obj.get('arch'))[:80]!r} model, not arch={arch!r}"
            )
        model = model_from_record(obj, path, expect={"arch": arch, **expect})
        for given, stored, what in ((mean, model.mean, "mean"), (std, model.std, "std")):
            if given is not None and [float(v) for v in given] != stored.flatten().tolist():
                raise CheckpointError(
                    f"{path} stores {what} {stored.flatten().tolist()}, not {given}"
                )
        return model, _meta(model, source, digest, obj.get("meta") or {})
    if is_model_record(obj):  # read as a raw state_dict: its tensors must still be its own
        check_tensors(obj, path)
    if checkpoint_format == "kdiga":
        raise CheckpointError(f"{path} is not a kdiga model file (checkpoint_format='kdiga')")
    if arch is None:
        raise CheckpointError(f"{path} is a raw checkpoint: give its architecture with arch=")
    state, ckpt_mean, ckpt_std = split_checkpoint(obj, path)
    stats = default_stats or (None, None)
    model = build_model(
        arch,
        build["num_classes"],
        in_chans=build["in_chans"],
        image_size=build["image_size"],
        mean=mean if mean is not None else ckpt_mean if ckpt_mean is not None else stats[0],
        std=std if std is not None else ckpt_std if ckpt_std is not None else stats[1],
        **build["model_kwargs"],
    )
    load_net_state(model, state, path)
    return model, _meta(model, source, digest, {})


def _read_weights(path: Path) -> Any:
    """Tensors of a checkpoint file (plain containers and SAFE_CHECKPOINT_GLOBALS allowed);
    a kdiga model file (either format) comes back as its record."""
    if is_safetensors(path):
        try:
            read_meta(path)
        except ArtifactError:  # a plain safetensors file: its tensors
            try:
                return load_file(path)
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
        return read_model_record(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
            return read_checkpoint(path)
    except CheckpointError as exc:
        if not isinstance(exc.__cause__, pickle.UnpicklingError):
            raise
        raise CheckpointError(
            f"{path}: refused to load: {_unsafe_content(path, exc.__cause__)}; {_CONVERT}"
        ) from exc


def _unsafe_content(path: Path, error: Exception) -> str:
    """What in ``path`` is beyond the allowlist, read without unpickling anything."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"PK"):  # torch.save's zip format: list every global it names
        try:
            with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # unreadable zip: fall back to torch's error below
            names = []
        if names:
            return f"it needs globals that are not allowlisted: {', '.join(names)}"
    magic = torch.serialization.MAGIC_NUMBER
    legacy = magic.to_bytes(10, "little") in head or str(magic).encode() in head
    if not legacy and head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a plain pickle, not a torch.save file, so it cannot be loaded safely"
    # legacy torch format (or an unreadable zip): torch names the first offending global
    found = dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", str(error)))
    if found:
        return f"it needs a global that is not allowlisted: {', '.join(found)}"
    detail = str(error).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
    return (
        f"it holds pickled objects beyond tensors and plain containers ({' '.join(detail.split())})"
    )


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values())


def split_checkpoint(
    obj: Any, path: str | os.PathLike = "<checkpoint>"
) -> tuple[dict[str, Tensor], list[float] | None, list[float] | None]:
    """The net's state_dict and the input (mean, std) stored with it, if any.

    Unwraps ``"state_dict"``/``"model_state_dict"``/``"model"``/``"net"``, strips
    ``"module."``, drops ``attacker.*`` (robustness library), reads ``normalizer.new_mean``/
    ``new_std`` (robustness) or ``normalize.mean``/``std`` (RobustBench), and strips a
    ``"model."`` prefix shared by every remaining key.
    """
    state = obj
    for _ in range(3):
        if _is_tensor_dict(state):
            break
        inner = [k for k in _WRAPPER_KEYS if isinstance(state, Mapping) and k in state]
        if not inner:
            break
        state = state[inner[0]]
    if not _is_tensor_dict(state) or not state:
        keys = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: no state_dict found (top level: {keys}); expected a dict of tensors, "
            f"possibly under one of {_WRAPPER_KEYS}"
        )
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("attacker.")}
    norm = {k: v for k, v in state.items() if k.startswith(_NORMALIZER_PREFIXES)}
    state = {k: v for k, v in state.items() if k not in norm}
    mean = std = None
    for k, v in norm.items():
        leaf = k.rsplit(".", 1)[-1]
        if leaf in ("new_mean", "mean"):
            mean = v.flatten().tolist()
        elif leaf in ("new_std", "std"):
            std = v.flatten().tolist()
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    return state, mean, std


def load_net_state(model: NormalizedModel, state: Mapping[str, Tensor], path: Any) -> None:
    """``model.net.load_state_dict(state, strict=True)``; a mismatch names ``path``."""
    try:
        model.net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        own = set(model.net.state_dict())
        missing = sorted(own - set(state))[:8]
        unexpected = sorted(set(state) - own)[:8]
        raise CheckpointError(
            f"{path}: weights do not fit {model.arch!r} (missing e.g. {missing}, "
            f"unexpected e.g. {unexpected}): {str(exc)[:500]}"
        ) from exc


def cache_path(url: str, sha256: str, cache_dir: str | os.PathLike) -> Path:
    """Where ``url`` is cached: ``<cache_dir>/<sha256[:16]>-<file name>``."""
    name = Path(urllib.parse.urlparse(url).path).name or "weights"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return Path(cache_dir) / f"{sha256[:16]}-{name}"


class DownloadTooLargeError(WeightsUnavailableError):
    """A download went past its size cap (``max_mb``) and was stopped; nothing was kept."""


def fetch_url(
    url: str,
    sha256: str,
    cache_dir: str | os.PathLike,
    *,
    timeout: float = 60.0,
    max_mb: float = MAX_DOWNLOAD_MB,
) -> Path:
    """Download ``url`` once into ``cache_dir`` (atomically), verify ``sha256``, return the path.

    Only ``https://`` and ``file://`` (local mirrors, tests; a regular file only, not a
    device, FIFO or directory) URLs; ``http://`` is refused. At most ``max_mb`` MB (10^6
    bytes) are read: a larger file (or a server that sends without end) stops the download
    with :class:`DownloadTooLargeError`, and nothing is kept. The temporary file of a
    download killed earlier is removed (:func:`kdiga.files.atomic_path`).

    A cached file with the right digest is reused without network. Unreachable -> a
    ``RuntimeError`` saying where to put the file by hand.
    """
    sha256 = _check_sha256(sha256) or ""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "http":
        raise ValueError(
            f"url {url!r}: plain http is refused; use its https:// address (or download the "
            "file yourself and load it with 'file:<path>')"
        )
    if parsed.scheme not in URL_SCHEMES:
        raise ValueError(f"url {url!r}: scheme {parsed.scheme!r} not in {URL_SCHEMES}")
    if isinstance(max_mb, bool) or not isinstance(max_mb, int | float) or not max_mb > 0:
        raise ValueError(f"max_mb={max_mb!r} must be a number of MB > 0")
    dest = cache_path(url, sha256, cache_dir)
    if dest.is_file():
        if sha256_file(dest) == sha256:
            logger.info("using cached %s", dest)
            return dest
        logger.warning("cached %s has a wrong sha256; downloading again", dest)
        dest.unlink()
    local = urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else None
    if local is not None and path_problem(local) not in (None, "does not exist"):
        raise CheckpointError(f"url {url}: {local} {path_problem(local)}; a url reads a file")
    logger.info("downloading %s to %s", url, dest)
    cap = int(max_mb * 1e6)
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as fh:
                size = response.headers.get("Content-Length")
                if size is not None and size.isdigit() and int(size) > cap:
                    raise _too_large(url, f"its size is {int(size) / 1e6:.1f} MB", max_mb)
                _copy_at_most(response, fh, cap, url, max_mb)
        except (OSError, urllib.error.URLError) as exc:
            raise WeightsUnavailableError(
                f"could not reach {url} ({type(exc).__name__}: {exc}). Offline? Download the "
                f"file elsewhere and place it at {dest}, or load it with 'file:<path>'"
            ) from exc
        _verify(tmp, sha256)
    return dest


def _too_large(url: str, what: str, max_mb: float) -> DownloadTooLargeError:
    return DownloadTooLargeError(
        f"download of {url} stopped: {what}, over the cap of {max_mb:g} MB (max_mb); nothing "
        "was kept. Raise the cap if the weights file is really that large"
    )


def _copy_at_most(src: Any, dst: Any, cap: int, url: str, max_mb: float) -> None:
    """Copy ``src`` to ``dst`` in chunks, stopping once more than ``cap`` bytes came."""
    done = 0
    while chunk := src.read(min(_CHUNK, cap + 1 - done)):
        dst.write(chunk)
        done += len(chunk)
        if done > cap:
            raise _too_large(url, "it sent more than that", max_mb)


def _from_timm(
    name: str,
    source: str,
    expected: str | None,
    weights: str | os.PathLike | None,
    *,
    arch: str | None,
    **spec: Any,
) -> tuple[NormalizedModel, TeacherMeta]:
    timm_arch = f"timm:{name}"
    if arch is not None and arch != timm_arch:
        raise ValueError(f"source {source!r} builds {timm_arch!r}, not arch={arch!r}")
    if weights is not None:
        stats = timm_default_stats(name)
        return _from_file(
            Path(weights).expanduser(),
            source,
            expected,
            arch=timm_arch,
            default_stats=stats,
            **spec,
        )
    if expected is not None:
        raise ValueError("sha256= applies to a weights file: give weights=<path> with it")
    if spec["checkpoint_format"] != "auto":
        raise ValueError("checkpoint_format applies to a weights file: give weights=<path>")
    model = build_model(
        timm_arch,
        spec["num_classes"],
        in_chans=spec["in_chans"],
        image_size=spec["image_size"],
        mean=spec["mean"],
        std=spec["std"],
        pretrained=True,
        **spec["model_kwargs"],
    )
    return model, _meta(model, source, None, {})
