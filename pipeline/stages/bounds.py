"""Stage bounds: Table 4's local-linearity bound terms of one student (LLM at each radius, clean
CE) and its input-gradient gap ||g_s - g_t||_2 to its teacher (``--teacher <name>`` for a
student trained without one), on random test samples (paper section 4.4): the same samples
for every model of the study. Per sample, so the report can give CIs and pair models; with
the ascent's convergence (half against full budget, converged fraction, steps used); and
Proposition 2 tested at PGD, random and ascent points (``kdiga.bounds``). The teacher's part
comes from its ``bounds_teacher`` job (``data/bounds/<teacher>.teacher.safetensors``)."""

from __future__ import annotations

import argparse
import time

from kdiga.bounds import llm_key, load_teacher_share, prop2_key, table4
from pipeline import dag
from pipeline.params import Study, check_teacher, parse_student_id, radius_label
from pipeline.stages.bounds_teacher import ascent_settings, bounds_samples, generator
from pipeline.stages.common import (
    begin,
    device,
    load_stage_model,
    log,
    run,
    write_json,
    write_timing,
)


def body(args: argparse.Namespace, params: Study) -> None:
    parse_student_id(params, args.model)
    name = dag.bounds_teacher(params, args.model, args.teacher)
    if args.teacher is not None:
        check_teacher(params, args.teacher)
    key = dag.bounds_key(args.model, args.teacher)
    provenance = begin(params, "bounds", key)
    b = params.bounds
    student, _ = load_stage_model(params, args.model)
    teacher, _ = load_stage_model(params, name)
    share = load_teacher_share(dag.bounds_teacher_path(name))
    x, y = bounds_samples(params)
    n = len(y)
    with device() as dev:
        student.to(dev).eval()
        teacher.to(dev).eval()
        start = time.perf_counter()
        row = table4(
            student,
            teacher,
            x,
            y,
            radii=b.radii,
            settings=ascent_settings(params),
            batch_size=b.batch_size,
            device=dev,
            generator=generator(params),
            check_samples=b.check_samples,
            share=share,
            progress=args.progress,
        )
        seconds = time.perf_counter() - start
    n_check = row.get("prop2/n", 0)
    prop2 = {"n": n_check, "radii": {}}
    if n_check:
        prop2["radii"] = {radius_label(r): row[prop2_key(r)] for r in b.radii}
    out = {
        "model": args.model,
        "teacher": name,
        "n": n,
        "radii": b.radii,
        "radius_labels": [radius_label(r) for r in b.radii],
        "llm": [row[llm_key(r)] for r in b.radii],
        "ce": row["ce"],
        "grad_gap_l2": row["grad_gap_l2"],
        "convergence": {
            radius_label(r): {
                **{
                    part: row[llm_key(r, part)]
                    for part in ("half", "half_ratio", "converged", "steps")
                },
                "converged_per_sample": row[llm_key(r, "samples_converged")],
                "steps_per_sample": row[llm_key(r, "samples_steps")],
            }
            for r in b.radii
        },
        "prop2": prop2,
        "llm_per_sample": [row[llm_key(r, "samples")] for r in b.radii],
        "ce_per_sample": row["ce/samples"],
        "grad_gap_per_sample": row["grad_gap_l2/samples"],
        "provenance": provenance,
    }
    write_timing("bounds", key, seconds=seconds)
    write_json(out, dag.bounds_path(args.model, args.teacher))
    llm = ", ".join(
        f"{lb}: {v:.3f}" for lb, v in zip(out["radius_labels"], out["llm"], strict=True)
    )
    log.info(
        "%s bounds on %d images: LLM %s; CE %.3f; ||g_s - g_t||_2 to %s %.3f (%.1f s)",
        args.model,
        n,
        llm,
        out["ce"],
        name,
        out["grad_gap_l2"],
        seconds,
    )


def main(argv: list[str] | None = None) -> int:
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--model", required=True, help="a student id")
        ap.add_argument(
            "--teacher", default=None, help="for a student trained without a teacher: which one"
        )

    return run("bounds", "Local-linearity bound terms of one student.", body, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
