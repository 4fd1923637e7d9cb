"""The study's measured per-sample values, read from the stages' outputs, grouped into the
report's rows (Cell), and their means with a 95% CI."""

from __future__ import annotations

from dataclasses import dataclass

from kdiga import stats
from kdiga.attacks.sweep import per_sample_correct
from kdiga.methods import get_method
from pipeline import dag
from pipeline.params import StudentJob, Study, model_ids, student_jobs
from pipeline.stages.common import read_json

BOOT = {"n_boot": 2000, "seed": 0}  # the bootstrap's own fixed draw: the same bytes every run
#: an LLM value counts as converged when half the ascent's budget already reached this
#: fraction of it (the second half added less than 3%)
CONVERGED = 0.97


def label(method: str) -> str:
    """The method's name as the report prints it (its entry in the method table)."""
    return get_method(method).label


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
        seeds = tuple(
            j for j in jobs if (j.teacher, j.method, j.student) == (teacher, method, student)
        )
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


def estimate(per_seed: list):
    """The mean of ``per_seed`` with its 95% CI, from the bootstrap's fixed draw."""
    return stats.estimate(per_seed, **BOOT)


def accuracy_estimate(per_seed: list):
    """An accuracy's :func:`estimate`, its interval cut to [0, 1], the values an accuracy
    can take (a t-interval over few seeds reaches past them)."""
    return estimate(per_seed).within(0.0, 1.0)
