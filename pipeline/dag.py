"""The study's DAG as one table of jobs, read by the Snakefile and written out as dvc.yaml.

Each job has a stage name (one of :data:`STAGES`, each a ``pipeline/stages/<stage>.py``), one shell
command, its data inputs, its outputs and the params keys it reads. ``dvc.yaml`` is generated
from this table (``python -m pipeline.dag``). Where the files live is :mod:`pipeline.paths`,
which keys each job reads :mod:`pipeline.job_params`; the Snakefile reads both through this
module, and ``tests/test_dag.py`` checks that Snakemake's jobs equal these jobs and that dvc.yaml is
fresh.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kdiga.files import ArtifactWriteError, atomic_write_text
from pipeline.job_params import (
    BOUNDS_PARAMS,
    REPORT_PARAMS,
    attack_param_keys,
    distill_param_keys,
    dvc_params,
    shard_param_keys,
    signals_param_keys,
    stream_param_keys,
    teacher_param_keys,
    uses_signals,
)
from pipeline.params import (
    ParamError,
    StudentJob,
    Study,
    load_params,
    model_ids,
    parse_student_id,
    student_jobs,
    teacher_ids,
)
from pipeline.params.write import write_keys
from pipeline.paths import (
    METRICS,
    PLOT_CSV,
    REPORT_MD,
    REPORT_PNG,
    REPORT_RECORD,
    SHARDS,
    SHARDS_RECORD,
    bounds_key,
    bounds_path,
    bounds_teacher_path,
    code_deps,
    eval_path,
    history_path,
    log_path,
    model_path,
    signals_path,
    teacher_meta_path,
    writers,
)

log = logging.getLogger("kdiga.pipeline.dag")

STAGES = ("shard", "teacher", "signals", "distill", "attack", "bounds_teacher", "bounds", "report")
GPU_STAGES = ("teacher", "signals", "distill", "attack", "bounds_teacher", "bounds")

#: what the DVC guard stage (``dag``) records: the DAG's jobs, each with its command,
#: inputs and outputs. Every DVC stage reads it, so none runs before the guard has checked
#: that dvc.yaml still describes params.yaml.
DAG_RECORD = "data/dag.json"
GUARD = "dag"


def teacher_deps(params: Study, teacher: str) -> list[str]:
    """A teacher job's data: the shards, and a ``file:`` teacher's checkpoint."""
    source = params.teachers[teacher].source
    return [SHARDS, source.removeprefix("file:")] if source.startswith("file:") else [SHARDS]


@dataclass
class Job:
    stage: str
    key: str | None  # None for single-job stages; else the job's own key (a model id, ...)
    deps: list[str]
    outs: list[str]
    params: list[str]
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)  # the command's arguments, in order
    record: str = ""  # the output holding the job's provenance record (pipeline.provenance)
    gpus: int = 1  # GPUs the job holds at once: the Snakefile's `resources: gpu=` (0: CPU only)

    @property
    def name(self) -> str:
        """The DVC stage name: ``distill-pgdat--kd--small_cnn--s0`` (letters, digits, '_'
        and '-' only, as ``dvc stage add`` requires)."""
        return self.stage if self.key is None else f"{self.stage}-{self.key}"

    @property
    def log(self) -> str:
        return log_path(self.stage, self.key)

    @property
    def cmd(self) -> str:
        """The job's command, the one Snakemake and DVC run:
        ``python -m pipeline.stages <stage> --<arg> <value> ... --log <its log>``."""
        parts = [f"python -m pipeline.stages {self.stage}"]
        parts += [f"--{k.replace('_', '-')} {v}" for k, v in self.args.items()]
        return " ".join([*parts, f"--log {self.log}"])

    @property
    def outputs(self) -> list[str]:
        """Every file the job writes: outs, metrics and plots."""
        return [*self.outs, *self.metrics, *self.plots]


def distill_deps(params: Study, model_id: str) -> list[str]:
    """The data a student's job reads: the shards, its teacher (and the teacher's cached
    signals when they serve it), and a ``file:`` init checkpoint."""
    job = parse_student_id(params, model_id)
    deps = [SHARDS]
    if job.teacher is not None:
        deps.append(model_path(job.teacher))
        if uses_signals(params, job.method):
            deps.append(signals_path(job.teacher))
    init = params.students[job.student].init
    if init.startswith("file:"):
        deps.append(init.removeprefix("file:"))
    return deps


def bounds_pairs(params: Study) -> list[tuple[str, str | None]]:
    """(student id, teacher) of every bounds job: a distilled student against its own
    teacher (None: implied by the id), a student trained without one against each teacher
    (paper Table 4 compares MobileNetV2 (ST) with the TRADES teacher). One job per pair, so
    adding a teacher adds jobs and changes none."""
    out: list[tuple[str, str | None]] = []
    for job in student_jobs(params):
        if job.teacher is None:
            out += [(job.id, t) for t in teacher_ids(params)]
        else:
            out.append((job.id, None))
    return out


def bounds_teacher(params: Study, model_id: str, teacher: str | None) -> str:
    """The teacher a bounds job compares with."""
    return teacher or parse_student_id(params, model_id).teacher


def bounds_teacher_job(params: Study, t: str) -> Job:
    """The teacher's share of the bounds, once per teacher that bounds jobs compare with."""
    out = bounds_teacher_path(t)
    deps = [SHARDS, model_path(t)]
    return Job("bounds_teacher", t, deps, [out], BOUNDS_PARAMS, args={"teacher": t}, record=out)


