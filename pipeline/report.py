"""Stage report: the paper's tables from what the pipeline measured, a Figure-1-style plot,
and the metrics `dvc exp show` reads.

- Tables 1-3 shape: clean and robust accuracy (%) per radius, one table per attack, the
  teacher's own numbers in brackets; a result whose sanity checks failed is marked.
- Table 4 shape: LLM at each radius, clean CE and ||g_s - g_t||_2 per student.
- Training: each student's validation accuracy after its last epoch.
Nothing here is typed by hand: every number is read from the stages' outputs, and every
output is a function of them alone (the same inputs give the same bytes). Wall-clock cost
per method, relative to KD, goes to ``logs/cost.md`` beside the logs, outside what DVC hashes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import dag
from pipeline.common import begin, log, read_json, run, write_json
from pipeline.params import model_ids, parse_student_id, student_ids
from pipeline.provenance import seal

METHOD_NAMES = {
    "st": "ST",
    "kd": "KD",
    "ard": "ARD",
    "kdiga": "KDIGA",
    "kdiga_ardc": "KDIGA-ARDC",
    "kdiga_arda": "KDIGA-ARDA",
}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _markdown(df) -> str:
    cols = df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines)


def _label(params: dict, mid: str, teacher: dict) -> str:
    t = f"{teacher['arch']} ({_teacher_kind(teacher)})"
    if mid == "teacher":
        return f"Teacher: {t}"
    student, method = parse_student_id(params, mid)
    if method == "st":
        return f"{student} (ST)"
    return f"{t} -{METHOD_NAMES[method]}-> {student}"


def _teacher_kind(teacher: dict) -> str:
    if teacher["source"] == "train" and teacher.get("train"):
        return {"at": "PGD-AT", "trades": "TRADES"}[teacher["train"]["method"]]
    return teacher["source"].split(":", 1)[0]


def accuracy_table(params: dict, attack: str, evals: dict, teacher: dict):
    """One row per model: clean and robust accuracy (%) per radius, teacher's in brackets."""
    import polars as pl

    t = evals[("teacher", attack)]
    rows = []
    for mid in model_ids(params):
        e = evals[(mid, attack)]
        mark = " (suspect)" if e["suspect"] else ""
        row = {"Model": _label(params, mid, teacher) + mark}
        pairs = [("Clean", e["clean"], t["clean"])]
        pairs += list(zip(e["radius_labels"], e["robust"], t["robust"], strict=True))
        for col, v, tv in pairs:
            row[col] = _pct(v) if mid == "teacher" else f"{_pct(v)} ({_pct(tv)})"
        rows.append(row)
    return pl.DataFrame(rows)


def bounds_table(params: dict, bounds: dict, teacher: dict):
    import polars as pl

    rows = []
    for sid in student_ids(params):
        b = bounds[sid]
        row = {"Model": _label(params, sid, teacher)}
        for label, v in zip(b["radius_labels"], b["llm"], strict=True):
            row[f"llm {label}"] = f"{v:.3f}"
        row["CE"] = f"{b['ce']:.3f}"
        row["‖gs − gt‖₂"] = f"{b['grad_gap_l2']:.3f}"
        rows.append(row)
    return pl.DataFrame(rows)


def training_table(params: dict, histories: dict, teacher: dict):
    """Each student's epochs and validation accuracy after its last epoch."""
    import polars as pl

    rows = []
    for sid in student_ids(params):
        last = histories[sid][-1] if histories[sid] else {}
        rows.append(
            {
                "Model": _label(params, sid, teacher),
                "epochs": str(len(histories[sid])),
                "val acc (last epoch)": _pct(last.get("val_acc")),
            }
        )
    return pl.DataFrame(rows)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def cost_table(params: dict, timings: dict, teacher: dict):
    """Mean training seconds per epoch of each student (its timing file; None if there is
    none), and the ratio to KD's (same student)."""
    import polars as pl

    per_epoch = {sid: _mean((timings.get(sid) or {}).get("epoch_s") or []) for sid in timings}
    rows = []
    for sid in student_ids(params):
        kd = per_epoch.get(sid.rsplit("--", 1)[0] + "--kd")
        s = per_epoch.get(sid)
        rows.append(
            {
                "Model": _label(params, sid, teacher),
                "s / epoch": "-" if s is None else f"{s:.2f}",
                "× KD": "-" if s is None or not kd else f"{s / kd:.2f}",
            }
        )
    return pl.DataFrame(rows)


