"""Where the study's files live: every stage's outputs, logs and resumable state, and the
code a stage's results depend on. The job table (:mod:`pipeline.dag`), the stages, the
Snakefile and the report read them here. No torch, no params."""

from __future__ import annotations

import re
from pathlib import Path

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


def bounds_teacher_path(teacher: str) -> str:
    """The teacher's share of the bounds jobs of its students (stage ``bounds_teacher``)."""
    return f"data/bounds/{teacher}.teacher.safetensors"


#: the inverse of the paths above: which stages (in the order to try) and which key write a
#: file of each form; the key is the pattern's group, or None for a single-job stage
_WRITERS: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = (
    (re.compile(r"data/shards"), ("shard",)),
    (re.compile(r"data/models/(.+)\.safetensors"), ("teacher", "distill")),
    (re.compile(r"data/models/(.+)\.history\.json"), ("distill",)),
    (re.compile(r"data/models/(.+)\.json"), ("teacher",)),
    (re.compile(r"data/signals/(.+)\.safetensors"), ("signals",)),
    (re.compile(r"data/evals/(.+)\.json"), ("attack",)),
    (re.compile(r"data/bounds/(.+)\.teacher\.safetensors"), ("bounds_teacher",)),
    (re.compile(r"data/bounds/(.+)\.json"), ("bounds",)),
    (re.compile(r"reports/[^/]+"), ("report",)),
)


def writers(path: str) -> list[tuple[str, str | None]]:
    """(stage, key) of the jobs that may write ``path``, read from its form alone (a study
    has at most one of them: the caller keeps the job whose outputs hold ``path``); [] for a
    path no stage writes."""
    out: list[tuple[str, str | None]] = []
    for pattern, stages in _WRITERS:
        m = pattern.fullmatch(path)
        if m:
            key = m.group(1) if m.groups() else None
            out += [(stage, key) for stage in stages]
    return out


def log_path(stage: str, key: str | None = None) -> str:
    return f"logs/{stage}.log" if key is None else f"logs/{stage}/{key}.log"


def timing_path(stage: str, key: str | None = None) -> str:
    """Wall-clock figures of one job (seconds per epoch, ...): beside its log, not hashed."""
    return log_path(stage, key).removesuffix(".log") + ".timing.json"


def code_deps(stage: str) -> list[str]:
    """The code a stage's results depend on: DVC's code dependencies and the code digest in
    every artifact's provenance (pipeline.provenance)."""
    shared = ["pipeline/stages/bounds_teacher.py"] if stage == "bounds" else []  # its draws
    script = f"pipeline/stages/{stage}"  # a module, or a package (pipeline/stages/report/)
    script += "" if (Path(__file__).parent / "stages" / stage).is_dir() else ".py"
    return [script, *shared, "pipeline/stages/common.py", "pipeline/params", "kdiga"]


def checkpoint_dir() -> Path:
    """Resumable state (training checkpoints, attack progress): never a declared output."""
    return Path("data/checkpoints")
