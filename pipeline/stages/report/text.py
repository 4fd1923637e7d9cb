"""The report's notes in words: the attacks' names, what each interval is over, which
machines computed the study, and the sanity checks' problems."""

from __future__ import annotations

from kdiga.stats import INTERVAL_RULE, ONE_SEED_RULE, VERDICT_RULE
from pipeline import dag
from pipeline.params import Study
from pipeline.provenance import read_record
from pipeline.stages.report.numbers import Numbers


def _autoattack_label(aa) -> str:
    """E.g. 'AutoAttack (custom: apgd-ce, apgd-dlr; 1 restart)': what was really run."""
    text = aa.version + (f": {', '.join(aa.attacks)}" if aa.version == "custom" else "")
    extra = [f"{aa.n_restarts} restart(s)"] if aa.n_restarts else []
    extra += [f"{aa.n_iter} iterations"] if aa.n_iter else []
    extra += [f"{aa.n_target_classes} target classes"] if aa.n_target_classes else []
    return f"AutoAttack ({'; '.join([text, *extra])})"


def attack_name(params: Study, attack: str) -> str:
    if attack == "pgd":
        p = params.attack.pgd
        return f"{p.steps}-step PGD, {p.restarts} restart(s)"
    return _autoattack_label(params.attack.autoattack)


def problems(numbers: Numbers) -> list[str]:
    lines = []
    for (mid, attack), e in numbers.evals.items():
        for p in e.get("problems", []) + e.get("flags", []):
            lines.append(f"- {mid}, {attack}: {p}")
    return lines


def uncertainty_note(params: Study, n_test: int) -> str:
    seeds, split = len(params.seeds), params.attack.split
    if seeds > 1:
        how = (
            f"over the {seeds} training seeds and the {n_test} {split} images (with few seeds "
            f"it is wide, and that is the honest answer). {INTERVAL_RULE}"
        )
    else:
        how = f"over the {n_test} {split} images. {ONE_SEED_RULE}"
    note = (
        f"Every number is a mean with its 95% confidence interval in square brackets, {how} "
        "An accuracy's interval is cut to [0, 100], the values an accuracy can take. "
        f"Claims are checked on paired differences (the same images and seeds). {VERDICT_RULE}"
    )
    return note.replace(" test images", f" {split} images")  # kdiga.stats' rules say test


def machine_text(machine: dict) -> str:
    """One machine of a provenance record, as the report names it."""
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    threads = machine.get("threads")
    return (
        f"{machine.get('cpu', 'unknown CPU')} ({machine.get('cpu_cores', '?')} cores){gpu}, "
        f"torch {machine.get('torch', '?')} on {threads} thread{'s' if threads != 1 else ''}, "
        f"Python {machine.get('python', '?')}"
    )


def machines_note(params: Study) -> str:
    """Which machines computed the study's artifacts (each artifact's provenance record names
    the one that made it), and what another machine would change."""
    made: dict[str, int] = {}
    for job in dag.jobs(params):
        if job.stage == "report":
            continue
        machine = (read_record(job) or {}).get("machine")
        what = machine_text(machine) if machine else "a machine not recorded (an older kdiga)"
        made[what] = made.get(what, 0) + 1
    where = "; ".join(f"{what} ({n} job{'s' if n != 1 else ''})" for what, n in made.items())
    return (
        f"Computed on {where}. Another processor, thread count or torch computes other bytes: "
        "its floating-point sums run in another order, so its trained models differ as another "
        "training seed's would, and its numbers should agree with these within their intervals."
    )
