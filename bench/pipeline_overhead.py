"""Pipeline overhead on a finished study: a no-op Snakemake re-run and ``dvc status`` (< 5 s).

Read-only: ``snakemake -n --cores 1`` (dry run) is timed first; only if it reports nothing
to do is the real no-op ``snakemake --cores 1 --quiet`` timed as well (nothing runs, nothing
is rewritten; Snakemake only touches its own ``.snakemake/`` bookkeeping). ``dvc status``
compares hashes and changes nothing. Each command runs 3 times in the repository root with
the executables next to ``sys.executable`` (the venv's bin, also put first on PATH as
``make run`` does); the median wall time, process start-up included, is what is reported.

Needs the default study to have been run (``reports/metrics.json`` present); otherwise it
says so and times nothing.

Run alone: ``python -m bench.pipeline_overhead [--quick] [--root DIR]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import header

ROOT = Path(__file__).resolve().parents[1]
METRICS = "reports/metrics.json"
TARGET_S = 5.0
REPEATS = 3
NOTHING_TO_DO = "Nothing to be done"


def _bin(name: str) -> Path:
    return Path(sys.executable).parent / name


def _time(cmd: list[str], cwd: Path, repeats: int) -> tuple[float, subprocess.CompletedProcess]:
    """Median wall seconds of ``repeats`` runs of ``cmd`` and the last run's result."""
    env = dict(os.environ, PATH=f"{_bin('python').parent}{os.pathsep}{os.environ.get('PATH', '')}")
    times, proc = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), proc


def _tail(proc: subprocess.CompletedProcess, lines: int = 6) -> str:
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return "\n".join("      " + line for line in text[-lines:])


def _row(label: str, seconds: float, proc: subprocess.CompletedProcess, note: str = "") -> str:
    ok = proc.returncode == 0 and seconds < TARGET_S
    status = "✓" if ok else ("FAIL" if proc.returncode == 0 else f"FAIL (exit {proc.returncode})")
    line = f"{label:<36} {seconds:>7.2f} s  (target < {TARGET_S:.0f} s: {status}){note}"
    return line if proc.returncode == 0 else line + "\n" + _tail(proc)


def run(quick: bool = False, root: Path | str | None = None) -> str:
    """Time the no-op re-run and ``dvc status`` of the finished study in ``root``.

    ``quick`` changes nothing here (the commands are short); ``root`` defaults to this
    repository.
    """
    root = Path(root) if root is not None else ROOT
    out = ["== pipeline overhead on the finished study (median of 3, wall, with start-up) =="]
    if not (root / METRICS).exists():
        out.append(f"{root / METRICS} not found: run the study first with `make run`; not timed")
        return "\n".join(out)
    missing = [str(_bin(b)) for b in ("snakemake", "dvc") if not _bin(b).exists()]
    if missing:
        out.append(f"not found next to {sys.executable}: {missing}; install the [pipeline] extra")
        return "\n".join(out)
    out.append(f"in {root}, executables from {_bin('python').parent}")
    snake = str(_bin("snakemake"))
    dry_s, dry = _time([snake, "-n", "--cores", "1"], root, REPEATS)
    up_to_date = dry.returncode == 0 and NOTHING_TO_DO in dry.stdout + dry.stderr
    note = "" if up_to_date else "  -- the dry run found work to do: study not up to date"
    out.append(_row("snakemake -n --cores 1 (dry run)", dry_s, dry, note))
    if up_to_date:
        noop_s, noop = _time([snake, "--cores", "1", "--quiet"], root, REPEATS)
        still = NOTHING_TO_DO in noop.stdout + noop.stderr or not noop.stdout.strip()
        note = "" if still else "  -- output was not a no-op:\n" + _tail(noop)
        out.append(_row("snakemake --cores 1 --quiet (no-op)", noop_s, noop, note))
    else:
        out.append("snakemake --cores 1 --quiet (no-op)    not run: it would run jobs")
    dvc_s, dvc = _time([str(_bin("dvc")), "status"], root, REPEATS)
    said = (dvc.stdout.strip().splitlines() or [""])[0]
    out.append(_row("dvc status", dvc_s, dvc, f"  -- {said!r}" if said else ""))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="accepted; changes nothing here")
    parser.add_argument("--root", type=Path, default=None, help="study root (default: repo)")
    args = parser.parse_args(argv)
    print(header())
    print(run(quick=args.quick, root=args.root))


if __name__ == "__main__":
    main()
