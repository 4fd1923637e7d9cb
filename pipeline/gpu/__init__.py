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

The package, one topic a module: :mod:`.env` (the variables and their values, and
:class:`GpuSlotsError`), :mod:`.cuda` (what CUDA sees here, :func:`check_cuda`), :mod:`.locks`
(the lock files, :func:`acquire_slots`), :mod:`.slots` (the pool and holding it,
:func:`gpu_slot`, :func:`gpu_slots`) and :mod:`.run` (:func:`run_in_slots`, the CLI).
"""

from pipeline.gpu.cuda import check_cuda
from pipeline.gpu.env import MAX_SLOTS, GpuSlotsError, parse_slots
from pipeline.gpu.run import run_in_slots
from pipeline.gpu.slots import gpu_slot, gpu_slots

__all__ = [
    "MAX_SLOTS",
    "GpuSlotsError",
    "check_cuda",
    "gpu_slot",
    "gpu_slots",
    "parse_slots",
    "run_in_slots",
]
