"""Stage signals (optional, ``signals.enabled``): the teacher's signals, paid once per grid.

Stores the teacher's logits and input gradients (paper eq. 5, gt) for ``signals.views`` fixed
augmented views of every training image in ``data/signals.safetensors`` (``kdiga.signals``).
The views are drawn with the students' augmentation (``distill.augment``, ``distill.crop_padding``);
every kd, ard, kdiga and kdiga_ardc student of the grid then trains from the file instead of
running the teacher at each step. The file records the teacher checkpoint's sha256 and the
training images' hash: a student job refuses a file made for another teacher or other data.
"""

from __future__ import annotations

import argparse
import time

from pipeline import dag
from pipeline.common import begin, device, load_split, load_stage_model, log, run, write_timing


def body(args: argparse.Namespace, params: dict) -> None:
    from kdiga.signals import compute_signals, save_signals
    from kdiga.utils import sha256_file

    sig, d = params["signals"], params["distill"]
    provenance = begin(params, "signals")
    images, labels, _ = load_split("train")
    teacher_file = dag.model_path("teacher")
    teacher, _ = load_stage_model(params, "teacher")
    views = sig["views"]
    size = views * images.numel() * {"float32": 4}.get(sig["grad_dtype"], 2)
    log.info(
        "teacher signals: %d views x %d images (about %.2f GB of gradients in %s)",
        views, labels.numel(), size / 1e9, sig["grad_dtype"],
    )  # fmt: skip
    with device() as dev:
        start = time.perf_counter()
        signal_set = compute_signals(
            teacher,
            images,
            labels,
            views=views,
            augment=d["augment"],
            crop_padding=d["crop_padding"],
            seed=params["seed"],
            batch_size=sig["batch_size"],
            device=dev,
            grad_dtype=sig["grad_dtype"],
            teacher_sha256=sha256_file(teacher_file),
        )
        seconds = time.perf_counter() - start
    signal_set.meta["provenance"] = provenance
    write_timing("signals", None, seconds=seconds)
    save_signals(signal_set, dag.SIGNALS)
    log.info("teacher signals: %d views computed in %.1f s", views, seconds)


def main(argv: list[str] | None = None) -> int:
    return run("signals", "Cache the teacher's logits and input gradients.", body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
