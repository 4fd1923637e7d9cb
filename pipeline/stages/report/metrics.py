"""What the report writes beside its markdown: the metrics `dvc exp show` reads and the
wall-clock cost per method (``logs/cost.md``)."""

from __future__ import annotations

import json
from pathlib import Path

from kdiga.files import atomic_write_text
from pipeline import paths
from pipeline.params import StudentJob, Study, model_ids, student_jobs
from pipeline.stages.report.numbers import Numbers
from pipeline.stages.report.tables import markdown


def metrics(params: Study, numbers: Numbers, claim_rows: list[dict]) -> dict:
    """Nested metrics for `dvc exp show`: per model id its clean and robust accuracy per
    attack and radius and its bound terms; per claim the paired difference, its CI, the
    per-seed difference's standard deviation across seeds, the seeds a verdict would need
    and the verdict (a value that does not exist, as the seed SD of one seed, is left out)."""
    out: dict = {"teachers": {t: {"val_acc": m["val_acc"]} for t, m in numbers.teachers.items()}}
    for mid in model_ids(params):
        m: dict = {}
        for attack in numbers.attacks:
            e = numbers.evals[(mid, attack)]
            m["clean"] = e["clean"]
            m[attack] = dict(zip(e["radius_labels"], e["robust"], strict=True))
            m[f"{attack}_suspect"] = e["suspect"]
        for (sid, t), b in numbers.bounds.items():
            if sid != mid:
                continue
            m.setdefault("bounds", {})
            m["bounds"] |= {
                f"llm {lb}": v for lb, v in zip(b["radius_labels"], b["llm"], strict=True)
            }
            m["bounds"]["ce"] = b["ce"]
            m["bounds"][f"grad_gap_l2 {t}"] = b["grad_gap_l2"]
        out[mid] = m
    out["claims"] = {}
    for r in claim_rows:  # no nulls: DVC drops them from the metrics it shows
        d = r["difference"]
        extra = {"lo": d.lo, "hi": d.hi, "seed_sd": r["seed_sd"], "seeds_needed": r["seeds_needed"]}
        extra = {k: v for k, v in extra.items() if v is not None}
        out["claims"][r["key"]] = {"difference": d.mean, **extra, "verdict": r["verdict"]}
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def write_cost(params: Study) -> None:
    """logs/cost.md: wall-clock seconds per epoch of each student in the run that made it,
    and the ratio to KD's (same teacher, student and seed)."""
    per_epoch = {}
    for j in student_jobs(params):
        path = Path(paths.timing_path("distill", j.id))
        t = json.loads(path.read_text()) if path.exists() else {}
        per_epoch[j.id] = _mean(t.get("epoch_s") or [])
    rows = []
    for j in student_jobs(params):
        kd = StudentJob(j.teacher, "kd", j.student, j.seed).id if j.teacher else None
        s, k = per_epoch[j.id], per_epoch.get(kd) if kd else None
        rows.append(
            [j.id, "-" if s is None else f"{s:.2f}", "-" if s is None or not k else f"{s / k:.2f}"]
        )
    text = "\n".join(
        [
            "# Training cost",
            "",
            "Measured wall time per epoch of each student's training, in the run that made its "
            "model (`-` where that run left no timing file). Jobs that ran at the same time "
            "shared the machine, so these are rough; `python -m bench step_cost` measures the "
            "step-time ratios side by side.",
            "",
            markdown(["Student", "s / epoch", "× KD"], rows),
        ]
    )
    atomic_write_text(text + "\n", paths.COST_MD)
