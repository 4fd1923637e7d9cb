"""``python -m pipeline.plan [--params FILE] [--calibrate-steps K] [--json]``: calibrate on
this machine, estimate every job of the study and print the plan (a table, or JSON)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.params import ParamError, load_params, params_file
from pipeline.plan.calibrate import Calibrator, log
from pipeline.plan.estimate import make_plan
from pipeline.plan.render import render
from pipeline.stages.common import set_cpu_threads


def main(argv: list[str] | None = None, calibrator: Calibrator | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.plan",
        description="Estimate every job's device-hours and peak memory from a short calibration.",
    )
    ap.add_argument("--params", default=None, help="default: $KDIGA_PARAMS or params.yaml")
    ap.add_argument(
        "--calibrate-steps",
        type=int,
        default=2,
        metavar="K",
        help="timed steps (or passes) per calibration, after a warm-up",
    )
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    if args.calibrate_steps < 1:
        ap.error(f"--calibrate-steps must be >= 1, got {args.calibrate_steps}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # progress on stderr
    log.setLevel(logging.INFO)
    path = args.params or params_file()
    try:
        params = load_params(path)
        set_cpu_threads()  # the threads a job gets: the calibration measures with them
    except ParamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cal = calibrator or Calibrator(steps=args.calibrate_steps)
    plan = make_plan(params, cal, path)
    cal.release()
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
    return 0
