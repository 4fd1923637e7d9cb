"""Byte-stable tensor files: safetensors with JSON metadata.

``torch.save`` is not byte-stable: its zip names the inner folder after the file it writes
(a random temporary name under an atomic write) and every save carries an id, so identical
weights hash differently and everything keyed by a hash re-runs. It also pickles, and
reading a pickle can run code. A safetensors file is a JSON header and the raw tensor bytes:
the same tensors and metadata always give the same bytes, and reading one runs nothing.

:func:`save_tensors` writes named tensors plus a JSON-able ``meta`` dict (stored, with sorted
keys, under the header's ``__metadata__["kdiga"]``) atomically; :func:`load_tensors` reads
them back, optionally memory-mapped; :func:`kdiga.files.read_meta` reads only the header,
without torch. Files written
here are ordinary safetensors files: ``safetensors.torch.load_file`` reads them too.

:func:`tensors_sha256` is the checksum a file's metadata records of its tensors (names,
dtypes, shapes and bytes), so a reader can tell that the weights are the ones written with
the header: model files (:mod:`kdiga.models.io`) and teacher signals (:mod:`kdiga.signals`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from kdiga.files import META_KEY, ArtifactError, atomic_path, read_header, read_meta

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def hash_tensors(h: Any, items: Iterable[tuple[str, Tensor]]) -> None:
    """Feed ``items`` (name, tensor) to the hash ``h``: each name, dtype, shape and the bytes."""
    for name, t in items:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            flat = t.detach().cpu().contiguous().reshape(-1)
            h.update(memoryview(flat.view(torch.uint8).numpy()))


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """sha256 of named tensors (in name order: a file's and a module's agree), see
    :func:`hash_tensors`."""
    h = hashlib.sha256()
    hash_tensors(h, sorted(tensors.items()))
    return h.hexdigest()


def save_tensors(
    tensors: Mapping[str, Tensor], path: str | os.PathLike, *, meta: Mapping[str, Any]
) -> None:
    """Write ``tensors`` and ``meta`` (plain JSON values) to ``path``, atomically.

    The bytes depend only on the tensors' names, dtypes, shapes and values and on ``meta``.
    Tensors are copied to contiguous CPU memory first (views of one storage are stored as
    separate tensors).
    """
    bad = sorted(k for k, v in tensors.items() if not isinstance(v, Tensor))
    if bad:
        raise ValueError(f"save_tensors stores tensors only; not tensors: {bad}")
    data, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            v = v.clone()  # safetensors refuses tensors sharing memory (tied weights)
        seen.add(v.untyped_storage().data_ptr())
        data[k] = v
    try:
        text = json.dumps(dict(meta), sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise ValueError(f"meta must hold plain JSON values: {exc}") from exc
    with atomic_path(path) as tmp:  # streamed to disk, not built in memory first
        save_file(data, tmp, metadata={META_KEY: text})


def load_tensors(
    path: str | os.PathLike, *, mmap: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and ``meta`` of a :func:`save_tensors` file.

    With ``mmap=True`` the tensors are views of a private, read-on-demand mapping of the
    file (pages come from the OS page cache, writes never reach the file).

    Raises:
        ArtifactError: the file is missing, truncated, or its header is corrupt.
    """
    path = Path(path)
    header, start, size = read_header(path)
    meta = read_meta(path)
    if mmap:
        buf = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    else:
        buf = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    if buf.numel() != size:
        raise ArtifactError(f"{path} changed while it was read")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            lo, hi = (start + int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{path}: corrupt entry for {name!r} ({exc!r})") from None
        if not start <= lo <= hi <= size:
            raise ArtifactError(f"{path}: truncated ({size} bytes; {name!r} ends at {hi})")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (hi - lo) != itemsize * _numel(shape):
            raise ArtifactError(f"{path}: corrupt entry for {name!r} (size vs shape)")
        try:
            out[name] = buf[lo:hi].view(dtype).reshape(shape)
        except RuntimeError as exc:  # misaligned offsets, negative dimensions
            raise ArtifactError(f"{path}: corrupt entry for {name!r} ({exc})") from None
    return out, meta


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
