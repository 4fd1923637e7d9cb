"""Small shared helpers: atomic writes, checksums, seeding, double-backward-safe attention."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


class ArtifactWriteError(OSError):
    """An artifact could not be written (disk full, no permission, ...).

    Raised by :func:`atomic_path` (and the helpers built on it) with one line naming the
    target file, what failed and at which step. Nothing partial is left behind: neither the
    temporary file nor a partial target, and an earlier file at the target is unchanged.
    ``path`` is the target; ``errno`` the failed call's, when known.
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike | None = None, errno: int | None = None
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.errno = errno


def _write_error(path: Path, reason: str, step: str, errno: int | None) -> ArtifactWriteError:
    code = f"errno {errno}, " if errno else ""
    return ArtifactWriteError(
        f"cannot write {path}: {reason} ({code}while {step}); any earlier file there is unchanged",
        path=path,
        errno=errno,
    )


def _os_error_reason(exc: OSError, path: Path) -> str:
    """``exc``'s reason, naming the file it is about unless that is ``path`` or its temp file."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    for name in (exc.filename, exc.filename2):
        if name is None or isinstance(name, int):
            continue
        other = Path(os.fsdecode(name))
        ours = other == path or (
            other.parent == path.parent and other.name.startswith(f".{path.name}.")
        )
        if not ours:
            reason += f": {other}"
    return reason


def current_umask() -> int:
    """The process umask, without changing it (even for a moment) where /proc tells it."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o077)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    No partial file is ever left at ``path``: on an exception the temporary file is removed
    and an earlier file at ``path`` stays as it was. The file gets the permissions of a newly
    created one (``0o666`` less the umask), not the ``0o600`` of a temporary file.

    Raises:
        ArtifactWriteError: an ``OSError`` (disk full, no permission, ...) while creating the
            temporary file, writing it (in the ``with`` body), flushing it or renaming it;
            one line naming ``path``, the reason and the step, the ``OSError`` chained.
    """
    path = Path(path)
    tmp_path: Path | None = None
    step = "creating its directory"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        step = "creating a temporary file beside it"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp_path = Path(tmp)
        step = "writing"
        yield tmp_path
        step = "setting its permissions"
        os.chmod(tmp_path, 0o666 & ~current_umask())
        step = "flushing it to disk"
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        step = "renaming it into place"
        os.replace(tmp_path, path)
    except ArtifactWriteError:
        raise  # from a nested atomic write: already names its file
    except OSError as exc:
        reason = _os_error_reason(exc, path)
        raise _write_error(path, reason, step, exc.errno) from exc
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink(missing_ok=True)


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
            raise _write_error(Path(path), reason, "writing", None) from exc


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename.

    Raises:
        ArtifactWriteError: the file could not be written (see :func:`atomic_path`).
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
