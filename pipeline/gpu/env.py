"""The variables the slot pool reads and the values they may hold: ``KDIGA_GPU_SLOTS``
(:func:`parse_slots`), ``CUDA_VISIBLE_DEVICES`` (:func:`parse_visible`), and
:class:`GpuSlotsError` for a value that is not a valid pool."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from kdiga.errors import KdigaError

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


def set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextmanager
def scoped_env(name: str, value: str | None) -> Iterator[None]:
    saved = os.environ.get(name)
    set_env(name, value)
    try:
        yield
    finally:
        set_env(name, saved)
