"""Stage signals (optional, ``signals.enabled``): one teacher's signals, paid once per teacher:
``python -m pipeline.stages signals --teacher <name>``.

Stores the teacher's logits and input gradients (paper eq. 5, gt) for ``signals.views`` fixed
augmented views of every training image in ``data/signals/<teacher>.safetensors``
(``kdiga.signals``). The views are drawn with the students' augmentation (``distill.augment``,
``distill.crop_padding``) and ``shard.seed``; every student of that teacher whose method takes
the teacher at the clean input (``kdiga.methods``: ``cacheable``) then trains from the file
instead of running the teacher at each step. The file records the teacher checkpoint's
sha256 and the training images' hash: a student job refuses a file made for another teacher
or other data. Before anything is loaded or computed the stage logs the file's size, from the
training manifest, and refuses (exit 2) a file larger than ``signals.max_gb``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

from kdiga.files import sha256_file
from kdiga.shards import read_manifest
from kdiga.signals import compute_signals, save_signals, signals_nbytes
from pipeline import dag
from pipeline.params import ParamError, Signals, check_teacher
from pipeline.stages.common import (
    MissingInputError,
    begin,
    device,
    load_split,
    load_stage_model,
    log,
    manifest_path,
    run,
    write_timing,
)


def check_size(
    sig: Signals, teacher: str, n: int, image_shape: Sequence[int], num_classes: int
) -> int:
    """The bytes of ``teacher``'s signals file for ``n`` training images of ``image_shape``
    ``(C, H, W)`` (:func:`kdiga.signals.signals_nbytes`), logged; a :class:`ParamError`
    naming the size, the budget and ``signals.max_gb`` when it is over that budget."""
    nbytes = signals_nbytes(sig.views, n, image_shape, num_classes, sig.grad_dtype)
    what = (
        f"{sig.views} views x {n:,} images x {' x '.join(map(str, image_shape))} in "
        f"{sig.grad_dtype}, plus {num_classes} logits each"
    )
    gb = nbytes / 1e9
    log.info("teacher %s signals: %s: %.2f GB (signals.max_gb: %g)", teacher, what, gb, sig.max_gb)
    if gb > sig.max_gb:
        half = " or store float16 gradients" if sig.grad_dtype == "float32" else ""
        raise ParamError(
            "signals.max_gb",
            sig.max_gb,
            f"teacher {teacher}'s signals file would be {gb:,.2f} GB ({what}), over the "
            f"budget of {sig.max_gb:g} GB: raise signals.max_gb to at least "
            f"{math.ceil(gb * 100) / 100:.2f} where the disk and memory hold it, or lower "
            f"signals.views{half}",
        )
    return nbytes


def _train_manifest() -> dict:
    """The training split's manifest (counts and shapes), read before any image is."""
    path = manifest_path("train")
    if not path.exists():
        raise MissingInputError(f"{path} is missing: run the shard stage first")
    return read_manifest(path)


def body(args: argparse.Namespace, params: dict) -> None:
    sig, d = params.signals, params.distill
    name = args.teacher
    check_teacher(params, name)
    m = _train_manifest()
    size = int(m["image_size"])
    shape = (int(m["channels"]), size, size)
    check_size(sig, name, int(m["num_samples"]), shape, int(m["num_classes"]))
    if m.get("encoding") == "image":
        raise ParamError(
            "signals.enabled",
            True,
            "the training split streams from shards of image files "
            f"({params.shard.dataset}), and cached signals index a split held in memory: use "
            "false (the students then run their teacher live)",
        )
    provenance = begin(params, "signals", name)
    images, labels, _ = load_split("train")
    teacher_file = dag.model_path(name)
    teacher, _ = load_stage_model(params, name)
    views = sig.views
    with device() as dev:
        start = time.perf_counter()
        signal_set = compute_signals(
            teacher,
            images,
            labels,
            views=views,
            augment=d.augment,
            crop_padding=d.crop_padding,
            seed=params.shard.seed,
            batch_size=sig.batch_size,
            device=dev,
            grad_dtype=sig.grad_dtype,
            teacher_sha256=sha256_file(teacher_file),
            progress=args.progress,
        )
        seconds = time.perf_counter() - start
    signal_set.meta["provenance"] = provenance
    write_timing("signals", name, seconds=seconds)
    save_signals(signal_set, dag.signals_path(name))
    log.info("teacher %s signals: %d views computed in %.1f s", name, views, seconds)


def main(argv: list[str] | None = None) -> int:
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--teacher", required=True, help="a name under teachers in params")

    return run("signals", "Cache one teacher's logits and input gradients.", body, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
