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

from pipeline.params import (
    TRAIN_KEYS,
    ParamError,
    load_params,
    model_ids,
    parse_student_id,
    student_ids,
)

STAGES = ("shard", "teacher", "signals", "distill", "attack", "bounds", "report")
GPU_STAGES = ("teacher", "signals", "distill", "attack", "bounds")
ADVERSARIAL = ("ard", "kdiga_ardc", "kdiga_arda")
IGA = ("kdiga", "kdiga_ardc", "kdiga_arda")
TEACHERLESS = ("st",)
#: methods whose teacher terms are at the clean (augmented) input, so cached signals serve
#: them (kdiga.losses: ``accepts_teacher_cache``); kdiga_arda needs the teacher at x+delta
CACHEABLE = ("kd", "ard", "kdiga", "kdiga_ardc")

SHARDS = "data/shards"
SIGNALS = "data/signals.safetensors"
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
    return f"data/models/{model_id}.safetensors"


def history_path(model_id: str) -> str:
    return f"data/models/{model_id}.history.json"


def teacher_meta_path() -> str:
    return "data/models/teacher.json"


def eval_path(model_id: str, attack: str) -> str:
    return f"data/evals/{model_id}--{attack}.json"


def bounds_path(model_id: str) -> str:
    return f"data/bounds/{model_id}.json"


def log_path(stage: str, key: str | None = None) -> str:
    return f"logs/{stage}.log" if key is None else f"logs/{stage}/{key}.log"


def timing_path(stage: str, key: str | None = None) -> str:
    """Wall-clock figures of one job (seconds per epoch, ...): beside its log, not hashed."""
    return log_path(stage, key).removesuffix(".log") + ".timing.json"


def code_deps(stage: str) -> list[str]:
    """The code a stage's results depend on: DVC's code dependencies and the code digest in
    every artifact's provenance (pipeline.provenance)."""
    return [f"pipeline/{stage}.py", "pipeline/common.py", "pipeline/params.py", "kdiga"]


def teacher_deps(params: dict) -> list[str]:
    """The teacher job's data: the shards, and a ``file:`` teacher's checkpoint."""
    source = params["teacher"]["source"]
    return [SHARDS, source.removeprefix("file:")] if source.startswith("file:") else [SHARDS]


def checkpoint_dir() -> Path:
    """Resumable state (training checkpoints, attack progress): never a declared output."""
    return Path("data/checkpoints")


@dataclass
class Job:
    stage: str
    key: str | None  # None for single-job stages; else the wildcard value
    cmd: str
    deps: list[str]
    outs: list[str]
    params: list[str]
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)  # the CLI arguments in cmd
    record: str = ""  # the output holding the job's provenance record (pipeline.provenance)

    @property
    def name(self) -> str:
        return self.stage if self.key is None else f"{self.stage}@{self.key}"

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


def uses_signals(params: dict, method: str) -> bool:
    """Whether ``method``'s students train from the cached teacher signals."""
    return params["signals"]["enabled"] and method in CACHEABLE


def signals_param_keys() -> list[str]:
    return ["seed", "signals", "distill.augment", "distill.crop_padding"]


def distill_deps(params: dict, method: str) -> list[str]:
    """The data a student's job reads: the shards, and the teacher or its cached signals."""
    if method in TEACHERLESS:
        return [SHARDS]
    extra = [SIGNALS] if uses_signals(params, method) else []
    return [SHARDS, model_path("teacher"), *extra]


def distill_param_keys(method: str, params: dict) -> list[str]:
    """The params a student's job reads, so that only a real change re-runs it."""
    keys = ["seed", *(f"distill.{k}" for k in (*TRAIN_KEYS, "student_kwargs"))]
    if uses_signals(params, method):
        keys += ["signals"]
    if method not in TEACHERLESS:
        keys += ["distill.ce_weight", "distill.kl_weight", "distill.temperature"]
    if method in IGA:
        keys += ["distill.iga"]
    if method in ADVERSARIAL:
        keys += ["distill.adversarial"]
    return keys


def attack_param_keys(attack: str) -> list[str]:
    common = ["seed", "attack.split", "attack.radii", "attack.norm", "attack.batch_size"]
    return [*common, f"attack.{attack}"]


def params_view(params: dict, keys: list[str]) -> str:
    """The values of dotted ``keys`` as canonical JSON (Snakemake re-runs a job when it changes)."""
    view = {}
    for key in keys:
        value = params
        for part in key.split("."):
            value = value[part]
        view[key] = value
    return json.dumps(view, sort_keys=True)


