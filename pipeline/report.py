"""Stage report: the paper's tables from what the pipeline measured, with their uncertainty,
a Figure-1-style plot with bands, the claims the study supports, and the metrics `dvc exp
show` reads.

- Tables 1-3 shape, one table per attack and teacher: clean and robust accuracy (%) per
  radius of the teacher and of every student distilled from it (and the students trained
  without a teacher), the teacher's own numbers in brackets.
- Table 4 shape, per teacher: LLM at each radius, clean CE and ||g_s - g_t||_2.
- Every number is a mean with its 95% CI (``kdiga.stats``): over the training seeds and the
  test images when the study has several seeds, else a bootstrap over the test images
  (images only, one seed).
- Claims: the paper's claims as paired differences (same images, same seeds) with their CI,
  the per-seed difference's spread across seeds, the seeds a verdict would take, and a
  verdict: supported, not supported, inconclusive at this size, or needs ≥ 2 seeds.
Nothing here is typed by hand: every number is read from the stages' outputs, and every
output is a function of them alone (the same inputs give the same bytes). Wall-clock cost
per method, relative to KD, goes to ``logs/cost.md`` beside the logs, outside what DVC hashes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipeline import dag
from pipeline.common import begin, log, read_json, run, write_json
from pipeline.forkserver import stage_main
from pipeline.params import StudentJob, Study, model_ids, radius_label, student_jobs
from pipeline.provenance import read_record, seal

BOOT = {"n_boot": 2000, "seed": 0}  # the bootstrap's own fixed draw: the same bytes every run
#: an LLM value counts as converged when half the ascent's budget already reached this
#: fraction of it (the second half added less than 3%)
CONVERGED = 0.97
PROP2_KINDS = {"pgd_student": "PGD (student)", "pgd_teacher": "PGD (teacher)",
               "random": "random", "ascent": "ascent iterates", "all": "any"}  # fmt: skip


def label(method: str) -> str:
    from kdiga.methods import get_method

    return get_method(method).label


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class Cell:
    """One model (a teacher, or a (teacher, method, student) over its seeds)."""

    teacher: str | None
    method: str | None  # None: the teacher itself
    student: str | None
    seeds: tuple[StudentJob, ...] = ()

    @property
    def ids(self) -> list[str]:
        return [j.id for j in self.seeds] if self.method else [self.teacher]


def cells(params: Study) -> dict[str | None, list[Cell]]:
    """The rows of the report grouped by teacher: the teacher, the students trained
    without a teacher (for reference), then its students, per method and student."""
    jobs = student_jobs(params)

    def group(teacher: str | None, method: str, student: str) -> Cell:
        seeds = tuple(j for j in jobs if (j.teacher, j.method, j.student) == (teacher, method,
                                                                            student))  # fmt: skip
        return Cell(teacher, method, student, seeds)

    keys = list(dict.fromkeys((j.teacher, j.method, j.student) for j in jobs))
    out: dict[str | None, list[Cell]] = {}
    free = [group(*k) for k in keys if k[0] is None]
    for t in params.teachers:
        out[t] = [Cell(t, None, None), *free, *(group(*k) for k in keys if k[0] == t)]
    if not params.teachers:
        out[None] = free
    return out


class Numbers:
    """The measured per-sample values of the study, read from the stages' outputs."""

    def __init__(self, params: Study) -> None:
        from kdiga.attacks.sweep import per_sample_correct

        self.params = params
        self.attacks = params.attack.attacks
        self.evals = {
            (m, a): read_json(dag.eval_path(m, a)) for m in model_ids(params) for a in self.attacks
        }
        self.correct = {k: per_sample_correct(e) for k, e in self.evals.items()}
        # (student id, teacher) -> its bound terms against that teacher
        self.bounds = {
            (s, dag.bounds_teacher(params, s, t)): read_json(dag.bounds_path(s, t))
            for s, t in dag.bounds_pairs(params)
        }
        self.histories = {j.id: read_json(dag.history_path(j.id)) for j in student_jobs(params)}
        self.teachers = {t: read_json(dag.teacher_meta_path(t)) for t in params.teachers}
        first = self.evals[(model_ids(params)[0], self.attacks[0])]
        self.radii = list(first["radii"])
        self.radius_labels = list(first["radius_labels"])

    # -- per-sample vectors, one per seed -------------------------------------------------

    def accuracy(self, cell: Cell, attack: str, radius: int | None) -> list:
        """Per seed, the per-image correctness (clean when ``radius`` is None)."""
        out = []
        for mid in cell.ids:
            clean, robust = self.correct[(mid, attack)]
            out.append((clean if radius is None else robust[radius]).float())
        return out

    def bound(self, cell: Cell, teacher: str, what: str, index: int | None = None) -> list:
        """Per seed, per-sample values of a bound term against ``teacher``: ``llm`` at radius
        ``index``, ``ce`` or ``grad_gap``; the mean alone where no per-sample values were
        stored."""
        out = []
        for mid in cell.ids:
            b = self.bounds[(mid, teacher)]
            if what == "llm":
                per = b.get("llm_per_sample")
                out.append(per[index] if per else [b["llm"][index]])
            elif what == "ce":
                out.append(b.get("ce_per_sample") or [b["ce"]])
            else:
                out.append(b.get("grad_gap_per_sample") or [b["grad_gap_l2"]])
        return out

    def first_bounds(self) -> dict:
        return next(iter(self.bounds.values()))

    def converged(self, cell: Cell, teacher: str, label: str) -> bool:
        """Whether the LLM ascent converged at radius ``label`` for every seed: the mean at
        half the step budget reached CONVERGED of the mean at the full budget."""
        for mid in cell.ids:
            conv = (self.bounds[(mid, teacher)].get("convergence") or {}).get(label)
            if conv is None or conv["half_ratio"] < CONVERGED:
                return False
        return True


