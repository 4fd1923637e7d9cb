"""Where a study stands: ``python -m pipeline.status [--params FILE] [--plan FILE] [--all]``.

Run in the study's directory (params from ``--params``, ``$KDIGA_PARAMS`` or params.yaml), on
any node that sees its files, while Snakemake or DVC runs it or after: both run the same stage
commands, and every job keeps a progress file beside its log (:mod:`pipeline.progress`).

One row per job of the DAG (:func:`pipeline.dag.jobs`) that is not done, in dependency order:

- running: its progress file's heartbeat is fresh; progress, elapsed time and ETA;
- stopped: it was running and fell silent without a word (killed, the node lost): its
  heartbeat is older than :data:`STALE_BEATS` of its intervals, or its pid is gone on this
  host; where it was;
- failed: its file says so; the step where it stopped and the first line of its error;
- to run: none of these, and its outputs are not current;

then the jobs done out of all, and the device-hours of the jobs not started from a cost plan
(``python -m pipeline.plan --json > logs/plan.json``; its per-job estimates need a
calibration on the device, which this command does not run): "unknown" without one.

A job is done when its progress file does not say running or failed, its outputs exist with a
provenance record (:func:`pipeline.provenance.read_record`, a file header) made by this job
from the current params, and every job it reads from is done. That reads no data: an input
replaced since without a params change is for ``python -m pipeline.sync``
(:func:`pipeline.provenance.freshness`, which hashes them) to find.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import dag
from pipeline.params import ParamError, Study, load_params, params_file
from pipeline.plan.records import Plan
from pipeline.progress import duration, pid_alive, progress_path, read_progress, unix
from pipeline.provenance import producers, read_record

STALE_BEATS = 3  # missed heartbeats after which a silent job counts as stopped
PLAN_JSON = "logs/plan.json"
COLUMNS = ("job", "stage", "state", "progress", "elapsed", "ETA", "where")


@dataclass
class Row:
    """One job's line of the table."""

    job: str
    stage: str
    state: str  # running, stopped, failed, to run or done
    progress: str = ""
    elapsed: float | None = None
    eta: float | None = None
    where: str = ""
    plan_hours: float | None = None

    def cells(self) -> list[str]:
        eta = duration(self.eta) if self.eta is not None else "-"
        if self.state == "to run" and self.plan_hours is not None:
            eta = f"plan {duration(self.plan_hours * 3600)}"
        return [
            self.job,
            self.stage,
            self.state,
            self.progress or "-",
            duration(self.elapsed),
            eta,
            self.where,
        ]


def outputs_current(params: Study, job: dag.Job) -> bool:
    """Whether ``job``'s outputs all exist and its record was made by this job from the
    current params (a header read; no data hashed)."""
    if not all(Path(o).exists() for o in job.outputs):
        return False
    rec = read_record(job)
    now = json.loads(dag.params_view(params, job.params))
    return bool(rec) and rec.get("job") == job.name and rec.get("params") == now


def _progress_text(info: dict[str, Any]) -> str:
    if info.get("task") is None:
        return ""
    done, total = info.get("done"), info.get("total")
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    return f"{info['task']} {done}/{total} {info.get('unit', '')}{pct}"


def _where(info: dict[str, Any]) -> str:
    """Where the job is (its latest step), without repeating its progress column."""
    step = info.get("step") or "starting"
    head = f"{info.get('task')} {info.get('done')}/{info.get('total')} {info.get('unit')} ("
    return step[len(head) : -1] if step.startswith(head) and step.endswith(")") else step


def _running_state(info: dict[str, Any], now: float, host: str) -> tuple[str, str]:
    """(running or stopped, why stopped) of a job whose file says running."""
    if info.get("host") == host and not pid_alive(int(info["pid"])):
        return "stopped", f"pid {info['pid']} is gone"
    silent = now - unix(info["heartbeat"])
    if silent > STALE_BEATS * float(info["heartbeat_s"]):
        return "stopped", f"no heartbeat for {duration(silent)}"
    return "running", ""


