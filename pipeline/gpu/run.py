"""Running a command inside held devices: :func:`run_in_slots` (what ``pipeline.launch``
calls for a job of several GPUs) and the CLI ``python -m pipeline.gpu -- <command ...>``. The
child inherits the lock descriptors and is sent SIGTERM/SIGHUP when its wrapper gets them."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.gpu.env import LOCK_DIR_ENV, SLOTS_ENV
from pipeline.gpu.slots import hold


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
    held = hold(gpus=gpus, n_slots=n_slots, lock_dir=lock_dir, timeout=timeout, poll=poll)
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
        with hold(
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