def _estimate(per_seed: list):
    from kdiga.stats import estimate

    return estimate(per_seed, **BOOT)


def _pct(e) -> str:
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
            v = _estimate(numbers.accuracy(cell, attack, r))
            text = _pct(v)
            if cell.method is not None and teacher is not None:
                tv = _estimate(numbers.accuracy(tcell, attack, r))
                text += f" ({100 * tv.mean:.1f})"
            row.append(text)
        rows.append(row)
    return _markdown(header, rows)


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
            text = _estimate(numbers.bound(cell, teacher, what, i)).format(scale=1, digits=3)
            if what == "llm" and not numbers.converged(cell, teacher, labels[i]):
                text += " (not converged)"
            row.append(text)
        rows.append(row)
    return _markdown(header, rows)


def prop2_table(params: Study, numbers: Numbers) -> tuple[str, int]:
    """Per student, teacher and radius: the fraction of samples where Proposition 2's bound
    failed at each kind of point tested (``-``: that kind was not tested)."""
    rows, n = [], 0
    for (sid, teacher), b in numbers.bounds.items():
        check = b.get("prop2") or {}
        n = max(n, check.get("n", 0))
        for label, kinds in (check.get("radii") or {}).items():
            cells = []
            for kind in PROP2_KINDS:
                k = kinds.get(kind) or {}
                rate = k.get("rate")
                cells.append("-" if rate is None else f"{100 * rate:.1f}")
            rows.append([sid, teacher, label, *cells])
    header = ["Student", "Teacher", "radius", *(f"{v} (%)" for v in PROP2_KINDS.values())]
    return _markdown(header, rows), n


def training_table(params: Study, numbers: Numbers) -> str:
    rows = []
    for j in student_jobs(params):
        h = numbers.histories[j.id]
        last = h[-1].get("val_acc") if h else None
        settings = params.train_settings(j.student)
        acc = "-" if last is None else f"{100 * last:.1f}"
        rows.append([j.id, str(len(h)), milestones_cell(settings), acc])
    header = ["Student", "epochs", "lr milestones", "val acc (last epoch)"]
    return _markdown(header, rows)


def milestones_cell(settings: dict) -> str:
    """The epochs after which the learning rate drops; one not below the number of epochs is
    marked: it would drop after the last epoch, and changes nothing."""
    epochs = settings["epochs"]
    cells = [
        f"{m}" if m < epochs else f"{m} (no effect: after the last epoch)"
        for m in settings["milestones"]
    ]
    return ", ".join(cells) or "-"


# -- claims ------------------------------------------------------------------------------

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
    from kdiga.stats import paired_difference, seeds_needed, verdict

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


CLAIMS_HEADER = ["Teacher", "Student", "Claim", "Measure", "Difference", "Seed SD",
                 "Seeds for a verdict", "Verdict"]  # fmt: skip


def _digits(row: dict) -> int:
    return 1 if row["scale"] == 100 else 3


