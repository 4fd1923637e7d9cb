"""Holding devices of the pool for a ``with`` block: which devices make up the pool
(:func:`resolve_pool`), :func:`gpu_slot` (one device) and :func:`gpu_slots` (several at once),
with ``CUDA_VISIBLE_DEVICES`` set to them while held."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.gpu import cuda
from pipeline.gpu.env import (
    HELD_ENV,
    MAX_SLOTS,
    SLOTS_ENV,
    VISIBLE_ENV,
    GpuSlotsError,
    parse_slots,
    parse_visible,
    scoped_env,
    set_env,
)
from pipeline.gpu.locks import acquire_slots, default_lock_dir, too_few_error

logger = logging.getLogger("pipeline.gpu")  # the package logs under one name

# CUDA_VISIBLE_DEVICES as it was before each slot this process holds now, outermost first.
_HELD_HERE: list[str | None] = []


def _inherited(visible: str | None) -> str | None:
    """The device a parent process holds for us, if this process runs inside its slot."""
    pid, _, device = os.environ.get(HELD_ENV, "").partition(":")
    if device and device == visible and pid != str(os.getpid()):
        return device
    return None


def resolve_pool(n_slots: int | None, gpus: int = 1) -> tuple[list[str], bool]:
    """(device ids, whether to lock) for a job of ``gpus`` devices: see the docstring of
    :mod:`pipeline.gpu` for the order of the sources."""
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
    with scoped_env(VISIBLE_ENV, None):  # count all devices, not the one an outer holder set
        count = cuda.device_count()
    return [str(i) for i in range(count)], True


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
    the defaults are described in :mod:`pipeline.gpu`. ``timeout`` (seconds, None = forever)
    bounds the wait for a free slot, then ``TimeoutError``; ``poll`` is the retry interval.
    ``os.environ`` is per process: use the yielded id, not the variable, across threads.
    """
    with hold(n_slots=n_slots, lock_dir=lock_dir, timeout=timeout, poll=poll) as (devices, _):
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
    held = hold(gpus=gpus, n_slots=n_slots, lock_dir=lock_dir, timeout=timeout, poll=poll)
    with held as (devices, _):
        yield devices


@contextmanager
def hold(
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
    ids, lock = resolve_pool(n_slots, gpus)
    if not ids:
        logger.info("No GPU slots (no %s, no CUDA device): running on the CPU", SLOTS_ENV)
        yield None, []
        return
    if len(ids) < gpus:
        raise too_few_error(gpus, ids)
    if not lock:
        devices = ids[:gpus]
        logger.info(
            "Using GPU %s given to this job (%s), no slot lock", ",".join(devices), VISIBLE_ENV
        )
        yield devices, []
        return
    cuda.warn_if_cuda_initialised()
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
            set_env(name, value)
        for fd in fds:
            os.close(fd)  # releases the flock (the kernel also does it if we die first)
        logger.info("GPU slot%s %s released", "s" if len(devices) > 1 else "", held)
