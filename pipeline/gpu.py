"""Hand each concurrent job its own GPU: a slot pool of ``flock``-ed lock files.

Snakemake counts ``resources: gpu=1`` tokens but never says *which* GPU a job gets
(snakemake/snakemake issue 281), and several ``dvc exp run --queue`` workers can run at once.
:func:`gpu_slot` closes that gap: every job takes an exclusive, non-blocking ``fcntl.flock`` on
one of ``<lock_dir>/gpu<id>.lock`` and sets ``CUDA_VISIBLE_DEVICES=<id>`` while it holds it.

Why ``flock`` and not "the lock file exists":

- Taking the lock is one atomic kernel operation, so jobs that start at the same instant never
  both get the same device (no check-then-create race).
- The kernel drops the lock when the last descriptor of the open file goes away, i.e. when the
  process exits *however it exits*, SIGKILL and the OOM killer included. A crashed job never
  leaves a stale lock behind, so there is nothing to clean up. (The lock files themselves stay
  and must never be deleted: deleting one while another job has it open would let two jobs
  hold "the same" lock on two different files.)
- ``flock`` locks belong to the open file, not the process (unlike POSIX ``lockf`` locks), so
  two holders in one process exclude each other as well, and a child process that inherits
  the descriptor keeps the device locked (the CLI relies on this).

The lock directory must be on a local file system shared by every job of the machine (``/tmp``
by default; set ``KDIGA_GPU_LOCK_DIR`` when ``/tmp`` is private per job or per user).

Which devices make up the pool, first match wins:

1. Inside a slot held by a parent process (the CLI, or any ancestor calling :func:`gpu_slot`):
   that device (or that set of devices), without locking again.
2. ``n_slots`` argument: devices ``"0" .. str(n_slots - 1)``.
3. ``KDIGA_GPU_SLOTS``: a comma-separated list of device ids (``"4,5"`` hands out ``"4"`` and
   ``"5"``; use a trailing comma, ``"4,"``, for a single id) or a bare count (``"4"`` means
   ``"0,1,2,3"``; ``"0"`` means none). An id is a CUDA ordinal (below 1024) or a GPU/MIG UUID
   (``GPU-...``, ``MIG-...``); a count is at most 1024. Anything else is refused with a
   :class:`GpuSlotsError` (a ``ValueError``) naming the value and the allowed forms.
4. ``CUDA_VISIBLE_DEVICES`` already set (by SLURM, for instance): as many devices as the job
   takes (one; N for ``gpu_slots(N)``) are this job's own and are yielded without locking; more
   are shared as a pool; none (``""``) means CPU.
5. ``torch.cuda.device_count()`` devices (counted through NVML, which does not initialise
   CUDA in this process); zero means CPU: yield ``None`` and leave the environment alone.

Each :func:`gpu_slot` entered in one process takes its own slot (its own device); a process
started inside a slot (``KDIGA_GPU_HELD`` names the holder) shares its parent's device.

Several devices for one job (a DDP run, ``distill.gpus_per_job``): :func:`gpu_slots` (CLI:
``--gpus N``) holds N distinct devices of the pool at once, all or none, and sets
``CUDA_VISIBLE_DEVICES`` to the N ids comma-joined (``"0,1,2,3"``). Each attempt try-locks
the pool's devices in sorted order without blocking and, short of N, releases what it took
before waiting (:func:`acquire_slots`): no job ever waits while holding part of a set, so two
jobs can never each hold half of what they need. A ``CUDA_VISIBLE_DEVICES`` of exactly N
devices (SLURM's ``--gpus=N``) is the job's own and used without locking; a pool smaller than
N is refused with a :class:`GpuSlotsError` naming both numbers.

``CUDA_VISIBLE_DEVICES`` only binds CUDA if it is set before CUDA initialises in a process, so
enter the slot before touching ``torch.cuda`` (then the device is ``cuda:0`` inside), or run
the GPU work in a subprocess (``python -m pipeline.gpu -- <command ...>``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from kdiga.errors import KdigaError

logger = logging.getLogger(__name__)

SLOTS_ENV = "KDIGA_GPU_SLOTS"
LOCK_DIR_ENV = "KDIGA_GPU_LOCK_DIR"
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
HELD_ENV = "KDIGA_GPU_HELD"  # "<pid>:<id>[,<id>...]" of the process holding the locks

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
# What KDIGA_GPU_SLOTS may list: CUDA ordinals, or GPU/MIG UUIDs as CUDA_VISIBLE_DEVICES takes.
_ORDINAL = re.compile(r"[0-9]+")
_UUID = re.compile(r"(?:GPU|MIG)-[A-Za-z0-9][A-Za-z0-9._:/-]*")
MAX_SLOTS = 1024  # more devices than any one machine has: a larger count or ordinal is a typo
_SLOTS_FORMS = (
    f"expected a device count from 0 to {MAX_SLOTS} ('4' means devices 0,1,2,3; '0' means "
    f"none) or a comma-separated list of distinct device ids, each a CUDA ordinal below "
    f"{MAX_SLOTS} or a GPU/MIG UUID ('0,1,2,3', 'GPU-8a1f...,MIG-...'; a single id with a "
    f"trailing comma: '4,')"
)
# CUDA_VISIBLE_DEVICES as it was before each slot this process holds now, outermost first.
_HELD_HERE: list[str | None] = []
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
        import tempfile

        tmp = Path(tempfile.gettempdir())
    return tmp / f"kdiga-gpu-locks-{os.getuid()}"


class GpuSlotsError(KdigaError, ValueError):
    """A ``KDIGA_GPU_SLOTS`` value (or ``n_slots``) that is not a valid pool."""


def _slots_error(spec: str, problem: str) -> GpuSlotsError:
    shown = spec if len(spec) <= 80 else f"{spec[:60]}... ({len(spec)} characters)"
    return GpuSlotsError(f"{SLOTS_ENV}={shown!r}: {problem}; {_SLOTS_FORMS}")


def _ordinal(tok: str) -> int | None:
    """``tok`` as a CUDA ordinal below MAX_SLOTS; None if it is too large (never a huge int)."""
    digits = tok.lstrip("0") or "0"
    if len(digits) > len(str(MAX_SLOTS)) or int(digits) >= MAX_SLOTS:
        return None
    return int(digits)


def parse_slots(spec: str) -> list[str]:
    """Device ids from a ``KDIGA_GPU_SLOTS`` value: ``"0,1,2,3"``, ``"4,"`` or a count ``"4"``.

    Raises:
        GpuSlotsError: (a ValueError) naming the variable, the value and the allowed forms.
    """
    spec = spec.strip()
    if "," not in spec and _ORDINAL.fullmatch(spec):
        digits = spec.lstrip("0") or "0"
        if len(digits) > len(str(MAX_SLOTS)) or int(digits) > MAX_SLOTS:  # checked before range()
            raise _slots_error(spec, f"a count of more than {MAX_SLOTS} devices")
        return [str(i) for i in range(int(digits))]
    ids: list[str] = []
    seen: set[str] = set()
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        if _ORDINAL.fullmatch(tok):
            n = _ordinal(tok)
            if n is None:
                raise _slots_error(spec, f"device {tok!r} is not a CUDA ordinal below {MAX_SLOTS}")
            tok = str(n)  # "07" and "7" are one device, with one lock file
        elif not _UUID.fullmatch(tok):
            raise _slots_error(spec, f"{tok!r} is not a device id")
        if tok in seen:
            raise _slots_error(spec, f"device {tok!r} is listed twice")
        ids.append(tok)
        seen.add(tok)
    if not ids:
        raise _slots_error(spec, "no device id in it")
    return ids


def parse_visible(spec: str) -> list[str]:
    """Device ids in a ``CUDA_VISIBLE_DEVICES`` value; like CUDA, stop at the first invalid id."""
    ids: list[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not _DEVICE_ID.fullmatch(tok):  # "" or "-1": CUDA ignores this and all later ids
            break
        ids.append(tok)
    return ids


def _cuda_device_count() -> int:
    """Number of CUDA devices; 0 without torch or CUDA. Does not initialise CUDA (NVML)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count())


