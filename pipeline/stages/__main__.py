"""``python -m pipeline.stages <stage> [--<arg> <value> ...] --log <file>``: one job of a
stage, the command Snakemake and DVC share (:attr:`pipeline.dag.Job.cmd`).

This entry stays light: with ``KDIGA_FORKSERVER=1`` it hands the job to a fork server that
has imported torch once (:mod:`pipeline.forkserver`), before anything heavy loads; else, or
when no server answers, it imports the stage's module and runs it here. Running a stage's
module directly (``python -m pipeline.stages.distill ...``, as torchrun's workers do) runs
that job in its own process.
"""

from __future__ import annotations

import importlib
import sys

from pipeline.dag import STAGES
from pipeline.forkserver import stage_main

USAGE = f"usage: python -m pipeline.stages {{{','.join(STAGES)}}} [options] --log FILE"


def run_stage(argv: list[str]) -> int:
    """Import stage ``argv[0]``'s module and run its job with the rest of ``argv``."""
    module = importlib.import_module(f"pipeline.stages.{argv[0]}")
    return module.main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        given = f"unknown stage {argv[0]!r}; " if argv and not argv[0].startswith("-") else ""
        print(f"{USAGE}\n{given}the stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    return stage_main("pipeline.stages", lambda: run_stage(argv))


if __name__ == "__main__":
    raise SystemExit(main())
