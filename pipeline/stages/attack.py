"""Stage attack: one model under one attack (PGD-k or AutoAttack) over the increasing radii.

A point broken at a smaller radius counts as broken at every larger one and is not attacked
again (kdiga.attacks.robust_sweep). Progress is saved after each batch, so a killed job
resumes. The result carries its own sanity checks; a failed check marks it suspect.
"""

from __future__ import annotations

import argparse
import time

from kdiga.attacks import check_gradients, check_sweep, robust_sweep
from kdiga.data import to_float
from kdiga.files import sha256_file
from pipeline import dag
from pipeline.params import AutoAttackSettings, ParamError, model_ids, radius_label
from pipeline.stages.common import (
    begin,
    checkpoint_path,
    device,
    load_split,
    load_stage_model,
    log,
    run,
    write_json,
    write_timing,
)


def autoattack_settings(aa: AutoAttackSettings) -> dict:
    """kdiga.attacks.autoattack arguments: the attack list only for the custom version,
    and only the overrides that are set (null keeps AutoAttack's own value)."""
    out: dict = {"version": aa.version}
    if aa.version == "custom":
        out["attacks"] = list(aa.attacks)
    for k in ("n_restarts", "n_iter", "n_target_classes"):
        if getattr(aa, k) is not None:
            out[k] = getattr(aa, k)
    return out


def body(args: argparse.Namespace, params: dict) -> None:
    if args.model not in model_ids(params):
        raise ParamError("--model", args.model, f"known: {', '.join(model_ids(params))}")
    a = params.attack
    if args.attack not in a.attacks:
        raise ParamError("--attack", args.attack, f"attack.attacks lists {a.attacks}")
    provenance = begin(params, "attack", f"{args.model}--{args.attack}")
    model, _ = load_stage_model(params, args.model)
    images, labels, _ = load_split(a.split)
    x = to_float(images)
    kw: dict = {"norm": a.norm, "batch_size": a.batch_size, "seed": params.shard.seed}
    if args.attack == "pgd":
        kw |= {k: getattr(a.pgd, k) for k in ("steps", "restarts", "step_size")}
        kw["compile_model"] = a.compile
    else:
        kw["autoattack_kwargs"] = autoattack_settings(a.autoattack)
    model_sha = sha256_file(dag.model_path(args.model))
    state = checkpoint_path("attack", f"{args.model}--{args.attack}", provenance)
    with device() as dev:
        model.to(dev).eval()
        start = time.perf_counter()
        result = robust_sweep(
            model,
            x,
            labels,
            a.radii,
            attack=args.attack,
            device=dev,
            state_path=state,
            progress=args.progress,
            **kw,
        )
        seconds = time.perf_counter() - start
        probe = x[: min(len(x), a.batch_size)].to(dev), labels[: min(len(x), a.batch_size)]
        gradient_problems = check_gradients(model, probe[0], probe[1].to(dev))
    problems = check_sweep(result) + gradient_problems
    if model.training:
        problems.append("model was in train mode during evaluation")
    out = result.to_dict() | {
        "model": args.model,
        "radius_labels": [radius_label(r) for r in result.radii],
        "settings": kw,
        "problems": problems,
        "suspect": bool(problems or result.flags),
        "model_sha256": model_sha,
        "provenance": provenance,
    }
    write_timing("attack", f"{args.model}--{args.attack}", seconds=seconds)
    write_json(out, dag.eval_path(args.model, args.attack))
    state.unlink(missing_ok=True)
    robust = ", ".join(
        f"{radius_label(r)}: {v:.3f}" for r, v in zip(result.radii, out["robust"], strict=True)
    )
    log.info("%s %s: clean %.3f; robust %s", args.model, args.attack, out["clean"], robust)
    if out["suspect"]:
        log.warning("%s %s is suspect: %s", args.model, args.attack, problems + result.flags)


def main(argv: list[str] | None = None) -> int:
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--model", required=True, help="a teacher's name or a student id")
        ap.add_argument("--attack", required=True, help="pgd or autoattack")

    return run("attack", "Evaluate one model under one attack over every radius.", body, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
