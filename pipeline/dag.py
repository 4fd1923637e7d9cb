"""The study's DAG as one table of jobs, read by the Snakefile and written out as dvc.yaml.

Each job has a stage name (one of :data:`STAGES`, each a ``pipeline/<stage>.py``), one shell
command, its data inputs, its outputs and the params keys it reads. ``dvc.yaml`` is generated
from this table (``python -m pipeline.dag``); the Snakefile's rules use the same path helpers,
and ``tests/test_dag.py`` checks that Snakemake's jobs equal these jobs and that dvc.yaml is
fresh.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kdiga.files import atomic_write_text
from kdiga.methods import get_method
from pipeline.params import (
    TRAIN_KEYS,
    ParamError,
    Study,
    load_params,
    model_ids,
    parse_student_id,
    student_jobs,
    teacher_ids,
)

STAGES = ("shard", "teacher", "signals", "distill", "attack", "bounds", "report")
GPU_STAGES = ("teacher", "signals", "distill", "attack", "bounds")

SHARDS = "data/shards"
SHARDS_RECORD = f"{SHARDS}/provenance.json"
# The report and its metrics live in git (not gitignored, not in the DVC cache), so that
# `dvc exp show` and `dvc plots diff` read them for every commit and experiment.
REPORT_MD = "reports/report.md"
REPORT_PNG = "reports/figure1.png"
REPORT_RECORD = "reports/provenance.json"
METRICS = "reports/metrics.json"
PLOT_CSV = "reports/robustness.csv"
#: wall-clock figures: written beside the logs, never into an output DVC hashes
COST_MD = "logs/cost.md"
REPORT_PARAMS = ["report", "signals"]  # the report says which students used cached signals


def model_path(model_id: str) -> str:
    """A teacher's (its name) or a student's model file."""
    return f"data/models/{model_id}.safetensors"


def history_path(model_id: str) -> str:
    return f"data/models/{model_id}.history.json"


def teacher_meta_path(teacher: str) -> str:
    return f"data/models/{teacher}.json"


def signals_path(teacher: str) -> str:
    return f"data/signals/{teacher}.safetensors"


def eval_path(model_id: str, attack: str) -> str:
    return f"data/evals/{model_id}--{attack}.json"


def bounds_key(model_id: str, teacher: str | None = None) -> str:
    """The bounds job of a student against a teacher: its id for a distilled student (its own
    teacher), ``<id>--vs--<teacher>`` for a student trained without one."""
    return model_id if teacher is None else f"{model_id}--vs--{teacher}"


def bounds_path(model_id: str, teacher: str | None = None) -> str:
    return f"data/bounds/{bounds_key(model_id, teacher)}.json"


def log_path(stage: str, key: str | None = None) -> str:
    return f"logs/{stage}.log" if key is None else f"logs/{stage}/{key}.log"


def timing_path(stage: str, key: str | None = None) -> str:
    """Wall-clock figures of one job (seconds per epoch, ...): beside its log, not hashed."""
    return log_path(stage, key).removesuffix(".log") + ".timing.json"


def code_deps(stage: str) -> list[str]:
    """The code a stage's results depend on: DVC's code dependencies and the code digest in
    every artifact's provenance (pipeline.provenance)."""
    return [f"pipeline/{stage}.py", "pipeline/common.py", "pipeline/params.py", "kdiga"]


def teacher_deps(params: Study, teacher: str) -> list[str]:
    """A teacher job's data: the shards, and a ``file:`` teacher's checkpoint."""
    source = params.teachers[teacher].source
    return [SHARDS, source.removeprefix("file:")] if source.startswith("file:") else [SHARDS]


def checkpoint_dir() -> Path:
    """Resumable state (training checkpoints, attack progress): never a declared output."""
    return Path("data/checkpoints")


