"""Small torch helpers: an atomic ``torch.save``, seeding, eval mode for a block, and
double-backward-safe attention. Atomic writes of other files and checksums are in
:mod:`kdiga.files`."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kdiga.files import atomic_path, write_error

logger = logging.getLogger(__name__)


# torch.save's C++ writer reports a failed write as a RuntimeError, without the errno.
_TORCH_WRITE_FAILURE = re.compile(r"inline_container|file write failed|unexpected pos")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and an atomic rename.

    Raises:
        ArtifactWriteError: the file could not be written (see :func:`atomic_path`).
    """
    with atomic_path(path) as tmp:
        try:
            # Through a Python file, a failed write raises OSError with its errno (disk full,
            # quota): torch's own writer would only say "unexpected pos".
            with open(tmp, "wb") as fh:
                torch.save(obj, fh)
        except RuntimeError as exc:
            if not _TORCH_WRITE_FAILURE.search(str(exc)):
                raise
            reason = "torch.save could not write the file (is the disk full or over quota?)"
            raise write_error(Path(path), reason, "writing", None) from exc


def machine_info() -> dict[str, Any]:
    """What computes here: the CPU's model and cores, the Python, torch and thread count (a
    GPU, when one is used, is added by whoever picks it: :func:`gpu_name`). The same code on
    another processor, another torch or another thread count adds in another order, so its
    numbers differ in the last bits and its trained models differ more."""
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def gpu_name(device: str | torch.device) -> str | None:
    """The name of CUDA ``device`` (None for another device)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


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