def write_cost(params: dict, teacher: dict) -> None:
    """logs/cost.md: wall-clock seconds per epoch of each student in the run that made it."""
    import json

    from kdiga.utils import atomic_write_text

    timings = {}
    for sid in student_ids(params):
        path = Path(dag.timing_path("distill", sid))
        timings[sid] = json.loads(path.read_text()) if path.exists() else None
    text = "\n".join(
        [
            "# Training cost",
            "",
            "Measured wall time per epoch of each student's training, in the run that made its "
            "model (`-` where that run left no timing file). Jobs that ran at the same time "
            "shared the machine, so these are rough; `python -m bench step_cost` measures the "
            "step-time ratios side by side.",
            "",
            _markdown(cost_table(params, timings, teacher)),
        ]
    )
    atomic_write_text(text + "\n", dag.COST_MD)


def figure(params: dict, attack: str, evals: dict, path: str) -> list[dict]:
    """Clean and robust accuracy against radius, one line per model; returns the CSV rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    radii = [0.0, *evals[("teacher", attack)]["radii"]]
    table = [{"radius": r} for r in radii]
    for mid in model_ids(params):
        e = evals[(mid, attack)]
        acc = [e["clean"], *e["robust"]]
        name = "teacher" if mid == "teacher" else METHOD_NAMES[parse_student_id(params, mid)[1]]
        if len(params["distill"]["students"]) > 1 and mid != "teacher":
            name += f" ({parse_student_id(params, mid)[0]})"
        style = {"color": "black", "linestyle": "--"} if mid == "teacher" else {}
        ax.plot(radii, [100 * a for a in acc], marker="o", label=name, **style)
        for row, a in zip(table, acc, strict=True):
            row[mid] = a
    ax.set_xlabel(f"{attack.upper()} radius ({params['attack']['norm']}, [0, 1] pixels)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Clean (radius 0) and robust accuracy of the students")
    fig.tight_layout()
    from kdiga.utils import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return table


def _autoattack_label(aa: dict) -> str:
    """E.g. 'AutoAttack (custom: apgd-ce, apgd-dlr; 1 restart)': what was really run."""
    text = aa["version"] + (f": {', '.join(aa['attacks'])}" if aa["version"] == "custom" else "")
    extra = [f"{aa['n_restarts']} restart(s)"] if aa["n_restarts"] else []
    extra += [f"{aa['n_iter']} iterations"] if aa["n_iter"] else []
    extra += [f"{aa['n_target_classes']} target classes"] if aa["n_target_classes"] else []
    return f"AutoAttack ({'; '.join([text, *extra])})"


def metrics(params: dict, evals: dict, bounds: dict, teacher: dict) -> dict:
    """Nested metrics for `dvc exp show`: model -> clean, attack -> radius label -> accuracy."""
    out: dict = {"teacher_val_acc": teacher["val_acc"]}
    for mid in model_ids(params):
        m: dict = {}
        for attack in params["attack"]["attacks"]:
            e = evals[(mid, attack)]
            m["clean"] = e["clean"]
            m[attack] = dict(zip(e["radius_labels"], e["robust"], strict=True))
            m[f"{attack}_suspect"] = e["suspect"]
        if mid in bounds:
            b = bounds[mid]
            m["bounds"] = {
                f"llm {lb}": v for lb, v in zip(b["radius_labels"], b["llm"], strict=True)
            }
            m["bounds"] |= {"ce": b["ce"], "grad_gap_l2": b["grad_gap_l2"]}
        out[mid] = m
    return out


def _write_csv(rows: list[dict], path: str) -> None:
    import polars as pl

    from kdiga.utils import atomic_path

    with atomic_path(path) as tmp:
        pl.DataFrame(rows).write_csv(tmp)


def _problems(evals: dict) -> list[str]:
    lines = []
    for (mid, attack), e in evals.items():
        for p in e.get("problems", []) + e.get("flags", []):
            lines.append(f"- {mid}, {attack}: {p}")
    return lines


def body(args: argparse.Namespace, params: dict) -> None:
    provenance = begin(params, "report")
    teacher = read_json(dag.teacher_meta_path())
    attacks = params["attack"]["attacks"]
    evals = {(m, a): read_json(dag.eval_path(m, a)) for m in model_ids(params) for a in attacks}
    bounds = {s: read_json(dag.bounds_path(s)) for s in student_ids(params)}
    histories = {s: read_json(dag.history_path(s)) for s in student_ids(params)}
    Path(dag.REPORT_MD).parent.mkdir(parents=True, exist_ok=True)

    s = params["shard"]
    n_test = evals[("teacher", attacks[0])]["n"]
    parts = [
        "# kdiga study report",
        "",
        f"Dataset: {s['dataset']} ({s['image_size']}x{s['image_size']}), evaluated on "
        f"{n_test} {params['attack']['split']} images. "
        f"Teacher: {teacher['arch']} ({_teacher_kind(teacher)}, source `{teacher['source']}`), "
        f"clean accuracy {_pct(teacher['clean_acc'])}% (validation {_pct(teacher['val_acc'])}%). "
        f"Radii are {params['attack']['norm']} in [0, 1] pixel units.",
    ]
    served = [m for m in params["distill"]["methods"] if dag.uses_signals(params, m)]
    if served:
        sig = params["signals"]
        names = ", ".join(METHOD_NAMES.get(m, m) for m in served)
        parts[-1] += (
            f" The {names} students trained from the teacher's cached signals "
            f"({sig['views']} fixed augmented view(s) per image, gradients in "
            f"{sig['grad_dtype']}), not from a live teacher."
        )
    for attack in attacks:
        if attack == "pgd":
            p = params["attack"]["pgd"]
            what = f"{p['steps']}-step PGD, {p['restarts']} restart(s)"
        else:
            what = _autoattack_label(params["attack"]["autoattack"])
        parts += [
            "",
            f"## Accuracy (%) under {what}",
            "",
            "Clean and robust accuracy per radius; the teacher's own numbers in brackets.",
            "",
            _markdown(accuracy_table(params, attack, evals, teacher)),
        ]
    b_radii = ", ".join(bounds[student_ids(params)[0]]["radius_labels"])
    parts += [
        "",
        "## Local-linearity bound terms (Table 4)",
        "",
        f"LLM (Definition 2, with the absolute value) at radii {b_radii}, clean CE and the "
        "input-gradient gap to the teacher, averaged over "
        f"{bounds[student_ids(params)[0]]['n']} random test images.",
        "",
        _markdown(bounds_table(params, bounds, teacher)),
        "",
        "## Training",
        "",
        "Validation accuracy of each student after its last epoch (the model the tables "
        "evaluate; no checkpoint is selected on test accuracy).",
        "",
        _markdown(training_table(params, histories, teacher)),
        "",
        f"![accuracy against radius]({Path(dag.REPORT_PNG).name})",
    ]
    problems = _problems(evals)
    parts += ["", "## Sanity checks", ""]
    parts += problems or [
        "Every evaluation passed its checks (robust accuracy never above "
        "clean nor rising with the radius, perturbations inside the ball and "
        "[0, 1], no gradient-masking flag)."
    ]
    from kdiga.utils import atomic_write_text

    atomic_write_text("\n".join(parts) + "\n", dag.REPORT_MD)
    table = figure(params, params["report"]["figure_attack"], evals, dag.REPORT_PNG)
    _write_csv(table, dag.PLOT_CSV)
    write_json(metrics(params, evals, bounds, teacher), dag.METRICS)
    write_json(seal(provenance, [dag.REPORT_MD, dag.REPORT_PNG, dag.METRICS, dag.PLOT_CSV]),
               dag.REPORT_RECORD)  # fmt: skip
    write_cost(params, teacher)
    log.info("wrote %s, %s, %s (wall-clock cost: %s)", dag.REPORT_MD, dag.REPORT_PNG,
             dag.METRICS, dag.COST_MD)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run("report", "Write the report, plot and metrics.", body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