@dataclass
class Job:
    stage: str
    key: str | None  # None for single-job stages; else the job's own key (a model id, ...)
    cmd: str
    deps: list[str]
    outs: list[str]
    params: list[str]
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)  # the CLI arguments in cmd
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
    def outputs(self) -> list[str]:
        """Every file the job writes: outs, metrics and plots."""
        return [*self.outs, *self.metrics, *self.plots]


def _cmd(stage: str, key: str | None = None, **args: str) -> str:
    parts = [f"python -m pipeline.{stage}"]
    parts += [f"--{k.replace('_', '-')} {v}" for k, v in args.items()]
    parts.append(f"--log {log_path(stage, key)}")
    return " ".join(parts)


def uses_signals(params: Study, method: str) -> bool:
    """Whether ``method``'s students train from their teacher's cached signals."""
    return params.signals.enabled and get_method(method).cacheable


def signals_param_keys() -> list[str]:
    return ["shard.seed", "signals", "distill.augment", "distill.crop_padding"]


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


def distill_param_keys(params: Study, model_id: str) -> list[str]:
    """The params a student's job reads, so that only a real change re-runs it."""
    job = parse_student_id(params, model_id)
    keys = [*(f"distill.{k}" for k in TRAIN_KEYS), f"students.{job.student}"]
    keys += [f"distill.{k}" for k in get_method(job.method).param_keys]
    if job.teacher is not None and not uses_signals(params, job.method):
        keys += ["distill.compile_teacher"]  # the teacher runs: compiled or not
    if uses_signals(params, job.method):
        keys += ["signals"]
    if params.distill.gpus_per_job > 1:  # DDP splits each batch: another run than on one GPU
        keys += ["distill.gpus_per_job"]  # (left out at 1, so records made before it hold)
    return keys + stream_param_keys(params)


def stream_param_keys(params: Study) -> list[str]:
    """What the order of streamed training batches depends on (none for in-memory data)."""
    return ["shard.workers", "shard.shuffle_buffer"] if params.shard.streamed else []


def attack_param_keys(attack: str) -> list[str]:
    common = ["shard.seed", "attack.split", "attack.radii", "attack.norm", "attack.batch_size"]
    extra = ["attack.compile"] if attack == "pgd" else []
    return [*common, *extra, f"attack.{attack}"]


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


def params_view(params: Study, keys: list[str]) -> str:
    """The values of dotted ``keys`` as canonical JSON (Snakemake re-runs a job when it changes)."""
    return json.dumps({k: params.value(k) for k in keys}, sort_keys=True)


def jobs(params: Study) -> list[Job]:
    """Every job of the study described by validated ``params``, in dependency order."""
    out = [Job("shard", None, _cmd("shard"), [], [SHARDS], ["shard"], record=SHARDS_RECORD, gpus=0)]
    for t in teacher_ids(params):
        out.append(
            Job(
                "teacher",
                t,
                _cmd("teacher", t, teacher=t),
                teacher_deps(params, t),
                [model_path(t), teacher_meta_path(t)],
                [f"teachers.{t}", *stream_param_keys(params)],
                args={"teacher": t},
                record=teacher_meta_path(t),
            )
        )
    served = {j.teacher for j in student_jobs(params) if uses_signals(params, j.method)}
    for t in teacher_ids(params):
        if t in served:
            out.append(
                Job(
                    "signals",
                    t,
                    _cmd("signals", t, teacher=t),
                    [SHARDS, model_path(t)],
                    [signals_path(t)],
                    signals_param_keys(),
                    args={"teacher": t},
                    record=signals_path(t),
                )
            )
    students = [j.id for j in student_jobs(params)]
    for sid in students:
        out.append(
            Job(
                "distill",
                sid,
                _cmd("distill", sid, model=sid),
                distill_deps(params, sid),
                [model_path(sid)],
                distill_param_keys(params, sid),
                plots=[history_path(sid)],
                args={"model": sid},
                record=model_path(sid),
                gpus=params.distill.gpus_per_job,
            )
        )
    attacks = params.attack.attacks
    for mid in model_ids(params):
        for name in attacks:
            key = f"{mid}--{name}"
            out.append(
                Job(
                    "attack",
                    key,
                    _cmd("attack", key, model=mid, attack=name),
                    [SHARDS, model_path(mid)],
                    [eval_path(mid, name)],
                    attack_param_keys(name),
                    args={"model": mid, "attack": name},
                    record=eval_path(mid, name),
                )
            )
    for sid, t in bounds_pairs(params):
        key = bounds_key(sid, t)
        args = {"model": sid} | ({"teacher": t} if t else {})
        out.append(
            Job(
                "bounds",
                key,
                _cmd("bounds", key, **args),
                [SHARDS, model_path(sid), model_path(bounds_teacher(params, sid, t))],
                [bounds_path(sid, t)],
                ["shard.seed", "bounds"],
                args=args,
                record=bounds_path(sid, t),
            )
        )
    report_deps = [teacher_meta_path(t) for t in teacher_ids(params)]
    report_deps += [eval_path(m, a) for m in model_ids(params) for a in attacks]
    report_deps += [bounds_path(s, t) for s, t in bounds_pairs(params)]
    report_deps += [history_path(s) for s in students]
    out.append(
        Job(
            "report",
            None,
            _cmd("report"),
            report_deps,
            [REPORT_MD, REPORT_PNG, REPORT_RECORD],
            REPORT_PARAMS,
            metrics=[METRICS],
            plots=[PLOT_CSV],
            record=REPORT_RECORD,
            gpus=0,
        )
    )
    return out


