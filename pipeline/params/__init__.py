"""The one schema for ``params.yaml``: every Snakemake and DVC run validates through it.

Each key is declared once, as a field of a frozen dataclass, with its check, its default and a
one-line description (:mod:`.schema`, built with :mod:`.fields`). ``load_params()``
(:mod:`.load`) reads the file, checks every key before any work starts and returns a
:class:`Study`: typed settings with radii parsed to floats and every omitted key at its
default, then the checks across keys (:mod:`.checks`). A bad value raises :class:`ParamError`
naming the key, the value and what is allowed. ``python -m pipeline.params --describe`` prints
every key.

A study is a grid: named ``teachers``, named ``students``, ``distill.methods`` and ``seeds``.
Each (teacher, method, student, seed) is one distillation job, id
``<teacher>--<method>--<student>--s<seed>``; a method without a teacher (``st``) gives
``st--<student>--s<seed>`` (:mod:`.ids`). Teachers are models of the study too: their id is
their name.
"""

from pipeline.params.checks import (
    check_models,
    check_paths,
    check_train_shards,
    test_images,
    val_fraction_problem,
)
from pipeline.params.fields import (
    MAX_EPOCHS,
    SEED_MAX,
    ParamError,
    parse_radius,
    radius_label,
)
from pipeline.params.ids import (
    StudentJob,
    check_teacher,
    model_ids,
    parse_student_id,
    student_ids,
    student_jobs,
    teacher_ids,
)
from pipeline.params.load import MAX_PARAMS_BYTES, load_params, params_file, read_yaml, validate
from pipeline.params.schema import (
    TRAIN_KEYS,
    AutoAttackSettings,
    Shard,
    Signals,
    Study,
    Teacher,
    describe,
)

__all__ = [
    "MAX_EPOCHS",
    "MAX_PARAMS_BYTES",
    "SEED_MAX",
    "TRAIN_KEYS",
    "AutoAttackSettings",
    "ParamError",
    "Shard",
    "Signals",
    "StudentJob",
    "Study",
    "Teacher",
    "check_models",
    "check_paths",
    "check_teacher",
    "check_train_shards",
    "describe",
    "load_params",
    "model_ids",
    "params_file",
    "parse_radius",
    "parse_student_id",
    "radius_label",
    "read_yaml",
    "student_ids",
    "student_jobs",
    "teacher_ids",
    "test_images",
    "val_fraction_problem",
    "validate",
]
