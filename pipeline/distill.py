"""Stage distill: one student trained with one method (st, kd, ard, kdiga, kdiga_ardc,
kdiga_arda) from the teacher; resumable from its last epoch; per-epoch metrics for plots.

One run over several GPUs or nodes: ``torchrun --nproc_per_node=N -m pipeline.distill
--model <id>``. ``distill.batch_size`` is then the global batch (divisible by N); every rank
trains on its slice through DistributedDataParallel and rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from pipeline import dag
from pipeline.common import (
    checkpoint_path,
    data_info,
    device,
    load_split,
    log,
    run,
    train_config,
    write_json,
)
from pipeline.params import parse_student_id


def loss_settings(method: str, d: dict) -> dict:
    """The kdiga.losses settings of ``method`` from the distill section."""
    cfg: dict = {}
    if method != "st":
        cfg |= {
            "ce_weight": d["ce_weight"],
            "kl_weight": d["kl_weight"],
            "temperature": d["temperature"],
        }
    if method in dag.IGA:
        iga = d["iga"]
        cfg |= {
            "iga_weight": iga["weight"],
            "iga_reduction": iga["reduction"],
            "student_grad_mode": iga["grad_mode"],
        }
    if method in dag.ADVERSARIAL:
        adv = d["adversarial"]
        cfg |= {"eps": adv["eps"], "steps": adv["steps"], "step_size": adv["step_size"]}
    return cfg


def _device(info) -> contextlib.AbstractContextManager[str]:
    """Under torchrun each rank uses its local GPU (or the CPU); else a GPU slot or the CPU."""
    if not info.is_distributed:
        return device()
    import torch

    dev = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    return contextlib.nullcontext(dev)


def body(args: argparse.Namespace, params: dict) -> None:
    from kdiga.distributed import barrier, init_from_env, shutdown

    info = init_from_env()  # a no-op unless launched by torchrun
    try:
        distill(args.model, params, info)
        barrier()
    finally:
        shutdown()


def distill(model_id: str, params: dict, info) -> None:
    from kdiga.distributed import is_main
    from kdiga.losses import build_loss
    from kdiga.models import build_model, load_model, save_model
    from kdiga.train import evaluate, fit
    from kdiga.utils import sha256_file

    student, method = parse_student_id(params, model_id)
    d = params["distill"]
    x, y, manifest = load_split("train")
    val = load_split("val")[:2]
    teacher = None if method in dag.TEACHERLESS else load_model(dag.model_path("teacher"))[0]
    model = build_model(student, **data_info(manifest), **d["student_kwargs"])
    criterion = build_loss(method, **loss_settings(method, d))
    cfg = train_config(d, params["seed"])
    # Resumable state is keyed by everything that made it: never resume another run's.
    identity = [model_id, dag.params_view(params, dag.distill_param_keys(method)), params["shard"]]
    if teacher is not None:
        identity.append(sha256_file(dag.model_path("teacher")))
    ckpt = checkpoint_path("distill", model_id, *identity)
    with _device(info) as dev:
        start = time.perf_counter()
        history = fit(model, criterion, x, y, cfg, teacher=teacher, checkpoint_path=ckpt,
                      device=dev, val=val,
                      on_epoch=lambda r: log.info("%s epoch %s", model_id, r))  # fmt: skip
        seconds = time.perf_counter() - start
        # fit measured it after the last epoch; a run of 0 epochs has no history
        val_acc = history[-1]["val_acc"] if history else evaluate(model, *val, device=dev)
    if not is_main():
        return
    model.cpu()
    meta = {"student": student, "method": method, "val_acc": val_acc}
    save_model(model, dag.model_path(model_id), meta=meta)
    write_json(history, dag.history_path(model_id))
    log.info("%s: val accuracy %.4f after %d epochs (%.1f s)", model_id, val_acc, cfg.epochs,
             seconds)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--model", required=True, help="student id <student>--<method>")

    return run("distill", "Distill one student with one method.", body, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
