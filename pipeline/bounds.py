"""Stage bounds: Table 4's local-linearity bound terms of one student against the teacher
(LLM at each radius, clean CE, ||g_s - g_t||_2) on random test samples (paper section 4.4)."""

from __future__ import annotations

import argparse
import time

from pipeline import dag
from pipeline.common import (
    begin,
    device,
    load_split,
    load_stage_model,
    log,
    run,
    write_json,
    write_timing,
)
from pipeline.params import parse_student_id, radius_label


def body(args: argparse.Namespace, params: dict) -> None:
    import torch

    from kdiga.bounds import llm_key, sample_indices, table4
    from kdiga.data import to_float

    parse_student_id(params, args.model)
    provenance = begin(params, "bounds", args.model)
    b = params["bounds"]
    student, _ = load_stage_model(params, args.model)
    teacher, _ = load_stage_model(params, "teacher")
    images, labels, _ = load_split("test")
    n = min(b["samples"], len(labels))
    if n < b["samples"]:
        log.warning(
            "bounds.samples=%d but the test split has %d images: using all", b["samples"], n
        )
    idx = sample_indices(len(labels), n, params["seed"])
    x, y = to_float(images[idx]), labels[idx]
    with device() as dev:
        student.to(dev).eval()
        teacher.to(dev).eval()
        start = time.perf_counter()
        row = table4(
            student,
            teacher,
            x,
            y,
            radii=b["radii"],
            steps=b["steps"],
            restarts=b["restarts"],
            batch_size=b["batch_size"],
            device=dev,
            generator=torch.Generator().manual_seed(params["seed"]),
        )
        seconds = time.perf_counter() - start
    out = {
        "model": args.model,
        "n": n,
        "radii": b["radii"],
        "radius_labels": [radius_label(r) for r in b["radii"]],
        "llm": [row[llm_key(r)] for r in b["radii"]],
        "ce": row["ce"],
        "grad_gap_l2": row["grad_gap_l2"],
        "provenance": provenance,
    }
    write_timing("bounds", args.model, seconds=seconds)
    write_json(out, dag.bounds_path(args.model))
    llm = ", ".join(
        f"{lb}: {v:.3f}" for lb, v in zip(out["radius_labels"], out["llm"], strict=True)
    )
    log.info("%s bounds on %d images: LLM %s; CE %.3f; ||g_s - g_t||_2 %.3f (%.1f s)", args.model,
             n, llm, out["ce"], out["grad_gap_l2"], seconds)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--model", required=True, help="student id <student>--<method>")

    return run("bounds", "Local-linearity bound terms of one student.", body, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