def bounds_job(params: Study, sid: str, t: str | None) -> Job:
    """The bounds of student ``sid`` against teacher ``t`` (None: its own), reading the
    teacher's share."""
    key, name, out = bounds_key(sid, t), bounds_teacher(params, sid, t), bounds_path(sid, t)
    args = {"model": sid} | ({"teacher": t} if t else {})
    deps = [SHARDS, model_path(sid), model_path(name), bounds_teacher_path(name)]
    return Job("bounds", key, deps, [out], BOUNDS_PARAMS, args=args, record=out)


def bounds_jobs(params: Study) -> list[Job]:
    """The teacher's share of the bounds once per teacher compared with, then a bounds job
    per (student, teacher) pair reading it."""
    pairs = bounds_pairs(params)
    used = {bounds_teacher(params, sid, t) for sid, t in pairs}
    out = [bounds_teacher_job(params, t) for t in teacher_ids(params) if t in used]
    return out + [bounds_job(params, sid, t) for sid, t in pairs]


def params_view(params: Study, keys: list[str]) -> str:
    """The values of dotted ``keys`` as canonical JSON (Snakemake re-runs a job when it changes)."""
    return json.dumps({k: params.value(k) for k in keys}, sort_keys=True)


def shard_job(params: Study) -> Job:
    keys = shard_param_keys(params)
    return Job("shard", None, [], [SHARDS], keys, record=SHARDS_RECORD, gpus=0)


def teacher_job(params: Study, t: str) -> Job:
    outs = [model_path(t), teacher_meta_path(t)]
    keys = [*teacher_param_keys(params, t), *stream_param_keys(params)]
    deps = teacher_deps(params, t)
    return Job("teacher", t, deps, outs, keys, args={"teacher": t}, record=outs[1])


def signals_job(params: Study, t: str) -> Job:
    out, deps = signals_path(t), [SHARDS, model_path(t)]
    return Job("signals", t, deps, [out], signals_param_keys(), args={"teacher": t}, record=out)


def distill_job(params: Study, sid: str) -> Job:
    out, keys, deps = model_path(sid), distill_param_keys(params, sid), distill_deps(params, sid)
    gpus, plots = params.distill.gpus_per_job, [history_path(sid)]
    return Job(
        "distill", sid, deps, [out], keys, plots=plots, args={"model": sid}, record=out, gpus=gpus
    )


def attack_job(params: Study, mid: str, name: str) -> Job:
    key, out, deps = f"{mid}--{name}", eval_path(mid, name), [SHARDS, model_path(mid)]
    args = {"model": mid, "attack": name}
    return Job("attack", key, deps, [out], attack_param_keys(name), args=args, record=out)


def report_job(params: Study) -> Job:
    """The report reads every teacher's record, evaluation, bounds and training history."""
    attacks = params.attack.attacks
    deps = [teacher_meta_path(t) for t in teacher_ids(params)]
    deps += [eval_path(m, a) for m in model_ids(params) for a in attacks]
    deps += [bounds_path(s, t) for s, t in bounds_pairs(params)]
    deps += [history_path(j.id) for j in student_jobs(params)]
    outs = [REPORT_MD, REPORT_PNG, REPORT_RECORD]
    return Job(
        "report",
        None,
        deps,
        outs,
        REPORT_PARAMS,
        metrics=[METRICS],
        plots=[PLOT_CSV],
        record=REPORT_RECORD,
        gpus=0,
    )


