"""What a study holds, as the plan counts it: the splits' sizes and the models' architectures."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdiga.models import build_model
from pipeline import dag
from pipeline.params import Study, parse_student_id


def default(fn: Callable[..., Any], name: str) -> Any:
    """The default of ``fn``'s parameter ``name``: the stages call these with their defaults."""
    return inspect.signature(fn).parameters[name].default


@dataclass(frozen=True)
class Sizes:
    """Images in each split, and where the numbers come from."""

    train: int
    val: int
    test: int
    source: str


def split_sizes(params: Study, shards: str | Path = dag.SHARDS) -> Sizes:
    """The splits' sizes: the shard manifests' when they were written for this dataset and
    image size, else the dataset's sizes (``kdiga.options.DATASET_INFO``; the validation cut
    rounded as a whole)."""
    s = params.shard
    counts = {}
    for split in ("train", "val", "test"):
        try:
            m = json.loads((Path(shards) / f"{split}.json").read_text())
        except (OSError, ValueError):
            break
        if m.get("dataset") != s.dataset or m.get("image_size") != s.image_size:
            break
        counts[split] = int(m["num_samples"])
    if len(counts) == 3:
        return Sizes(**counts, source="the shard manifests")
    total, test = s.info.train_images, s.info.test_images
    val = round(s.val_fraction * total)
    test = test if s.test_samples is None else min(test, s.test_samples)
    return Sizes(total - val, val, test, f"the size of {s.dataset}")


@dataclass(frozen=True)
class ModelSpec:
    """An architecture as the stages build it (options as JSON, so the spec is a key)."""

    arch: str
    kwargs: str
    num_classes: int
    in_chans: int
    image_size: int

    def build(self):
        return build_model(
            self.arch,
            self.num_classes,
            in_chans=self.in_chans,
            image_size=self.image_size,
            **json.loads(self.kwargs),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)

    @property
    def label(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in json.loads(self.kwargs).items())
        return f"{self.arch}({opts})" if opts else self.arch


def model_spec(params: Study, model_id: str) -> ModelSpec:
    """The architecture of a teacher (its name) or a student id, for the study's data."""
    if model_id in params.teachers:
        t = params.teachers[model_id]
        arch, kwargs = t.arch or f"timm:{t.source.removeprefix('timm:')}", t.arch_kwargs
    else:
        s = params.students[parse_student_id(params, model_id).student]
        arch, kwargs = s.arch, s.kwargs
    d = params.data
    return ModelSpec(
        arch, json.dumps(kwargs, sort_keys=True), d["num_classes"], d["in_chans"], d["image_size"]
    )
