"""One runner at a time on a study: Snakemake and DVC each lock a study against runs of their
own kind, but not against each other. Run side by side, both write the same outputs and one
of them fails half-way on a file the other replaced ("dependency ... does not exist").

- A Snakemake run (its onstart) stops at once while DVC holds the study (`dvc repro`,
  `dvc exp run`: DVC's lock, ``.dvc/tmp/lock``, is held for the whole run).
- A stage job started by anything but this Snakemake run (DVC, or by hand) stops at once while
  a Snakemake run holds the study (its locks in ``.snakemake/locks``). Jobs of the Snakemake
  run itself carry ``KDIGA_RUNNER=snakemake``, which the Snakefile sets.

Both say in one line who holds the study and what to do. Torch-free.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from kdiga.errors import KdigaError

RUNNER_ENV = "KDIGA_RUNNER"
SNAKEMAKE = "snakemake"
SNAKEMAKE_LOCKS = Path(".snakemake") / "locks"
DVC_LOCK = Path(".dvc") / "tmp" / "lock"


class StudyBusyError(KdigaError, RuntimeError):
    """Another runner (Snakemake or DVC) holds the study."""


def dvc_holds(root: str | os.PathLike = ".") -> bool:
    """Whether a DVC command holds the study's repository lock right now (a ``flock`` on
    ``.dvc/tmp/lock``, tried without waiting and let go at once)."""
    try:
        fh = open(Path(root) / DVC_LOCK, "rb")  # noqa: SIM115 (closed below)
    except OSError:  # no DVC repository, or no lock yet: nobody holds it
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:  # held elsewhere: EAGAIN (EACCES on some systems)
            return err.errno in (errno.EAGAIN, errno.EACCES)
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


def snakemake_locks(root: str | os.PathLike = ".") -> list[Path]:
    """The lock files of a Snakemake run on the study (left behind by one killed with
    SIGKILL until ``snakemake --unlock``)."""
    try:
        return sorted(p for p in (Path(root) / SNAKEMAKE_LOCKS).iterdir() if p.is_file())
    except OSError:
        return []


def refuse_if_dvc_runs(root: str | os.PathLike = ".") -> None:
    """For a Snakemake run's onstart: stop while DVC holds the study."""
    if dvc_holds(root):
        raise StudyBusyError(
            f"DVC holds this study ({DVC_LOCK} is locked: a dvc repro or dvc exp run is "
            "running); running Snakemake beside it would write the same outputs: wait for it "
            "to end, then run Snakemake"
        )


def refuse_if_snakemake_runs(root: str | os.PathLike = ".") -> None:
    """For a stage job not started by this study's Snakemake run: stop while one holds the
    study."""
    if os.environ.get(RUNNER_ENV) == SNAKEMAKE:
        return
    locks = snakemake_locks(root)
    if locks:
        raise StudyBusyError(
            f"a Snakemake run holds this study ({locks[0]}); a job run beside it (by DVC or "
            "by hand) would write the same outputs: wait for it to end (if none is running, "
            "one was killed: `snakemake --unlock` frees the study)"
        )