def signals_served(params: Study) -> set[str]:
    """The teachers whose signals some student's method reads."""
    return {j.teacher for j in student_jobs(params) if uses_signals(params, j.method)}


def jobs(params: Study) -> list[Job]:
    """Every job of the study described by validated ``params``, in dependency order."""
    teachers, served = teacher_ids(params), signals_served(params)
    out = [shard_job(params)]
    out += [teacher_job(params, t) for t in teachers]
    out += [signals_job(params, t) for t in teachers if t in served]
    out += [distill_job(params, j.id) for j in student_jobs(params)]
    out += [attack_job(params, m, a) for m in model_ids(params) for a in params.attack.attacks]
    out += bounds_jobs(params)
    out.append(report_job(params))
    _check_read_files(params, out)
    _warn_if_many(len(out))
    return out


def job(params: Study, stage: str, key: str | None = None) -> Job | None:
    """The job ``stage``/``key`` of the study, built from its key alone (not the whole DAG:
    what a stage calls to find its own job); None when the study has no such job."""
    if key is None:
        single = _SINGLE_JOBS.get(stage)
        return single(params) if single is not None else None
    find = _FIND_JOB.get(stage)
    return find(params, key) if find is not None and isinstance(key, str) else None


def producer(params: Study, path: str) -> Job | None:
    """The job of the study that writes ``path``, found from the path's form
    (:func:`pipeline.paths.writers`), not by building every job; None for a file no job of
    the study writes (a user's file, or a path of another grid)."""
    for stage, key in writers(path):
        found = job(params, stage, key)
        if found is not None and path in found.outputs:
            return found
    return None


def _find_teacher(params: Study, key: str) -> Job | None:
    return teacher_job(params, key) if key in params.teachers else None


def _find_signals(params: Study, key: str) -> Job | None:
    served = any(uses_signals(params, m) for m in params.distill.methods)
    return signals_job(params, key) if served and key in params.teachers else None


def _find_distill(params: Study, key: str) -> Job | None:
    return distill_job(params, key) if _student(params, key) else None


def _find_attack(params: Study, key: str) -> Job | None:
    mid, _, name = key.rpartition("--")
    known = mid in params.teachers or _student(params, mid)
    return attack_job(params, mid, name) if known and name in params.attack.attacks else None


def _find_bounds_teacher(params: Study, key: str) -> Job | None:
    # every teacher has a student to bound, if the study has a student at all
    known = key in params.teachers and _any_student(params)
    return bounds_teacher_job(params, key) if known else None


def _find_bounds(params: Study, key: str) -> Job | None:
    sid, _, t = key.partition("--vs--")
    sj = _student(params, sid)
    if sj is None or (t == "") != (sj.teacher is not None) or (t and t not in params.teachers):
        return None
    return bounds_job(params, sid, t or None)


#: the stages of one job, found without a key, and how each keyed stage finds a job by its key
_SINGLE_JOBS: dict[str, Callable[[Study], Job]] = {"shard": shard_job, "report": report_job}
_FIND_JOB: dict[str, Callable[[Study, str], Job | None]] = {
    "teacher": _find_teacher,
    "signals": _find_signals,
    "distill": _find_distill,
    "attack": _find_attack,
    "bounds_teacher": _find_bounds_teacher,
    "bounds": _find_bounds,
}


def _student(params: Study, sid: str) -> StudentJob | None:
    try:
        return parse_student_id(params, sid)
    except ParamError:
        return None


def _any_student(params: Study) -> bool:
    return next(iter(student_jobs(params)), None) is not None


#: a study of more jobs than this gets a warning: Snakemake and DVC plan every job each run
MANY_JOBS = 10_000
_warned: set[int] = set()  # job counts warned about in this process


def _warn_if_many(count: int) -> None:
    if count > MANY_JOBS and count not in _warned:
        _warned.add(count)
        log.warning(
            "the study has %s jobs (more than %s): Snakemake and DVC check every job at each "
            "run and slow down at this size; fewer seeds, students or methods per study keep "
            "it quick",
            f"{count:,}",
            f"{MANY_JOBS:,}",
        )


