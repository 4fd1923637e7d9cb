"""Stage signals (optional, ``signals.enabled``): one teacher's signals, paid once per teacher:
``python -m pipeline.signals --teacher <name>``.

Stores the teacher's logits and input gradients (paper eq. 5, gt) for ``signals.views`` fixed
augmented views of every training image in ``data/signals/<teacher>.safetensors``
(``kdiga.signals``). The views are drawn with the students' augmentation (``distill.augment``,
``distill.crop_padding``) and ``shard.seed``; every student of that teacher whose method takes
the teacher at the clean input (``kdiga.methods``: ``cacheable``) then trains from the file
instead of running the teacher at each step. The file records the teacher checkpoint's
sha256 and the training images' hash: a student job refuses a file made for another teacher
or other data.
"""

from __future__ import annotations

import argparse
import time

from pipeline import dag
from pipeline.common import begin, device, load_split, load_stage_model, log, run, write_timing
from pipeline.params import check_teacher


def body(args: argparse.Namespace, params: dict) -> None:
    from kdiga.signals import compute_signals, save_signals
    from kdiga.utils import sha256_file

    sig, d = params.signals, params.distill
    name = args.teacher
    check_teacher(params, name)
    provenance = begin(params, "signals", name)
    images, labels, _ = load_split("train")
    teacher_file = dag.model_path(name)
    teacher, _ = load_stage_model(params, name)
    views = sig.views
    size = views * images.numel() * {"float32": 4}.get(sig.grad_dtype, 2)
    log.info(
        "teacher %s signals: %d views x %d images (about %.2f GB of gradients in %s)",
        name, views, labels.numel(), size / 1e9, sig.grad_dtype,
    )  # fmt: skip
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
