"""Choose a distillation setting on the validation split, never the test split.

    python -m pipeline.tune --method kdiga --weights 0.3 1 3 10

trains one student per IGA weight with the study's params and its first seed (the teacher
and shards must exist: run the study or its shard and teacher stages first) and prints clean and PGD
robust accuracy on the validation split at each attack radius. It writes nothing but its
log; put the chosen weight in params.yaml.
"""

from __future__ import annotations

import argparse
import math
import time

from kdiga.attacks import robust_sweep
from kdiga.data import to_float
from kdiga.methods import get_method, method_names
from kdiga.train import fit
from kdiga.utils import seed_everything
from pipeline.params import ParamError, StudentJob, Study, check_teacher
from pipeline.stages.common import (
    data_info,
    device,
    load_split,
    load_stage_model,
    log,
    run,
    train_config,
)
from pipeline.stages.distill import build_student


def body(args: argparse.Namespace, params: Study) -> None:
    iga = [m for m in method_names() if get_method(m).iga]
    if args.method not in iga:
        raise ParamError("--method", args.method, f"tuning the IGA weight needs one of {iga}")
    check_weights(args.weights)
    student = args.student or next(iter(params.students))
    if student not in params.students:
        raise ParamError("--student", student, f"known students: {', '.join(params.students)}")
    teacher_name = args.teacher or next(iter(params.teachers), None)
    check_teacher(params, teacher_name)
    seed = params.seeds[0]
    job = StudentJob(teacher_name, args.method, student, seed)
    x, y, manifest = load_split("train")
    vx, vy, _ = load_split("val")
    teacher = load_stage_model(params, teacher_name)[0]
    a = params.attack
    method = get_method(args.method)
    rows = []
    with device() as dev:
        for weight in args.weights:
            d = params.value("distill")
            d["iga"]["weight"] = weight
            seed_everything(seed)
            model = build_student(params, job, data_info(manifest))
            cfg = train_config(params.train_settings(student), seed)
            start = time.perf_counter()
            fit(model, method.build_from(d), x, y, cfg, teacher=teacher, device=dev)
            sweep = robust_sweep(
                model.eval(),
                to_float(vx),
                vy,
                a.radii,
                attack="pgd",
                norm=a.norm,
                batch_size=a.batch_size,
                seed=params.shard.seed,
                device=dev,
                steps=a.pgd.steps,
                restarts=a.pgd.restarts,
                step_size=a.pgd.step_size,
            )
            acc = sweep.accuracy()
            rows.append((weight, acc["clean"], [acc["robust"][r] for r in sweep.radii]))
            log.info(
                "weight %g: %.1f s, val clean %.3f, robust %s",
                weight,
                time.perf_counter() - start,
                acc["clean"],
                rows[-1][2],
            )
    head = " | ".join(f"{r:g}" for r in a.radii)
    lines = [
        f"| {args.method} IGA weight | val clean | {head} |",
        "|" + "---|" * (2 + len(a.radii)),
    ]
    lines += [
        f"| {w:g} | {c:.3f} | " + " | ".join(f"{v:.3f}" for v in rob) + " |" for w, c, rob in rows
    ]
    print("\n".join(lines))


def check_weights(weights: list[float]) -> None:
    """Refuse IGA weights that are not finite numbers >= 0, or given twice (each trains a
    student: a repeat trains the same one again)."""
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise ParamError("--weights", w, "each weight must be a finite number >= 0")
    repeated = sorted({w for w in weights if weights.count(w) > 1})
    if repeated:
        raise ParamError(
            "--weights",
            repeated[0],
            f"it is given {weights.count(repeated[0])} times: list each weight once",
        )


def main(argv: list[str] | None = None) -> int:
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--method", default="kdiga", help="an IGA method (kdiga, kdiga_ardc, ...)")
        ap.add_argument("--weights", type=float, nargs="+", required=True)
        ap.add_argument("--student", default=None, help="default: the first of students")
        ap.add_argument("--teacher", default=None, help="default: the first of teachers")

    return run("tune", "Tune the IGA weight on the validation split.", body, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