def jobs(params: dict) -> list[Job]:
    """Every job of the study described by validated ``params``, in dependency order."""
    out = [
        Job("shard", None, _cmd("shard"), [], [SHARDS], ["seed", "shard"], record=SHARDS_RECORD),
        Job(
            "teacher",
            None,
            _cmd("teacher"),
            teacher_deps(params),
            [model_path("teacher"), teacher_meta_path()],
            ["seed", "teacher"],
            record=teacher_meta_path(),
        ),
    ]
    if any(uses_signals(params, m) for m in params["distill"]["methods"]):
        out.append(
            Job(
                "signals",
                None,
                _cmd("signals"),
                [SHARDS, model_path("teacher")],
                [SIGNALS],
                signals_param_keys(),
                record=SIGNALS,
            )
        )
    for sid in student_ids(params):
        _, method = parse_student_id(params, sid)
        out.append(
            Job(
                "distill",
                sid,
                _cmd("distill", sid, model=sid),
                distill_deps(params, method),
                [model_path(sid)],
                distill_param_keys(method, params),
                plots=[history_path(sid)],
                args={"model": sid},
                record=model_path(sid),
            )
        )
    attack = params["attack"]
    for mid in model_ids(params):
        for name in attack["attacks"]:
            key = f"{mid}--{name}"
            keys = attack_param_keys(name)
            out.append(
                Job(
                    "attack",
                    key,
                    _cmd("attack", key, model=mid, attack=name),
                    [SHARDS, model_path(mid)],
                    [eval_path(mid, name)],
                    keys,
                    args={"model": mid, "attack": name},
                    record=eval_path(mid, name),
                )
            )
    for sid in student_ids(params):
        out.append(
            Job(
                "bounds",
                sid,
                _cmd("bounds", sid, model=sid),
                [SHARDS, model_path(sid), model_path("teacher")],
                [bounds_path(sid)],
                ["seed", "bounds"],
                args={"model": sid},
                record=bounds_path(sid),
            )
        )
    report_deps = [teacher_meta_path()]
    report_deps += [eval_path(m, a) for m in model_ids(params) for a in attack["attacks"]]
    report_deps += [bounds_path(s) for s in student_ids(params)]
    report_deps += [history_path(s) for s in student_ids(params)]
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
        )
    )
    return out


def _pad(values: list[str], size: int) -> list[str]:
    """Fixed-length lists for a foreach template (DVC cannot interpolate a whole list);
    a repeated entry is harmless: DVC reads each dependency and param once."""
    return values + [values[0]] * (size - len(values))


def _out(path: str) -> str | dict:
    """A dvc.yaml output entry: files under reports/ are kept in git (``cache: false``), so
    every commit and experiment carries its own; the rest go to the DVC cache."""
    return {path: {"cache": False}} if path.startswith("reports/") else path


def _dvc_stage(jobs: list[Job]) -> dict:
    """One dvc.yaml stage for the jobs of one pipeline stage: plain for a single job, else
    ``foreach`` over the job keys (stage names ``distill@small_cnn--kd`` etc.)."""
    first = jobs[0]
    code = code_deps(first.stage)
    extras = {}
    if first.metrics:
        extras["metrics"] = [_out(m) for m in first.metrics]
    if first.plots:
        extras["plots"] = [_out(p) for p in first.plots]
    if first.key is None:
        return {
            "cmd": first.cmd,
            "deps": [*first.deps, *code],
            "params": list(first.params),
            "outs": [_out(o) for o in first.outs],
            **extras,
        }
    n_deps = max(len(j.deps) for j in jobs)
    n_params = max(len(j.params) for j in jobs)
    items = {
        j.key: {
            **j.args,
            "deps": _pad(list(j.deps), n_deps),
            "params": _pad(list(j.params), n_params),
        }
        for j in jobs
    }

    def sub(text: str) -> str:
        return text.replace(first.key, "${key}")

    stage = {
        "foreach": items,
        "do": {
            "cmd": _cmd(first.stage, "${key}", **{k: f"${{item.{k}}}" for k in first.args}),
            "deps": [f"${{item.deps[{i}]}}" for i in range(n_deps)] + code,
            "params": [f"${{item.params[{i}]}}" for i in range(n_params)],
            "outs": [_out(sub(o)) for o in first.outs],
        },
    }
    for kind in ("metrics", "plots"):
        if kind in extras:
            stage["do"][kind] = [_out(sub(p)) for p in getattr(first, kind)]
    return stage


def dvc_yaml(params: dict) -> str:
    """The text of dvc.yaml for ``params``: one DVC stage per pipeline stage (``foreach`` over
    the jobs of a fanned-out stage), so ``dvc repro distill`` runs every student."""
    by_stage: dict[str, list[Job]] = {}
    for job in jobs(params):
        by_stage.setdefault(job.stage, []).append(job)
    stages = {name: _dvc_stage(js) for name, js in by_stage.items()}
    plots = [
        {
            PLOT_CSV: {
                "x": "radius",
                "y": model_ids(params),
                "template": "linear",
                "title": f"Accuracy against {params['report']['figure_attack']} radius",
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
    if path.read_text() != dvc_yaml(load_params(params_path)):
        return (
            f"{dvc_path} does not match {params_path} (a list of students, methods or attacks, "
            "or signals.enabled, changed): run `python -m pipeline.dag` to regenerate it"
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
        text = dvc_yaml(load_params(args.params))
    except ParamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from kdiga.utils import atomic_write_text

    atomic_write_text(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
