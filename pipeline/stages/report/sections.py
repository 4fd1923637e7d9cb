"""The report's markdown, section by section: each function returns its section's lines."""

from __future__ import annotations

from pathlib import Path

from kdiga.stats import SEEDS_NEEDED_RULE
from pipeline import dag
from pipeline.params import Study, radius_label
from pipeline.stages.report.claims import claim_attack, claim_radius, claims_in_words, claims_table
from pipeline.stages.report.numbers import CONVERGED, Numbers, cells, label
from pipeline.stages.report.tables import accuracy_table, bounds_table, prop2_table, training_table
from pipeline.stages.report.text import attack_name, machines_note, problems, uncertainty_note


def opening(params: Study, numbers: Numbers, n_test: int) -> list[str]:
    """The title, what was studied, what the intervals are over and where it was computed."""
    s = params.shard
    teachers = ", ".join(
        f"{t} ({m['arch']}, {m['kind']}, source `{m['source']}`, clean "
        f"{100 * m['clean_acc']:.1f}%, validation {100 * m['val_acc']:.1f}%)"
        for t, m in numbers.teachers.items()
    )
    parts = [
        "# kdiga study report",
        "",
        f"Dataset: {s.dataset} ({s.image_size}x{s.image_size}), evaluated on {n_test} "
        f"{params.attack.split} images. Teachers: {teachers}. Students: "
        + ", ".join(f"{n} ({st.arch}, {st.init})" for n, st in params.students.items())
        + f". Methods: {', '.join(label(m) for m in params.distill.methods)}; seeds "
        f"{', '.join(map(str, params.seeds))}. Radii are {params.attack.norm} in [0, 1] pixel "
        "units.",
        "",
        uncertainty_note(params, n_test),
    ]
    served = [m for m in params.distill.methods if dag.uses_signals(params, m)]
    if served:
        sig = params.signals
        parts[-1] += (
            f" The {', '.join(label(m) for m in served)} students trained from their "
            f"teacher's cached signals ({sig.views} fixed augmented view(s) per image, "
            f"gradients in {sig.grad_dtype}), not from a live teacher."
        )
    return [*parts, "", machines_note(params)]


def claims_section(params: Study, claim_rows: list[dict]) -> list[str]:
    return [
        "",
        "## What this study supports",
        "",
        f"The paper's claims at radius {radius_label(claim_radius(params))} under "
        f"{attack_name(params, claim_attack(params))}, and Table 4's LLM ordering at the "
        "largest bounds radius, as paired differences with their 95% CI. Seed SD is the "
        "standard deviation across seeds of the per-seed difference. " + SEEDS_NEEDED_RULE,
        "",
        claims_table(claim_rows) if claim_rows else "(no claim applies to these methods)",
        "",
        *claims_in_words(claim_rows),
    ]


def accuracy_section(params: Study, numbers: Numbers) -> list[str]:
    parts = []
    for attack in numbers.attacks:
        parts += ["", f"## Accuracy (%) under {attack_name(params, attack)}"]
        for teacher in cells(params):
            parts += [
                "",
                f"### Teacher {teacher}" if teacher else "### Students",
                "",
                "Clean and robust accuracy per radius, mean [95% CI]; the teacher's own "
                "mean in parentheses.",
                "",
                accuracy_table(params, numbers, teacher, attack),
            ]
    return parts


def bounds_section(params: Study, numbers: Numbers) -> list[str]:
    """Table 4's terms per teacher, then whether every LLM value converged."""
    first = numbers.first_bounds()
    parts = [
        "",
        "## Local-linearity bound terms (Table 4)",
        "",
        "LLM (Definition 2, with the absolute value) at radii "
        f"{', '.join(first['radius_labels'])}, "
        "clean CE and the input-gradient gap to the teacher, mean [95% CI] over "
        f"{first['n']} random test images (a student trained without a teacher is compared "
        "with each teacher).",
    ]
    for teacher in params.teachers:
        parts += ["", f"### Teacher {teacher}", "", bounds_table(params, numbers, teacher)]
    flagged = any(
        not numbers.converged(c, t, lb)
        for t in params.teachers
        for c in cells(params)[t]
        if c.method
        for lb in first["radius_labels"]
    )
    return [
        *parts,
        "",
        "An LLM cell marked (not converged) gained more than "
        f"{100 * (1 - CONVERGED):.0f}% in the second half of its ascent's budget, so the "
        "maximum over the ball is likely higher than shown; more runs (`bounds.restarts`) "
        "close the gap. `python -m bench llm_convergence --study .` measures the settings "
        "against a 200-step x 5-run maximiser on this study's own models."
        if flagged
        else "Every LLM value converged: half the ascent's budget already reached "
        f"{100 * CONVERGED:.0f}% of the value.",
    ]


def prop2_section(params: Study, numbers: Numbers) -> list[str]:
    table, n_checked = prop2_table(params, numbers)
    parts = ["", "## Proposition 2 where it could fail", ""]
    if not n_checked:
        return [
            *parts,
            "Not tested (bounds.check_samples is 0): the report makes no claim about it.",
        ]
    return [
        *parts,
        "Proposition 2's bound (γs + γt + φ, with the γ reported above) tested on the "
        f"first {n_checked} of those images at each model's PGD-20 adversarial point, at "
        "random points of the ball and at the ascent's own iterates: the percentage of "
        "images where it failed at some point of that kind. The bound is checked at "
        "these points only.",
        "",
        table,
    ]


def training_section(params: Study, numbers: Numbers) -> list[str]:
    return [
        "",
        "## Training",
        "",
        "Validation accuracy of each student after its last epoch (the model the tables "
        "evaluate; no checkpoint is selected on test accuracy).",
        "",
        training_table(params, numbers),
        "",
        f"![accuracy against radius]({Path(dag.REPORT_PNG).name})",
    ]


def sanity_section(numbers: Numbers) -> list[str]:
    return [
        "",
        "## Sanity checks",
        "",
        *(
            problems(numbers)
            or [
                "Every evaluation passed its checks (robust accuracy never above "
                "clean nor rising with the radius, perturbations inside the ball and "
                "[0, 1], no gradient-masking flag)."
            ]
        ),
    ]
