"""The grid's model ids, shared by the DAG and the stages: a student job is (teacher,
method, student, seed), id ``<teacher>--<method>--<student>--s<seed>`` (``st--<student>--
s<seed>`` for a method without a teacher); a teacher's id is its name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kdiga.methods import get_method
from pipeline.params.fields import (
    ID_SEP,
    ParamError,
)
from pipeline.params.schema import Study, Teacher


@dataclass(frozen=True)
class StudentJob:
    """One distillation job of the grid: (teacher, method, student, seed)."""

    teacher: str | None  # None for a method without a teacher (st)
    method: str
    student: str
    seed: int

    @property
    def id(self) -> str:
        parts = [self.teacher] if self.teacher is not None else []
        return ID_SEP.join([*parts, self.method, self.student, f"s{self.seed}"])


def student_jobs(params: Study) -> list[StudentJob]:
    """Every distillation job, in report order: students without a teacher first, then per
    teacher, method, student and seed."""
    methods = [get_method(m) for m in params.distill.methods]
    out = [
        StudentJob(None, m.name, s, seed)
        for m in methods
        if not m.needs_teacher
        for s in params.students
        for seed in params.seeds
    ]
    out += [
        StudentJob(t, m.name, s, seed)
        for t in params.teachers
        for m in methods
        if m.needs_teacher
        for s in params.students
        for seed in params.seeds
    ]
    return out


def student_ids(params: Study) -> list[str]:
    return [j.id for j in student_jobs(params)]


def teacher_ids(params: Study) -> list[str]:
    """A teacher's model id is its name."""
    return list(params.teachers)


def model_ids(params: Study) -> list[str]:
    """Every model the attack stage evaluates: the teachers, then each student."""
    return [*teacher_ids(params), *student_ids(params)]


def parse_student_id(params: Study, model_id: str) -> StudentJob:
    """The job of a student id; a clear error for an id that is not in the grid. Read from
    the id's parts (names never equal a method, nor look like a seed: :func:`_name`), in time
    independent of the grid's size: the DAG parses every student's id."""
    job = _student_job(params, model_id)
    if job is not None:
        return job
    known = student_ids(params)
    shown = ", ".join(known[:6]) + (f", ... ({len(known)} in all)" if len(known) > 6 else "")
    raise ParamError(
        "--model",
        model_id,
        "not a student of this study; ids are <teacher>--<method>--<student>--s<seed> (or "
        f"st--<student>--s<seed>): {shown}",
    )


def _student_job(params: Study, model_id: Any) -> StudentJob | None:
    parts = model_id.split(ID_SEP) if isinstance(model_id, str) else []
    if len(parts) not in (3, 4) or not re.fullmatch(r"s(0|[1-9]\d{0,9})", parts[-1]):
        return None
    teacher = parts[0] if len(parts) == 4 else None
    method, student, seed = parts[-3], parts[-2], int(parts[-1][1:])
    if method not in params.distill.methods or student not in params.students:
        return None
    if (teacher is None) == get_method(method).needs_teacher:
        return None
    if (teacher is not None and teacher not in params.teachers) or seed not in params.seed_set:
        return None
    return StudentJob(teacher, method, student, seed)


def check_teacher(params: Study, name: str) -> Teacher:
    if name not in params.teachers:
        raise ParamError("--teacher", name, f"known teachers: {', '.join(params.teachers)}")
    return params.teachers[name]