def _difference_cell(row: dict, unit: str = "") -> str:
    """The difference and its CI (then ``unit``), and what the CI is over when it is not the
    seeds and the images: "+2.0 [-2.5, +6.5] (images only, one seed)"."""
    from kdiga.stats import INTERVAL_OVER

    d = row["difference"]
    text = d.format(scale=row["scale"], digits=_digits(row), signed=True) + unit
    return text if d.method in ("seeds+images", "single") else f"{text} ({INTERVAL_OVER[d.method]})"


def _seed_sd_cell(row: dict) -> str:
    sd = row["seed_sd"]
    return "—" if sd is None else f"{sd * row['scale']:.{_digits(row)}f}"


def claims_table(rows: list[dict]) -> str:
    body = [
        [r["teacher"], r["student"], r["claim"], r["measure"], _difference_cell(r),
         _seed_sd_cell(r), "—" if r["seeds_needed"] is None else str(r["seeds_needed"]),
         r["verdict"]]
        for r in rows
    ]  # fmt: skip
    return _markdown(CLAIMS_HEADER, body)


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


# -- figure, metrics, cost ---------------------------------------------------------------


def figure(params: Study, numbers: Numbers, attack: str, path: str) -> list[dict]:
    """Clean and robust accuracy against radius, one panel per teacher, one line per method
    (the mean over seeds) with its 95% CI as a band; returns the CSV rows (per model id)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = cells(params)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), dpi=110,
                             squeeze=False)  # fmt: skip
    radii = [0.0, *numbers.radii]
    for ax, (teacher, group) in zip(axes[0], groups.items(), strict=True):
        for cell in group:
            est = [_estimate(numbers.accuracy(cell, attack, r))
                   for r in [None, *range(len(numbers.radii))]]  # fmt: skip
            mean = [100 * e.mean for e in est]
            if cell.method is None:
                name, style = f"teacher {teacher}", {"color": "black", "linestyle": "--"}
            else:
                name, style = label(cell.method), {}
                if len(params.students) > 1:
                    name += f" ({cell.student})"
            (line,) = ax.plot(radii, mean, marker="o", markersize=3, label=name, **style)
            if all(e.lo is not None for e in est):
                ax.fill_between(radii, [100 * e.lo for e in est], [100 * e.hi for e in est],
                                color=line.get_color(), alpha=0.15, linewidth=0)  # fmt: skip
        ax.set_xlabel(f"{attack.upper()} radius ({params.attack.norm}, [0, 1] pixels)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"Teacher {teacher}" if teacher else "Students")
    fig.suptitle("Clean (radius 0) and robust accuracy, mean and 95% CI", fontsize=10)
    fig.tight_layout()
    from kdiga.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    table = [{"radius": r} for r in radii]
    for mid in model_ids(params):
        e = numbers.evals[(mid, attack)]
        for row, a in zip(table, [e["clean"], *e["robust"]], strict=True):
            row[mid] = a
    return table


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
    import json

    from kdiga.files import atomic_write_text

    per_epoch = {}
    for j in student_jobs(params):
        path = Path(dag.timing_path("distill", j.id))
        t = json.loads(path.read_text()) if path.exists() else {}
        per_epoch[j.id] = _mean(t.get("epoch_s") or [])
    rows = []
    for j in student_jobs(params):
        kd = StudentJob(j.teacher, "kd", j.student, j.seed).id if j.teacher else None
        s, k = per_epoch[j.id], per_epoch.get(kd) if kd else None
        rows.append([j.id, "-" if s is None else f"{s:.2f}",
                     "-" if s is None or not k else f"{s / k:.2f}"])  # fmt: skip
    text = "\n".join(
        [
            "# Training cost",
            "",
            "Measured wall time per epoch of each student's training, in the run that made its "
            "model (`-` where that run left no timing file). Jobs that ran at the same time "
            "shared the machine, so these are rough; `python -m bench step_cost` measures the "
            "step-time ratios side by side.",
            "",
            _markdown(["Student", "s / epoch", "× KD"], rows),
        ]
    )
    atomic_write_text(text + "\n", dag.COST_MD)


def _write_csv(rows: list[dict], path: str) -> None:
    import polars as pl

    from kdiga.files import atomic_path

    with atomic_path(path) as tmp:
        pl.DataFrame(rows).write_csv(tmp)


def _autoattack_label(aa) -> str:
    """E.g. 'AutoAttack (custom: apgd-ce, apgd-dlr; 1 restart)': what was really run."""
    text = aa.version + (f": {', '.join(aa.attacks)}" if aa.version == "custom" else "")
    extra = [f"{aa.n_restarts} restart(s)"] if aa.n_restarts else []
    extra += [f"{aa.n_iter} iterations"] if aa.n_iter else []
    extra += [f"{aa.n_target_classes} target classes"] if aa.n_target_classes else []
    return f"AutoAttack ({'; '.join([text, *extra])})"


def _attack_name(params: Study, attack: str) -> str:
    if attack == "pgd":
        p = params.attack.pgd
        return f"{p.steps}-step PGD, {p.restarts} restart(s)"
    return _autoattack_label(params.attack.autoattack)


def _problems(numbers: Numbers) -> list[str]:
    lines = []
    for (mid, attack), e in numbers.evals.items():
        for p in e.get("problems", []) + e.get("flags", []):
            lines.append(f"- {mid}, {attack}: {p}")
    return lines


def _uncertainty_note(params: Study, n_test: int) -> str:
    from kdiga.stats import INTERVAL_RULE, ONE_SEED_RULE, VERDICT_RULE

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


def body(args: argparse.Namespace, params: Study) -> None:
    provenance = begin(params, "report")
    numbers = Numbers(params)
    Path(dag.REPORT_MD).parent.mkdir(parents=True, exist_ok=True)
    s = params.shard
    attacks = numbers.attacks
    n_test = numbers.evals[(model_ids(params)[0], attacks[0])]["n"]
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
        _uncertainty_note(params, n_test),
    ]
    served = [m for m in params.distill.methods if dag.uses_signals(params, m)]
    if served:
        sig = params.signals
        parts[-1] += (
            f" The {', '.join(label(m) for m in served)} students trained from their "
            f"teacher's cached signals ({sig.views} fixed augmented view(s) per image, "
            f"gradients in {sig.grad_dtype}), not from a live teacher."
        )
    parts += ["", machines_note(params)]
    from kdiga.stats import SEEDS_NEEDED_RULE

    claim_rows = claims(params, numbers)
    parts += [
        "",
        "## What this study supports",
        "",
        f"The paper's claims at radius {radius_label(claim_radius(params))} under "
        f"{_attack_name(params, claim_attack(params))}, and Table 4's LLM ordering at the "
        "largest bounds radius, as paired differences with their 95% CI. Seed SD is the "
        "standard deviation across seeds of the per-seed difference. " + SEEDS_NEEDED_RULE,
        "",
        claims_table(claim_rows) if claim_rows else "(no claim applies to these methods)",
        "",
        *claims_in_words(claim_rows),
    ]
    for attack in attacks:
        parts += ["", f"## Accuracy (%) under {_attack_name(params, attack)}"]
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
    first = numbers.first_bounds()
    parts += [
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
    parts += [
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
    table, n_checked = prop2_table(params, numbers)
    parts += ["", "## Proposition 2 where it could fail", ""]
    if n_checked:
        parts += [
            "Proposition 2's bound (γs + γt + φ, with the γ reported above) tested on the "
            f"first {n_checked} of those images at each model's PGD-20 adversarial point, at "
            "random points of the ball and at the ascent's own iterates: the percentage of "
            "images where it failed at some point of that kind. The bound is checked at "
            "these points only.",
            "",
            table,
        ]
    else:
        parts += ["Not tested (bounds.check_samples is 0): the report makes no claim about it."]
    parts += [
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
    problems = _problems(numbers)
    parts += ["", "## Sanity checks", ""]
    parts += problems or [
        "Every evaluation passed its checks (robust accuracy never above "
        "clean nor rising with the radius, perturbations inside the ball and "
        "[0, 1], no gradient-masking flag)."
    ]
    from kdiga.files import atomic_write_text

    atomic_write_text("\n".join(parts) + "\n", dag.REPORT_MD)
    table = figure(params, numbers, params.report.figure_attack, dag.REPORT_PNG)
    _write_csv(table, dag.PLOT_CSV)
    write_json(metrics(params, numbers, claim_rows), dag.METRICS)
    write_json(seal(provenance, [dag.REPORT_MD, dag.REPORT_PNG, dag.METRICS, dag.PLOT_CSV]),
               dag.REPORT_RECORD)  # fmt: skip
    write_cost(params)
    log.info("wrote %s, %s, %s (wall-clock cost: %s)", dag.REPORT_MD, dag.REPORT_PNG,
             dag.METRICS, dag.COST_MD)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run("report", "Write the report, plot and metrics.", body, argv)


if __name__ == "__main__":
    raise SystemExit(stage_main("pipeline.report", main))