def _inherited(visible: str | None) -> str | None:
    """The device a parent process holds for us, if this process runs inside its slot."""
    pid, _, device = os.environ.get(HELD_ENV, "").partition(":")
    if device and device == visible and pid != str(os.getpid()):
        return device
    return None


def _resolve_pool(n_slots: int | None, gpus: int = 1) -> tuple[list[str], bool]:
    """(device ids, whether to lock) for a job of ``gpus`` devices: see the module docstring
    for the order of the sources."""
    visible = os.environ.get(VISIBLE_ENV)
    device = _inherited(visible)
    if device is not None:
        return device.split(","), False
    if n_slots is not None:
        if (
            isinstance(n_slots, bool)
            or not isinstance(n_slots, int)
            or not 0 <= n_slots <= MAX_SLOTS
        ):
            raise GpuSlotsError(
                f"n_slots must be an int from 0 to {MAX_SLOTS} (or None for auto), got {n_slots!r}"
            )
        return [str(i) for i in range(n_slots)], True
    spec = os.environ.get(SLOTS_ENV, "").strip()
    if spec:
        return parse_slots(spec), True
    if _HELD_HERE:  # CUDA_VISIBLE_DEVICES is ours: pool from what this process was given
        visible = _HELD_HERE[0]
    if visible is not None:
        ids = parse_visible(visible)
        return ids, len(ids) > gpus
    with _env(VISIBLE_ENV, None):  # count all devices, not the one an outer holder set
        count = _cuda_device_count()
    return [str(i) for i in range(count)], True


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


