"""What CUDA sees in this process: the device count (through NVML, without initialising
CUDA), the refusal of a job whose held devices CUDA cannot see, and the warning when CUDA was
initialised before a slot set ``CUDA_VISIBLE_DEVICES``."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from pipeline.gpu.env import SLOTS_ENV, VISIBLE_ENV, GpuSlotsError

logger = logging.getLogger("pipeline.gpu")  # the package logs under one name


def device_count() -> int:
    """Number of CUDA devices; 0 without torch or CUDA. Does not initialise CUDA (NVML)."""
    try:
        import torch  # noqa: PLC0415 (heavy and optional: pipeline.gpu is imported where torch is not needed)
    except ImportError:
        return 0
    return int(torch.cuda.device_count())


def check_cuda(devices: Sequence[str]) -> None:
    """Refuse to run a job on ``devices`` (held from the pool) when CUDA sees none of them:
    no NVIDIA driver, or ids this machine lacks. Raises a :class:`GpuSlotsError` naming the
    variable that chose them, its value and what is allowed."""
    if device_count() > 0:
        return
    spec = os.environ.get(SLOTS_ENV, "").strip()
    named = f"{SLOTS_ENV}={spec!r}" if spec else f"{VISIBLE_ENV}={','.join(devices)!r}"
    raise GpuSlotsError(
        f"{named} gives this job GPU {','.join(devices)}, but CUDA sees no such device here "
        f"(no NVIDIA driver, or no device with that id); allowed: {SLOTS_ENV}=0 to run on the "
        f"CPU, or the ids of devices this machine has"
    )


def warn_if_cuda_initialised() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        logger.warning(
            "CUDA is already initialised in this process: setting %s now does not change which "
            "GPU it uses; enter gpu_slot() before touching torch.cuda or run the work in a "
            "subprocess",
            VISIBLE_ENV,
        )
