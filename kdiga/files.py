"""Files written whole or not at all, and their checksums: no torch, so the params schema,
the DAG and the provenance checks load without it.

:func:`atomic_path` writes through a temporary file and an atomic rename (no partial file is
ever left where a complete one is expected); :func:`atomic_write_text` is its text form;
:func:`remove_stale_temporaries` removes the temporary files and folders that a killed writer
left (``kill -9`` runs no cleanup): each is named after its target and the writer's process;
:func:`sha256_file` hashes a file's bytes; :func:`read_meta` reads the kdiga metadata of a
safetensors file (:mod:`kdiga.artifacts`) from its header alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdiga.errors import KdigaError

#: where kdiga's metadata sits in a safetensors header (``__metadata__["kdiga"]``)
META_KEY = "kdiga"
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class ArtifactWriteError(KdigaError, OSError):
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


def write_error(path: Path, reason: str, step: str, errno: int | None) -> ArtifactWriteError:
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


def _host() -> str:
    """This machine's name as it goes into a temporary file's name (at most 32 characters)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def temporary_prefix(name: str) -> str:
    """The name prefix of this process's temporary files and folders for ``name`` (a file or
    folder beside them): ``.<name>.<pid>@<host>.``; :func:`remove_stale_temporaries` reads
    the writer back from it."""
    return f".{name}.{os.getpid()}@{_host()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike, suffix: str = ".tmp") -> list[Path]:
    """Remove what killed writers of ``path`` left beside it; return what was removed.

    A temporary is ``<dir>/.<name>.<pid>@<host>.<random><suffix>`` (:func:`temporary_prefix`,
    ``<name>`` being ``path``'s): those of a process of this host that is no longer running
    are removed (files, or folders with their contents). Those of a running process, of
    another host (its processes cannot be seen from here), and any other file are left.
    Those an older kdiga left (``.<name>.<8 random characters><suffix>``, as ``tempfile``
    names them, with no writer in the name) are removed too: only a writer of that older
    kdiga writing the same file at this moment could still be using one.
    """
    path = Path(path)
    name, end = re.escape(path.name), re.escape(suffix)
    pattern = re.compile(rf"\.{name}\.(\d+)@([A-Za-z0-9-]+)\.[A-Za-z0-9_]+{end}")
    unnamed = re.compile(rf"\.{name}\.[a-z0-9_]{{8}}{end}")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:  # no folder yet: nothing left there
        return removed
    host = _host()
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        gone = found is not None and found[2] == host and not _alive(int(found[1]))
        if not (gone or unnamed.fullmatch(entry.name)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    No partial file is ever left at ``path``: on an exception the temporary file is removed
    and an earlier file at ``path`` stays as it was. The file gets the permissions of a newly
    created one (``0o666`` less the umask), not the ``0o600`` of a temporary file. The
    temporary is named by :func:`temporary_prefix`; those of earlier writers of ``path``
    that were killed (``kill -9``) are removed first (:func:`remove_stale_temporaries`).

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
        remove_stale_temporaries(path)
        step = "creating a temporary file beside it"
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=temporary_prefix(path.name), suffix=".tmp"
        )
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
        raise write_error(path, reason, step, exc.errno) from exc
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink(missing_ok=True)


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


class ArtifactError(KdigaError, ValueError):
    """A tensor file that is missing, truncated, corrupt or not what was expected."""


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file (an 8-byte length, then ``{``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def read_header(path: Path) -> tuple[dict, int, int]:
    """The parsed JSON header, where the data starts and the file's size."""
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist (or is not a file)")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path}: truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_HEADER_LIMIT, size - 8):
            raise ArtifactError(f"{path}: not a safetensors file, or truncated (header of {n} B)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n, size


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` dict of a :func:`save_tensors` file, reading only its header."""
    path = Path(path)
    header, _, _ = read_header(path)
    text = (header.get("__metadata__") or {}).get(META_KEY)
    if text is None:
        raise ArtifactError(f"{path}: a safetensors file without kdiga metadata")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: corrupt kdiga metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: corrupt kdiga metadata (not a JSON object)")
    return meta