def job_row(params: Study, job: dag.Job, now: float, host: str | None = None) -> Row:
    """``job``'s row at ``now`` (Unix seconds), on ``host`` (default: this one)."""
    host = socket.gethostname() if host is None else host
    info = read_progress(progress_path(job.stage, job.key))
    state = info.get("state") if info else None
    if state not in ("running", "failed"):
        done = outputs_current(params, job)
        return Row(job.name, job.stage, "done" if done else "to run")
    try:
        started, beat = unix(info["started"]), unix(info["heartbeat"])
        why = ""
        if state == "running":
            state, why = _running_state(info, now, host)
    except (KeyError, TypeError, ValueError):
        return Row(job.name, job.stage, "to run", where="unreadable progress file")
    row = Row(job.name, job.stage, state, _progress_text(info))
    step = _where(info)
    if state == "running":
        row.elapsed, row.where = now - started, step
        eta = info.get("eta_s")
        row.eta = None if eta is None else max(0.0, float(eta) - (now - beat))
    elif state == "stopped":
        row.elapsed, row.where = beat - started, f"stopped at {step}; {why}"
    else:
        row.elapsed = beat - started
        row.where = f"failed at {step}: {info.get('error') or 'no error recorded'}"
    return row


def study_rows(params: Study, now: float, host: str | None = None) -> list[Row]:
    """Every job's row, in dependency order; a job whose outputs are current but that reads
    from a job not done is to run again (after that one)."""
    jobs, host = dag.jobs(params), socket.gethostname() if host is None else host
    made_by = producers(jobs)
    out: dict[str, Row] = {}
    for j in jobs:
        row = job_row(params, j, now, host)
        ups = sorted({made_by[d].name for d in j.deps if d in made_by})
        waits = [u for u in ups if out[u].state != "done"]
        if row.state == "done" and waits:
            more = f" (+{len(waits) - 1} more)" if len(waits) > 1 else ""
            row.state, row.where = "to run", f"after {waits[0]}{more}"
        out[j.name] = row
    return list(out.values())


def plan_hours(path: str | Path) -> dict[str, float] | None:
    """Job name -> device-hours of a cost plan written by ``pipeline.plan --json``; None
    if there is none or it does not read."""
    try:
        plan = Plan.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {r.job: r.hours for r in plan.rows}


def summary(rows: list[Row], plan: dict[str, float] | None, plan_path: str) -> list[str]:
    """The total lines: jobs done of all, then the device-hours of those not started."""
    counts = {s: sum(r.state == s for r in rows) for s in ("running", "failed", "stopped")}
    todo = [r for r in rows if r.state == "to run"]
    done = sum(r.state == "done" for r in rows)
    others = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    line = f"jobs: {done} of {len(rows)} done; {others + ', ' if others else ''}"
    lines = [line + f"{len(todo)} to run"]
    what = f"device-hours of the {len(todo)} jobs not started"
    if not todo:
        return lines
    if plan is None:
        return [
            *lines,
            f"{what}: unknown (no cost plan at {plan_path}: "
            f"`python -m pipeline.plan --json > {PLAN_JSON}` writes one)",
        ]
    known = [r.plan_hours for r in todo if r.plan_hours is not None]
    hours = f"{sum(known):,.4g} h ({duration(sum(known) * 3600)})"
    if len(known) == len(todo):
        return [*lines, f"{what}: {hours}, from the cost plan {plan_path}"]
    if not known:
        return [*lines, f"{what}: unknown (none of them is in the cost plan {plan_path})"]
    missing = len(todo) - len(known)
    return [
        *lines,
        f"{what}: at least {hours}; {missing} of them not in the cost plan {plan_path}, unknown",
    ]


def status(
    params: Study, *, plan_path: str | None = None, show_all: bool = False, now: float | None = None
) -> str:
    """The status table of the study in the current directory, and its totals."""
    now = time.time() if now is None else now
    host = socket.gethostname()
    path = plan_path or PLAN_JSON
    plan = plan_hours(path) if plan_path or Path(PLAN_JSON).exists() else None
    table_rows = study_rows(params, now, host)
    for r in table_rows:
        r.plan_hours = None if plan is None else plan.get(r.job)
    shown = [r for r in table_rows if show_all or r.state != "done"]
    cells = [list(COLUMNS), *(r.cells() for r in shown)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    table = [
        "  ".join([*(v.ljust(w) for v, w in zip(c, widths, strict=False)), c[-1]]).rstrip()
        for c in cells
    ]
    if not shown:
        table = ["every job is done"]
    return "\n".join([*table, "", *summary(table_rows, plan, path)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.status",
        description="Show the study's jobs that are running, failed, stopped or still to run.",
    )
    ap.add_argument("--params", default=None, help="default: $KDIGA_PARAMS or params.yaml")
    ap.add_argument(
        "--plan",
        default=None,
        help=f"a cost plan from `pipeline.plan --json` (default: {PLAN_JSON} if it exists)",
    )
    ap.add_argument("--all", action="store_true", help="list the jobs that are done too")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params or params_file())
    except ParamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(status(params, plan_path=args.plan, show_all=args.all))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
