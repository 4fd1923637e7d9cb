"""Which params each job reads: the keys its results depend on, so that a change re-runs
exactly the jobs that read it (Snakemake compares their values, DVC lists them in dvc.yaml).
Torch-free."""

from __future__ import annotations

import dataclasses

from kdiga.methods import get_method
from pipeline.params import TRAIN_KEYS, Shard, Study, parse_student_id

BOUNDS_PARAMS = ["shard.seed", "bounds"]  # the bounds' samples, draws and settings
REPORT_PARAMS = ["report", "signals"]  # the report says which students used cached signals


def uses_signals(params: Study, method: str) -> bool:
    """Whether ``method``'s students train from their teacher's cached signals."""
    return params.signals.enabled and get_method(method).cacheable


def signals_param_keys() -> list[str]:
    return ["shard.seed", "signals", "distill.augment", "distill.crop_padding"]


def distill_param_keys(params: Study, model_id: str) -> list[str]:
    """The params a student's job reads, so that only a real change re-runs it."""
    job = parse_student_id(params, model_id)
    keys = [*(f"distill.{k}" for k in TRAIN_KEYS), f"students.{job.student}"]
    keys += [f"distill.{k}" for k in get_method(job.method).param_keys]
    if job.teacher is not None and not uses_signals(params, job.method):
        keys += ["distill.compile_teacher"]  # the teacher runs: compiled or not
    if uses_signals(params, job.method):
        keys += ["signals"]
    if params.distill.gpus_per_job > 1:  # DDP splits each batch: another run than on one GPU
        keys += ["distill.gpus_per_job"]  # (left out at 1, so records made before it hold)
    return keys + stream_param_keys(params)


#: the shard keys only a streamed (ImageNet) study reads
STREAM_SHARD_KEYS = ("resize_short", "workers", "shuffle_buffer")


def shard_param_keys(params: Study) -> list[str]:
    """The params the shard job reads: the shard section, less the keys of streamed data in
    a study that holds its data in memory (changing them there changes no shard) and those
    its shards do not depend on (``shard.max_gb``, a memory budget)."""
    keys = [f.name for f in dataclasses.fields(Shard) if f.init and f.metadata.get("results", 1)]
    return [f"shard.{k}" for k in keys if params.shard.streamed or k not in STREAM_SHARD_KEYS]


def teacher_param_keys(params: Study, t: str) -> list[str]:
    """The params a teacher's job reads: its section, less ``train`` for a teacher it does
    not train (a file, a URL, a timm or torchvision model)."""
    teacher = params.teachers[t]
    if teacher.source == "train":
        return [f"teachers.{t}"]
    fields = [f for f in dataclasses.fields(teacher) if f.metadata.get("results", True)]
    return [f"teachers.{t}.{f.name}" for f in fields if f.name != "train"]


def stream_param_keys(params: Study) -> list[str]:
    """What the order of streamed training batches depends on (none for in-memory data)."""
    return ["shard.workers", "shard.shuffle_buffer"] if params.shard.streamed else []


def attack_param_keys(attack: str) -> list[str]:
    common = ["shard.seed", "attack.split", "attack.radii", "attack.norm", "attack.batch_size"]
    extra = ["attack.compile"] if attack == "pgd" else []
    return [*common, *extra, f"attack.{attack}"]


def dvc_params(params: Study, keys: list[str]) -> list[str]:
    """``keys`` as DVC must list them to see what Snakemake sees (``params_view``): a section
    holding a key its results do not depend on (``results=False``: a download cap, a memory
    budget, how often to checkpoint) is listed key by key without it."""
    out: list[str] = []

    def add(dotted: str, node: object) -> None:
        fields = dataclasses.fields(node) if dataclasses.is_dataclass(node) else ()
        if not any(_holds_other_keys(f, getattr(node, f.name)) for f in fields):
            out.append(dotted)
            return
        for f in fields:
            if f.init and f.metadata.get("results", True):
                add(f"{dotted}.{f.name}", getattr(node, f.name))

    for dotted in keys:
        node: object = params
        for part in dotted.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        add(dotted, node)
    return out


def _holds_other_keys(f: dataclasses.Field, value: object) -> bool:
    """Whether a field is, or holds, a key the results do not depend on."""
    if not f.metadata.get("results", True):
        return True
    if dataclasses.is_dataclass(value):
        return any(_holds_other_keys(g, getattr(value, g.name)) for g in dataclasses.fields(value))
    return False