def _too_few(gpus: int, ids: Sequence[str]) -> GpuSlotsError:
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
        raise _too_few(n, ids)
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


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    saved = os.environ.get(name)
    _set_env(name, value)
    try:
        yield
    finally:
        _set_env(name, saved)


@contextmanager
def gpu_slot(
    *,
    n_slots: int | None = None,
    lock_dir: str | Path | None = None,
    timeout: float | None = None,
    poll: float = 0.2,
) -> Iterator[str | None]:
    """Hold one GPU of the pool for the ``with`` block; yield its id (``"2"``) or None (CPU).

    While held, ``CUDA_VISIBLE_DEVICES`` is the yielded id (restored afterwards), and child
    processes started inside reuse this device rather than taking another slot. The pool and
    the defaults are described in the module docstring. ``timeout`` (seconds, None = forever)
    bounds the wait for a free slot, then ``TimeoutError``; ``poll`` is the retry interval.
    ``os.environ`` is per process: use the yielded id, not the variable, across threads.
    """
    with _hold(n_slots=n_slots, lock_dir=lock_dir, timeout=timeout, poll=poll) as (devices, _):
        yield None if devices is None else devices[0]


@contextmanager
def gpu_slots(
    gpus: int,
    *,
    n_slots: int | None = None,
    lock_dir: str | Path | None = None,
    timeout: float | None = None,
    poll: float = 0.2,
) -> Iterator[list[str] | None]:
    """Hold ``gpus`` distinct GPUs of the pool at once for the ``with`` block, all or none;
    yield their ids (``["0", "1"]``) or None (CPU).

    While held, ``CUDA_VISIBLE_DEVICES`` lists them comma-joined (restored afterwards); child
    processes started inside share them (a torchrun job's workers take one each, by
    ``LOCAL_RANK``). Waiting, ``timeout`` and ``poll`` as in :func:`acquire_slots`.

    Raises:
        GpuSlotsError: the pool has fewer than ``gpus`` devices (naming both numbers).
        ValueError: ``gpus`` is not an int >= 1, or a bad ``timeout`` or ``poll``.
    """
    held = _hold(gpus=gpus, n_slots=n_slots, lock_dir=lock_dir, timeout=timeout, poll=poll)
    with held as (devices, _):
        yield devices


