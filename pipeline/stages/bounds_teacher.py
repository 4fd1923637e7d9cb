"""Stage bounds_teacher: the teacher's share of the bounds stage, paid once per teacher:
``python -m pipeline.stages bounds_teacher --teacher <name>``.

On the bounds' random test samples (the same for every model), the teacher's clean CE and
input gradient, and at each radius its own LLM ascent on the first ``bounds.check_samples``
samples with every point it evaluated, and its PGD point there (``kdiga.bounds.teacher_share``),
in ``data/bounds/<teacher>.teacher.safetensors``. Every bounds job of a student of that teacher
reads it and runs only what needs the student."""

from __future__ import annotations

import argparse
import time

import torch

from kdiga.bounds import AscentSettings, sample_indices, save_teacher_share, teacher_share
from kdiga.data import to_float
from pipeline import dag
from pipeline.params import Study, check_teacher
from pipeline.stages.common import (
    begin,
    device,
    load_split,
    load_stage_model,
    log,
    run,
    write_timing,
)


def bounds_samples(params: Study):
    """The bounds' test samples (x [N, C, H, W] in [0, 1], y [N]): ``bounds.samples``
    random test images drawn with ``shard.seed``, the same for every model."""
    images, labels, _ = load_split("test")
    n = min(params.bounds.samples, len(labels))
    if n < params.bounds.samples:
        log.warning(
            "bounds.samples=%d but the test split has %d images: using all",
            params.bounds.samples,
            n,
        )
    idx = sample_indices(len(labels), n, params.shard.seed)
    return to_float(images[idx]), labels[idx]


def ascent_settings(params: Study):
    """The LLM ascent's settings (``bounds.steps``, ``restarts``, ``tol``, ``patience``)."""
    b = params.bounds
    return AscentSettings(steps=b.steps, restarts=b.restarts, tol=b.tol, patience=b.patience)


def generator(params: Study):
    """The bounds' random draws (ascent starts, PGD starts, random points): ``shard.seed``."""
    return torch.Generator().manual_seed(params.shard.seed)


def body(args: argparse.Namespace, params: Study) -> None:
    name = args.teacher
    check_teacher(params, name)
    provenance = begin(params, "bounds_teacher", name)
    b = params.bounds
    teacher, _ = load_stage_model(params, name)
    x, y = bounds_samples(params)
    with device() as dev:
        teacher.to(dev).eval()
        start = time.perf_counter()
        share = teacher_share(
            teacher,
            x,
            y,
            radii=b.radii,
            settings=ascent_settings(params),
            check_samples=b.check_samples,
            batch_size=b.batch_size,
            generator=generator(params),
            device=dev,
        )
        seconds = time.perf_counter() - start
    write_timing("bounds_teacher", name, seconds=seconds)
    save_teacher_share(share, dag.bounds_teacher_path(name), {"provenance": provenance})
    log.info(
        "teacher %s share of the bounds on %d images (%d checked): %.1f s",
        name,
        len(y),
        share.checked,
        seconds,
    )


def main(argv: list[str] | None = None) -> int:
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--teacher", required=True, help="a teacher's name")

    return run("bounds_teacher", "The teacher's share of the bounds.", body, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