def _out(path: str) -> str | dict:
    """A dvc.yaml output entry: files under reports/ are kept in git (``cache: false``), so
    every commit and experiment carries its own; the rest go to the DVC cache."""
    return {path: {"cache": False}} if path.startswith("reports/") else path


def dvc_params(params: Study, keys: list[str]) -> list[str]:
    """The keys DVC tracks for a stage: those written in the params file. A key left to its
    default is not in the file (DVC would call it missing); its value lives in the code
    (pipeline/params.py), which every stage depends on."""
    out = []
    for dotted in keys:
        node: object = params.raw
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None:
            out.append(dotted)
    return out


def _dvc_stage(params: Study, job: Job) -> dict:
    """One explicit dvc.yaml stage: what a DVC user would write by hand for the job."""
    stage: dict = {"cmd": job.cmd}
    deps = [*job.deps, *code_deps(job.stage)]
    stage["deps"] = list(dict.fromkeys(deps))
    keys = dvc_params(params, job.params)
    if keys:
        stage["params"] = keys
    stage["outs"] = [_out(o) for o in job.outs]
    if job.metrics:
        stage["metrics"] = [_out(m) for m in job.metrics]
    if job.plots:
        stage["plots"] = [_out(p) for p in job.plots]
    return stage


def dvc_yaml(params: dict) -> str:
    """The text of dvc.yaml for ``params``: one explicit stage per job (``dvc repro --glob
    'distill-*'`` runs every student)."""
    stages = {job.name: _dvc_stage(params, job) for job in jobs(params)}
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


def check_fresh(params_path: str = "params.yaml", dvc_path: str = "dvc.yaml") -> str | None:
    """None when dvc.yaml matches params.yaml; else a message saying how to regenerate it."""
    path = Path(dvc_path)
    if not path.exists():
        return f"{dvc_path} is missing: run `python -m pipeline.dag`"
    if path.read_text() != dvc_yaml(load_params(params_path, build=False)):
        return (
            f"{dvc_path} does not match {params_path} (teachers, students, methods, seeds or "
            "attacks, signals.enabled, or which keys the file sets, changed): run "
            "`python -m pipeline.dag` to regenerate it"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write dvc.yaml from params.yaml.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--output", default="dvc.yaml")
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = ap.parse_args(argv)
    try:
        if args.check:
            problem = check_fresh(args.params, args.output)
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                return 1
            return 0
        text = dvc_yaml(load_params(args.params, build=False))
    except ParamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    atomic_write_text(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
