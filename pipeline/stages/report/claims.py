"""The paper's claims as paired differences with their CI and a verdict, as a table and in
words."""

from __future__ import annotations

from kdiga.stats import INTERVAL_OVER, paired_difference, seeds_needed, verdict
from pipeline.params import Study, radius_label
from pipeline.stages.report.numbers import BOOT, Cell, Numbers, cells
from pipeline.stages.report.tables import markdown

#: (claimed, baseline, what, direction, text): the paper's claims as paired differences
CLAIMS = (
    ("kd", None, "robust", "less", "KD loses the teacher's robustness (KD − teacher)"),
    ("kdiga", "kd", "robust", "greater", "KDIGA is more robust than KD (KDIGA − KD)"),
    ("kdiga_ardc", "ard", "robust", "greater", "KDIGA-ARDC is more robust than ARD"),
    ("kdiga_arda", "ard", "robust", "greater", "KDIGA-ARDA is more robust than ARD"),
    ("kdiga", "kd", "llm", "less", "KDIGA is more locally linear than KD (Table 4: LLM)"),
    # KDIGA among its successors (not the paper's claims: "not supported" means the successor
    # was the more robust)
    ("kdiga", "igdm", "robust", "greater", "KDIGA is more robust than IGDM (KDIGA − IGDM)"),
    ("kdiga_arda", "adaad", "robust", "greater", "KDIGA-ARDA is more robust than AdaAD"),
)


def claim_attack(params: Study) -> str:
    """The strongest attack the study ran: AutoAttack when it ran, else PGD."""
    return "autoattack" if "autoattack" in params.attack.attacks else params.attack.attacks[0]


def claim_radius(params: Study) -> float:
    r = params.report.claim_radius
    if r is not None:
        return r
    eps = params.distill.adversarial.eps
    return min(params.attack.radii, key=lambda x: (abs(x - eps), x))


def claims(params: Study, numbers: Numbers) -> list[dict]:
    """Every claim the study's methods allow, per teacher and student: the paired difference
    (percentage points for accuracy, the LLM's own unit) with its CI, the standard deviation
    across seeds of the per-seed difference (``seed_sd``, None with one seed), the seeds that
    would make a difference of that size conclusive (``seeds_needed``, None where it cannot
    be said) and the verdict."""
    attack, radius = claim_attack(params), claim_radius(params)
    ri = numbers.radii.index(radius)
    b_radii = numbers.first_bounds()["radii"]
    bi = len(b_radii) - 1
    methods = params.distill.methods
    out = []
    for t in params.teachers:
        for s in params.students:
            for claimed, base, what, direction, text in CLAIMS:
                if claimed not in methods or (base is not None and base not in methods):
                    continue
                a = next(c for c in cells(params)[t] if (c.method, c.student) == (claimed, s))
                if base is None:
                    b = Cell(t, None, None)
                else:
                    b = next(c for c in cells(params)[t] if (c.method, c.student) == (base, s))
                if what == "robust":
                    va = numbers.accuracy(a, attack, ri)
                    vb = numbers.accuracy(b, attack, ri) * (len(va) if base is None else 1)
                    scale, unit = 100, f"robust accuracy at {radius_label(radius)} ({attack})"
                else:
                    va, vb = numbers.bound(a, t, "llm", bi), numbers.bound(b, t, "llm", bi)
                    scale, unit = 1, f"LLM at {radius_label(b_radii[bi])}"
                diff = paired_difference(va, vb, **BOOT)
                out.append(
                    {
                        "teacher": t,
                        "student": s,
                        "claim": text,
                        "measure": unit,
                        "difference": diff,
                        "scale": scale,
                        "seed_sd": diff.seed_sd,
                        "seeds_needed": seeds_needed(diff),
                        "verdict": verdict(diff, direction),
                        "key": f"{t}/{s}/{claimed}-{base or 'teacher'}/{what}",
                    }
                )
    return out


CLAIMS_HEADER = [
    "Teacher",
    "Student",
    "Claim",
    "Measure",
    "Difference",
    "Seed SD",
    "Seeds for a verdict",
    "Verdict",
]


def _digits(row: dict) -> int:
    return 1 if row["scale"] == 100 else 3


def _difference_cell(row: dict, unit: str = "") -> str:
    """The difference and its CI (then ``unit``), and what the CI is over when it is not the
    seeds and the images: "+2.0 [-2.5, +6.5] (images only, one seed)"."""
    d = row["difference"]
    text = d.format(scale=row["scale"], digits=_digits(row), signed=True) + unit
    return text if d.method in ("seeds+images", "single") else f"{text} ({INTERVAL_OVER[d.method]})"


def _seed_sd_cell(row: dict) -> str:
    sd = row["seed_sd"]
    return "—" if sd is None else f"{sd * row['scale']:.{_digits(row)}f}"


def claims_table(rows: list[dict]) -> str:
    body = [
        [
            r["teacher"],
            r["student"],
            r["claim"],
            r["measure"],
            _difference_cell(r),
            _seed_sd_cell(r),
            "—" if r["seeds_needed"] is None else str(r["seeds_needed"]),
            r["verdict"],
        ]
        for r in rows
    ]
    return markdown(CLAIMS_HEADER, body)


def _verdict_in_words(row: dict) -> str:
    v, n = row["verdict"], row["seeds_needed"]
    if v != "inconclusive":
        return f"**{v}**"
    if n is None:
        return f"**{v}**; no number of seeds would make a difference this size conclusive"
    return f"**{v}**; a difference this size would need about {n} seeds"


def claims_in_words(rows: list[dict]) -> list[str]:
    """One sentence per claim, for the README's generated block."""
    lines = []
    for r in rows:
        unit = " points" if r["scale"] == 100 else ""
        sd = "" if r["seed_sd"] is None else f", seed SD {_seed_sd_cell(r)}{unit}"
        lines.append(
            f"- {r['claim']}, teacher {r['teacher']}, student {r['student']}: {r['measure']} "
            f"differs by {_difference_cell(r, unit)}{sd}; {_verdict_in_words(r)}."
        )
    return lines