def _check_read_files(params: Study, table: list[Job]) -> None:
    """Refuse a student's ``init: file:`` or a teacher's ``source: file:`` that names a file a
    job of the study writes: the job would read its own output or one made after it (a cycle
    Snakemake refuses, and a dvc.yaml that runs in a loop)."""
    writers = {out: job.name for job in table for out in job.outputs}
    named = [(f"students.{n}.init", s.init) for n, s in params.students.items()]
    named += [(f"teachers.{n}.source", t.source) for n, t in params.teachers.items()]
    for key, value in named:
        path = _in_study(value.removeprefix("file:")) if value.startswith("file:") else None
        for at in () if path is None else (path, *path.parents):
            if at.as_posix() in writers:
                raise ParamError(
                    key,
                    value,
                    f"{at.as_posix()} is an output of this study (job {writers[at.as_posix()]} "
                    "writes it), and a file the study reads may not be one it writes: copy it "
                    "out of the study's outputs (e.g. outside data/) and name the copy",
                )


def _in_study(path: str) -> Path | None:
    """``path`` relative to the study's root (the working directory), normalised; None
    outside it."""
    p = Path(os.path.normpath(path))
    if not p.is_absolute():
        return p
    try:
        return p.relative_to(Path.cwd())
    except ValueError:
        return None


def _out(path: str) -> str | dict:
    """A dvc.yaml output entry: files under reports/ are kept in git (``cache: false``), so
    every commit and experiment carries its own, and DVC leaves them in place when their stage
    starts (``persist``: out of its cache, DVC could not bring them back if the stage then
    failed or was refused; the stage writes each whole, through a rename); the rest go to the
    DVC cache."""
    if path.startswith("reports/"):
        return {path: {"cache": False, "persist": True}}
    return path


def _is_set(raw: dict, dotted: str) -> bool:
    """Whether the params file itself sets ``dotted`` (to any value, null included)."""
    node: object = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def unset_keys(params: Study) -> list[str]:
    """The keys some job reads that the params file leaves to their defaults. DVC reads
    params from the file alone: it can track a key only once the file sets it."""
    keys = dict.fromkeys(k for job in jobs(params) for k in dvc_params(params, job.params))
    return [k for k in keys if not _is_set(params.raw, k)]


def _dvc_stage(params: Study, job: Job) -> dict:
    """One explicit dvc.yaml stage: what a DVC user would write by hand for the job."""
    stage: dict = {"cmd": job.cmd}
    deps = [DAG_RECORD, *job.deps, *code_deps(job.stage)]
    stage["deps"] = list(dict.fromkeys(deps))
    if job.params:
        stage["params"] = dvc_params(params, job.params)
    stage["outs"] = [_out(o) for o in job.outs]
    if job.metrics:
        stage["metrics"] = [_out(m) for m in job.metrics]
    if job.plots:
        stage["plots"] = [_out(p) for p in job.plots]
    return stage


def _guard_stage() -> dict:
    """The first DVC stage: it runs whenever params.yaml (or the code that reads it) changes,
    stops the run with one line when dvc.yaml no longer describes params.yaml (the DAG's
    shape changed, or the file no longer sets a key a job reads), and otherwise records the
    DAG (:data:`DAG_RECORD`), which is the same unless the shape changed."""
    return {
        "cmd": f"python -m pipeline.dag --guard --output dvc.yaml --record {DAG_RECORD}",
        "deps": [
            "params.yaml",
            "pipeline/dag.py",
            "pipeline/paths.py",
            "pipeline/job_params.py",
            "pipeline/params",
            "kdiga",
        ],
        "outs": [DAG_RECORD],
    }


def dvc_yaml(params: Study) -> str:
    """The text of dvc.yaml for ``params``: the guard stage, then one explicit stage per job
    (``dvc repro --glob 'distill-*'`` runs every student), each listing every params key the
    job reads (the file must set them all: :func:`complete_params_file`)."""
    unset = unset_keys(params)
    if unset:
        raise ParamError(
            "params file",
            ", ".join(unset[:5]) + (", ..." if len(unset) > 5 else ""),
            "DVC reads params from the file alone, and the file leaves these keys the jobs "
            "read to their defaults: `python -m pipeline.dag` writes them into it",
        )
    stages = {GUARD: _guard_stage()}
    stages |= {job.name: _dvc_stage(params, job) for job in jobs(params)}
    plots = [
        {
            PLOT_CSV: {
                "x": "radius",
                "y": model_ids(params),
                "template": "linear",
                "title": f"Accuracy against {params.report.figure_attack} radius",
            }
        }
    ]
    header = (
        "# Generated from params.yaml by `python -m pipeline.dag`: do not edit by hand.\n"
        "# The Snakefile describes the same jobs; tests/test_dag.py checks both.\n"
    )
    body = yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False, width=100)
    return header + body


