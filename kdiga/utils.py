"""Small shared helpers: atomic writes, checksums, seeding, double-backward-safe attention."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    No partial file is ever left at ``path``: on an exception the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Force PyTorch's math SDPA backend, the only one with a double backward.

    The flash and memory-efficient kernels (and the CPU default) raise on double backward
    (pytorch/pytorch#116350); the IGA term backpropagates through the student's input
    gradient, so the student's forward must run under this context when the term is on.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Put modules in eval mode and restore each one's previous mode afterwards."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
