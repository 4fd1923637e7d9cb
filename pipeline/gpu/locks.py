"""The lock files of the slot pool: where they live, taking one device's ``flock`` without
blocking, and waiting for one device (:func:`acquire_slot`) or ``n`` at once, all or none
(:func:`acquire_slots`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import re
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.gpu.env import LOCK_DIR_ENV, SLOTS_ENV, VISIBLE_ENV, GpuSlotsError

logger = logging.getLogger("pipeline.gpu")  # the package logs under one name

# A waiter for several devices pauses poll, 2 * poll, ... up to this many polls between tries.
MAX_BACKOFF_POLLS = 8
# Jitter of those pauses: independent of the stages' seeded global RNG (equal in every job).
_JITTER = random.SystemRandom()


def default_lock_dir() -> Path:
    """``$KDIGA_GPU_LOCK_DIR``, else ``/tmp/kdiga-gpu-locks-<uid>``.

    ``/tmp`` rather than ``$TMPDIR``: the locks must be shared by every job on the machine, and
    schedulers often give each job its own ``$TMPDIR``.
    """
    env = os.environ.get(LOCK_DIR_ENV)
    if env:
        return Path(env)
    tmp = Path("/tmp")
    if not tmp.is_dir():
        tmp = Path(tempfile.gettempdir())
    return tmp / f"kdiga-gpu-locks-{os.getuid()}"


def _lock_path(lock_dir: Path, device: str) -> Path:
    return lock_dir / f"gpu{re.sub(r'[^A-Za-z0-9._-]', '_', device)}.lock"


def _lock_dir_error(lock_dir: Path, err: OSError) -> GpuSlotsError:
    """One line naming the lock directory (and the variable that chose it) and what it must be."""
    env = os.environ.get(LOCK_DIR_ENV)
    named = f"{LOCK_DIR_ENV}={env!r}" if env and Path(env) == lock_dir else f"lock dir {lock_dir}"
    shown = named if len(named) <= 200 else f"{named[:200]}..."
    return GpuSlotsError(
        f"{shown}: cannot keep GPU lock files there ({err.strerror or err}); expected a "
        f"directory (or a path where one can be made) that every job of this machine can "
        f"write, on a local file system (default /tmp/kdiga-gpu-locks-<uid>)"
    )


def _make_lock_dir(lock_dir: Path) -> None:
    try:
        lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise _lock_dir_error(lock_dir, err) from None
    if not lock_dir.is_dir():  # mkdir(exist_ok) accepts a symlink to a file on some systems
        raise _lock_dir_error(lock_dir, NotADirectoryError(errno.ENOTDIR, "not a directory"))


def _open_lock(path: Path) -> int:
    try:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # someone else's file in a shared lock dir: flock needs read
            return os.open(path, os.O_RDONLY)
    except OSError as err:
        raise _lock_dir_error(path.parent, err) from None


def _try_lock(path: Path, *, record: bool = True) -> int | None:
    """Open and flock ``path`` without blocking: the descriptor, or None if it is held.

    ``record`` writes who holds it into the file (:func:`_record_holder`).
    """
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    if record:
        _record_holder(fd)
    return fd


def _record_holder(fd: int) -> None:
    """Write this process into a held lock file: for humans and error messages only."""
    with contextlib.suppress(OSError):
        info = f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)


def _holders(lock_dir: Path, ids: Sequence[str]) -> str:
    lines = []
    for device in ids:
        try:
            who = _lock_path(lock_dir, device).read_text().strip() or "unknown"
        except OSError:
            who = "unknown"
        lines.append(f"  gpu {device}: {who}")
    return "\n".join(lines)


def acquire_slot(
    ids: Sequence[str], lock_dir: Path, *, timeout: float | None = None, poll: float = 0.2
) -> tuple[str, int]:
    """Lock the first free device of ``ids``, retrying every ``poll`` s: (device, descriptor).

    Raises ``TimeoutError`` if none frees up within ``timeout`` seconds (None: wait forever).
    The caller releases the slot by closing the descriptor.
    """
    _make_lock_dir(lock_dir)
    start = time.monotonic()
    waiting_logged = False
    while True:
        for device in ids:
            fd = _try_lock(_lock_path(lock_dir, device))
            if fd is not None:
                logger.info(
                    "GPU slot %s acquired after %.1f s (pid %d, locks in %s)",
                    device,
                    time.monotonic() - start,
                    os.getpid(),
                    lock_dir,
                )
                return device, fd
        waited = time.monotonic() - start
        if timeout is not None and waited + poll > timeout:
            raise TimeoutError(
                f"no free GPU slot after {waited:.1f} s (timeout {timeout} s): all {len(ids)} "
                f"slots {list(ids)} are held (locks in {lock_dir}; last recorded holders below). "
                f"Wait for a job to finish, raise the timeout, or list more devices in "
                f"{SLOTS_ENV}.\n{_holders(lock_dir, ids)}"
            )
        if not waiting_logged:
            logger.info("All %d GPU slots %s busy; waiting for one to free up", len(ids), ids)
            waiting_logged = True
        time.sleep(poll)


def _device_order(device: str) -> tuple[int, int, str]:
    """Sort key of device ids: CUDA ordinals by number, then UUIDs by name."""
    return (0, int(device), "") if device.isdigit() else (1, 0, device)


def too_few_error(gpus: int, ids: Sequence[str]) -> GpuSlotsError:
    return GpuSlotsError(
        f"a job of {gpus} GPUs needs {gpus} devices at once, but the pool has only "
        f"{len(ids)}: {list(ids)}; give it at least {gpus} devices ({SLOTS_ENV}, "
        f"{VISIBLE_ENV}, n_slots) or ask for at most {len(ids)} GPUs per job "
        f"(distill.gpus_per_job, --gpus)"
    )


def _try_lock_set(lock_dir: Path, order: Sequence[str], n: int) -> list[tuple[str, int]]:
    """One non-blocking attempt at ``n`` devices of ``order``, taken in that order: the
    (device, descriptor) pairs, or [] with every lock it took released again."""
    held: list[tuple[str, int]] = []
    try:
        for device in order:
            fd = _try_lock(_lock_path(lock_dir, device), record=False)
            if fd is not None:
                held.append((device, fd))
                if len(held) == n:
                    for _, taken in held:
                        _record_holder(taken)
                    return held
    except BaseException:
        for _, taken in held:
            os.close(taken)
        raise
    for _, taken in held:
        os.close(taken)
    return []


def acquire_slots(
    ids: Sequence[str],
    lock_dir: Path,
    n: int,
    *,
    timeout: float | None = None,
    poll: float = 0.2,
) -> tuple[list[str], list[int]]:
    """Lock ``n`` distinct devices of ``ids`` at once, all or none: (devices, descriptors).

    Each attempt try-locks the devices in sorted order without blocking and stops at ``n``;
    short of ``n`` it releases every lock it took before waiting, so a waiter never holds part
    of a set. The pause between attempts starts at ``poll`` s and doubles up to
    ``MAX_BACKOFF_POLLS * poll``, each drawn from its upper half at random, so that two waiters
    do not keep colliding in step. ``n == 1`` is :func:`acquire_slot`. The caller releases the
    devices by closing the descriptors.

    Raises:
        GpuSlotsError: ``n`` is not an int from 1 to ``len(ids)`` (naming both numbers).
        TimeoutError: no ``n`` devices were free together within ``timeout`` seconds (None:
            wait forever).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GpuSlotsError(f"the number of GPUs to hold at once must be an int >= 1, got {n!r}")
    if n > len(ids):
        raise too_few_error(n, ids)
    if n == 1:
        device, fd = acquire_slot(ids, lock_dir, timeout=timeout, poll=poll)
        return [device], [fd]
    _make_lock_dir(lock_dir)
    order = sorted(ids, key=_device_order)
    start = time.monotonic()
    delay, waiting_logged = poll, False
    while True:
        held = _try_lock_set(lock_dir, order, n)
        if held:
            devices = [device for device, _ in held]
            logger.info(
                "GPU slots %s acquired after %.1f s (pid %d, locks in %s)",
                ",".join(devices),
                time.monotonic() - start,
                os.getpid(),
                lock_dir,
            )
            return devices, [fd for _, fd in held]
        waited = time.monotonic() - start
        left = None if timeout is None else timeout - waited
        if left is not None and left <= 0:
            raise TimeoutError(
                f"no {n} free GPU slots at once after {waited:.1f} s (timeout {timeout} s) in "
                f"the pool {list(ids)} (locks in {lock_dir}; last recorded holders below). Wait "
                f"for jobs to finish, raise the timeout, or list more devices in {SLOTS_ENV}."
                f"\n{_holders(lock_dir, ids)}"
            )
        if not waiting_logged:
            logger.info("Fewer than %d of the GPU slots %s free; waiting", n, list(ids))
            waiting_logged = True
        pause = delay * _JITTER.uniform(0.5, 1.0)
        time.sleep(pause if left is None else min(pause, left))
        delay = min(2 * delay, MAX_BACKOFF_POLLS * poll)