def dag_record(params: Study) -> str:
    """The DAG's shape as canonical JSON: each job's name, command, inputs and outputs."""
    shape = {j.name: {"cmd": j.cmd, "deps": j.deps, "outs": j.outputs} for j in jobs(params)}
    return json.dumps(shape, indent=1, sort_keys=True) + "\n"


def complete_params_file(path: str | Path, params: Study) -> list[str]:
    """Write into the params file, with their default values, the keys a job reads that it
    leaves out; the keys written. Each goes at the end of its section's block (a missing
    section at the end of its parent's), so the file's comments and order stay as they are."""
    unset = unset_keys(params)
    if not unset:
        return []
    write_keys(path, {dotted: params.value(dotted) for dotted in unset})
    return unset


def check_fresh(params_path: str = "params.yaml", dvc_path: str = "dvc.yaml") -> str | None:
    """None when dvc.yaml describes params.yaml; else a one-line message saying what differs
    and how to regenerate it."""
    path = Path(dvc_path)
    if not path.exists():
        return f"{dvc_path} is missing: run `python -m pipeline.dag`"
    params = load_params(params_path, build=False)
    unset = unset_keys(params)
    if unset:
        shown = ", ".join(unset[:5]) + (", ..." if len(unset) > 5 else "")
        return (
            f"{params_path} leaves keys the jobs read to their defaults ({shown}), which DVC "
            "cannot track: run `python -m pipeline.dag` (it writes them into the file), commit "
            "and run again"
        )
    if path.read_text() == dvc_yaml(params):
        return None
    now = {j.name for j in jobs(params)}
    try:
        then = set((yaml.safe_load(path.read_text()) or {}).get("stages") or {}) - {GUARD}
    except yaml.YAMLError:
        then = set()
    added, gone = sorted(now - then), sorted(then - now)
    what = "; ".join(
        f"{len(names)} job(s) {verb} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        for names, verb in ((added, "to add"), (gone, "gone"))
        if names
    )
    return (
        f"{dvc_path} does not describe {params_path}"
        + (f": {what}" if what else " (the params a job reads changed)")
        + ": run `python -m pipeline.dag`, commit, and run again"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.dag",
        description="Write dvc.yaml from params.yaml (the params keys the jobs read that the file "
        "leaves out are written into it with their defaults, so that DVC can track them).",
    )
    ap.add_argument("--params", default=None, help="default: params.yaml, which DVC reads")
    ap.add_argument("--output", default="dvc.yaml")
    ap.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is stale")
    ap.add_argument(
        "--guard",
        action="store_true",
        help="dvc.yaml's first stage: exit 2 with one line if dvc.yaml is stale, else write "
        "--record",
    )
    ap.add_argument("--record", default=DAG_RECORD, help="with --guard: the DAG record to write")
    args = ap.parse_args(argv)
    named = os.environ.get("KDIGA_PARAMS")
    if args.params is None and named and Path(named).resolve() != Path("params.yaml").resolve():
        print(
            f"error: KDIGA_PARAMS names {named}, but dvc.yaml describes params.yaml, the file "
            "DVC reads: copy it over params.yaml, or pass --params to describe it anyway",
            file=sys.stderr,
        )
        return 2
    params_path = args.params or "params.yaml"
    try:
        if args.check or args.guard:
            problem = check_fresh(params_path, args.output)
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                return 1 if args.check else 2
            if args.guard:
                text = dag_record(load_params(params_path, build=False))
                if not Path(args.record).exists() or Path(args.record).read_text() != text:
                    atomic_write_text(text, args.record)
            return 0
        params = load_params(params_path, build=False)
        added = complete_params_file(params_path, params)
        if added:
            print(
                f"{params_path}: wrote {len(added)} key(s) left to their defaults, so that DVC "
                f"tracks them: {', '.join(added)}"
            )
            params = load_params(params_path, build=False)
        text = dvc_yaml(params)
        if Path(args.output).is_dir():
            raise ParamError("--output", args.output, "it is a directory: give a file (dvc.yaml)")
        atomic_write_text(text, args.output)
    except (ParamError, ArtifactWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
