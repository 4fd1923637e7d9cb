"""Choose a distillation setting on the validation split, never the test split.

    python -m pipeline.tune --method kdiga --weights 0.3 1 3 10

trains one student per IGA weight with the study's params (the teacher and shards must
exist: run the study or its shard and teacher stages first) and prints clean and PGD
robust accuracy on the validation split at each attack radius. It writes nothing but its
log; put the chosen weight in params.yaml.
"""

from __future__ import annotations

import argparse
import copy
import time

from pipeline import dag
from pipeline.common import data_info, device, load_split, load_stage_model, log, run, train_config
from pipeline.params import ParamError


def body(args: argparse.Namespace, params: dict) -> None:
    import torch

    from kdiga.attacks import robust_sweep
    from kdiga.data import to_float
    from kdiga.losses import build_loss
    from kdiga.models import build_model
    from kdiga.train import fit
    from pipeline.distill import loss_settings

    if args.method not in dag.IGA:
        raise ParamError("--method", args.method, f"tuning the IGA weight needs one of {dag.IGA}")
    student = args.student or params["distill"]["students"][0]
    x, y, manifest = load_split("train")
    vx, vy, _ = load_split("val")
    teacher = load_stage_model(params, "teacher")[0]
    a = params["attack"]
    rows = []
    with device() as dev:
        for weight in args.weights:
            d = copy.deepcopy(params["distill"])
            d["iga"]["weight"] = weight
            torch.manual_seed(params["seed"])
            model = build_model(student, **data_info(manifest), **d["student_kwargs"])
            cfg = train_config(d, params["seed"])
            start = time.perf_counter()
            fit(model, build_loss(args.method, **loss_settings(args.method, d)), x, y, cfg,
                teacher=teacher, device=dev)  # fmt: skip
            sweep = robust_sweep(model.eval(), to_float(vx), vy, a["radii"], attack="pgd",
                                 norm=a["norm"], batch_size=a["batch_size"], seed=params["seed"],
                                 device=dev, **{k: a["pgd"][k] for k in ("steps", "restarts",
                                                                         "step_size")})  # fmt: skip
            acc = sweep.accuracy()
            rows.append((weight, acc["clean"], [acc["robust"][r] for r in sweep.radii]))
            log.info("weight %g: %.1f s, val clean %.3f, robust %s", weight,
                     time.perf_counter() - start, acc["clean"], rows[-1][2])  # fmt: skip
    head = " | ".join(f"{r:g}" for r in a["radii"])
    lines = [f"| {args.method} IGA weight | val clean | {head} |",
             "|" + "---|" * (2 + len(a["radii"]))]  # fmt: skip
    lines += [f"| {w:g} | {c:.3f} | " + " | ".join(f"{v:.3f}" for v in rob) + " |"
              for w, c, rob in rows]  # fmt: skip
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--method", default="kdiga", help="an IGA method (kdiga, kdiga_ardc, ...)")
        ap.add_argument("--weights", type=float, nargs="+", required=True)
        ap.add_argument("--student", default=None, help="default: the first of distill.students")

    return run("tune", "Tune the IGA weight on the validation split.", body, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
