"""The report's markdown tables: accuracy per radius, the bound terms, Proposition 2's
failures and the students' training."""

from __future__ import annotations

from pipeline.params import Study, student_jobs
from pipeline.stages.report.numbers import Cell, Numbers, accuracy_estimate, cells, estimate, label

PROP2_KINDS = {
    "pgd_student": "PGD (student)",
    "pgd_teacher": "PGD (teacher)",
    "random": "random",
    "ascent": "ascent iterates",
    "all": "any",
}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def pct(e) -> str:
    return e.format(scale=100, digits=1)


def model_label(params: Study, cell: Cell, numbers: Numbers) -> str:
    if cell.method is None:
        meta = numbers.teachers[cell.teacher]
        return f"Teacher {cell.teacher}: {meta['arch']} ({meta['kind']})"
    arch = params.students[cell.student].arch
    student = cell.student if arch == cell.student else f"{cell.student} ({arch})"
    if cell.teacher is None:
        return f"{student} ({label(cell.method)}, no teacher)"
    return f"{cell.teacher} -{label(cell.method)}-> {student}"


def accuracy_table(params: Study, numbers: Numbers, teacher: str | None, attack: str) -> str:
    header = ["Model", "Clean", *numbers.radius_labels]
    rows = []
    tcell = Cell(teacher, None, None)
    for cell in cells(params)[teacher]:
        suspect = any(numbers.evals[(m, attack)]["suspect"] for m in cell.ids)
        row = [model_label(params, cell, numbers) + (" (suspect)" if suspect else "")]
        for r in [None, *range(len(numbers.radii))]:
            v = accuracy_estimate(numbers.accuracy(cell, attack, r))
            text = pct(v)
            if cell.method is not None and teacher is not None:
                tv = accuracy_estimate(numbers.accuracy(tcell, attack, r))
                text += f" ({100 * tv.mean:.1f})"
            row.append(text)
        rows.append(row)
    return markdown(header, rows)


def bounds_table(params: Study, numbers: Numbers, teacher: str) -> str:
    labels = numbers.first_bounds()["radius_labels"]
    header = ["Model", *(f"llm {lb}" for lb in labels), "CE", "‖gs − gt‖₂"]
    rows = []
    for cell in cells(params)[teacher]:
        if cell.method is None:
            continue
        row = [model_label(params, cell, numbers)]
        terms = [("llm", i) for i in range(len(labels))] + [("ce", None), ("grad_gap", None)]
        for what, i in terms:
            text = estimate(numbers.bound(cell, teacher, what, i)).format(scale=1, digits=3)
            if what == "llm" and not numbers.converged(cell, teacher, labels[i]):
                text += " (not converged)"
            row.append(text)
        rows.append(row)
    return markdown(header, rows)


def prop2_table(params: Study, numbers: Numbers) -> tuple[str, int]:
    """Per student, teacher and radius: the fraction of samples where Proposition 2's bound
    failed at each kind of point tested (``-``: that kind was not tested)."""
    rows, n = [], 0
    for (sid, teacher), b in numbers.bounds.items():
        check = b.get("prop2") or {}
        n = max(n, check.get("n", 0))
        for radius, kinds in (check.get("radii") or {}).items():
            rates = []
            for kind in PROP2_KINDS:
                k = kinds.get(kind) or {}
                rate = k.get("rate")
                rates.append("-" if rate is None else f"{100 * rate:.1f}")
            rows.append([sid, teacher, radius, *rates])
    header = ["Student", "Teacher", "radius", *(f"{v} (%)" for v in PROP2_KINDS.values())]
    return markdown(header, rows), n


def training_table(params: Study, numbers: Numbers) -> str:
    rows = []
    for j in student_jobs(params):
        h = numbers.histories[j.id]
        last = h[-1].get("val_acc") if h else None
        settings = params.train_settings(j.student)
        acc = "-" if last is None else f"{100 * last:.1f}"
        rows.append([j.id, str(len(h)), milestones_cell(settings), acc])
    header = ["Student", "epochs", "lr milestones", "val acc (last epoch)"]
    return markdown(header, rows)


def milestones_cell(settings: dict) -> str:
    """The epochs after which the learning rate drops; one not below the number of epochs is
    marked: it would drop after the last epoch, and changes nothing."""
    epochs = settings["epochs"]
    cells = [
        f"{m}" if m < epochs else f"{m} (no effect: after the last epoch)"
        for m in settings["milestones"]
    ]
    return ", ".join(cells) or "-"