@contextmanager
def _hold(
    *,
    n_slots: int | None,
    lock_dir: str | Path | None,
    timeout: float | None,
    poll: float,
    gpus: int = 1,
) -> Iterator[tuple[list[str] | None, list[int]]]:
    """:func:`gpu_slots`, also yielding the lock descriptors (none when nothing was locked)."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be an int >= 1 (devices held at once), got {gpus!r}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None (wait forever), got {timeout}")
    if not poll > 0:
        raise ValueError(f"poll must be > 0 seconds, got {poll}")
    ids, lock = _resolve_pool(n_slots, gpus)
    if not ids:
        logger.info("No GPU slots (no %s, no CUDA device): running on the CPU", SLOTS_ENV)
        yield None, []
        return
    if len(ids) < gpus:
        raise _too_few(gpus, ids)
    if not lock:
        devices = ids[:gpus]
        logger.info(
            "Using GPU %s given to this job (%s), no slot lock", ",".join(devices), VISIBLE_ENV
        )
        yield devices, []
        return
    _warn_if_cuda_initialised()
    devices, fds = acquire_slots(
        ids,
        Path(lock_dir) if lock_dir is not None else default_lock_dir(),
        gpus,
        timeout=timeout,
        poll=poll,
    )
    held = ",".join(devices)
    saved = {name: os.environ.get(name) for name in (VISIBLE_ENV, HELD_ENV)}
    _HELD_HERE.append(saved[VISIBLE_ENV])
    try:
        os.environ[VISIBLE_ENV] = held
        os.environ[HELD_ENV] = f"{os.getpid()}:{held}"
        yield devices, fds
    finally:
        _HELD_HERE.pop()
        for name, value in saved.items():
            _set_env(name, value)
        for fd in fds:
            os.close(fd)  # releases the flock (the kernel also does it if we die first)
        logger.info("GPU slot%s %s released", "s" if len(devices) > 1 else "", held)


def check_cuda(devices: Sequence[str]) -> None:
    """Refuse to run a job on ``devices`` (held from the pool) when CUDA sees none of them:
    no NVIDIA driver, or ids this machine lacks. Raises a :class:`GpuSlotsError` naming the
    variable that chose them, its value and what is allowed."""
    if _cuda_device_count() > 0:
        return
    spec = os.environ.get(SLOTS_ENV, "").strip()
    named = f"{SLOTS_ENV}={spec!r}" if spec else f"{VISIBLE_ENV}={','.join(devices)!r}"
    raise GpuSlotsError(
        f"{named} gives this job GPU {','.join(devices)}, but CUDA sees no such device here "
        f"(no NVIDIA driver, or no device with that id); allowed: {SLOTS_ENV}=0 to run on the "
        f"CPU, or the ids of devices this machine has"
    )


def _warn_if_cuda_initialised() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        logger.warning(
            "CUDA is already initialised in this process: setting %s now does not change which "
            "GPU it uses; enter gpu_slot() before touching torch.cuda or run the work in a "
            "subprocess",
            VISIBLE_ENV,
        )


def run_in_slots(
    command: Sequence[str],
    gpus: int,
    *,
    extra_env: Mapping[str, str] | None = None,
    n_slots: int | None = None,
    lock_dir: str | Path | None = None,
    timeout: float | None = None,
    poll: float = 0.2,
) -> int | None:
    """Run ``command`` holding ``gpus`` devices (:func:`gpu_slots`), with ``extra_env`` added
    to its environment: its exit status (128 + N if killed by signal N), or None when there is
    no GPU (nothing is run: the caller does the work on the CPU).

    As with the CLI, the child inherits the locks (the devices stay locked while it runs, even
    if this process is killed first) and SIGTERM/SIGHUP are forwarded to it.
    """
    held = _hold(gpus=gpus, n_slots=n_slots, lock_dir=lock_dir, timeout=timeout, poll=poll)
    with held as (devices, fds):
        if devices is None:
            return None
        return _run_child(command, fds, env={**os.environ, **(extra_env or {})})


def _run_child(
    command: Sequence[str], fds: Sequence[int], env: Mapping[str, str] | None = None
) -> int:
    """Run ``command``, forwarding SIGTERM/SIGHUP; its exit status (128 + signal if killed)."""
    try:
        # The child inherits the lock descriptors: the devices stay locked while it runs, even
        # if this wrapper is killed first.
        child = subprocess.Popen(list(command), pass_fds=tuple(fds), env=env)
    except FileNotFoundError:
        print(f"pipeline.gpu: command not found: {command[0]}", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"pipeline.gpu: command not executable: {command[0]}", file=sys.stderr)
        return 126

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    handled = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    # SIGINT from a terminal already reaches the child (same process group): just keep waiting.
    previous = {
        sig: signal.signal(sig, forward if sig != signal.SIGINT else signal.SIG_IGN)
        for sig in handled
    }
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m pipeline.gpu [options] -- <command ...>`` runs the command in a slot."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.gpu",
        description="Run a command holding a free GPU slot (--gpus N: N at once), with "
        "CUDA_VISIBLE_DEVICES set to it (the N ids, comma-joined). "
        "The exit status is the command's (128 + N if killed by signal N).",
    )
    parser.add_argument("--n-slots", type=int, default=None, help=f"pool size (else ${SLOTS_ENV})")
    parser.add_argument(
        "--gpus", type=int, default=1, help="devices to hold at once, all or none (default 1)"
    )
    parser.add_argument("--lock-dir", default=None, help=f"lock directory (else ${LOCK_DIR_ENV})")
    parser.add_argument("--timeout", type=float, default=None, help="max seconds to wait")
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between retries")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command and arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: python -m pipeline.gpu -- <command ...>")
    try:
        with _hold(
            gpus=args.gpus,
            n_slots=args.n_slots,
            lock_dir=args.lock_dir,
            timeout=args.timeout,
            poll=args.poll,
        ) as (_, fds):
            return _run_child(command, fds)
    except (TimeoutError, ValueError) as exc:
        print(f"pipeline.gpu: {exc}", file=sys.stderr)
        return 75  # EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
