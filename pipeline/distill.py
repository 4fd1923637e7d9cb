"""Stage distill: one student trained with one method (st, kd, ard, kdiga, kdiga_ardc,
kdiga_arda) from the teacher; resumable from its last epoch; per-epoch metrics for plots.

With ``signals.enabled``, kd, ard, kdiga and kdiga_ardc students train from the teacher's
cached signals (stage signals): each epoch a sample gets one of its K stored views, and the
teacher is never run.

One run over several GPUs or nodes: ``torchrun --nproc_per_node=N -m pipeline.distill
--model <id>``. ``distill.batch_size`` is then the global batch (divisible by N); every rank
trains on its slice through DistributedDataParallel and rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time

from pipeline import dag
from pipeline.common import (
    begin,
    checkpoint_path,
    data_info,
    device,
    load_split,
    load_stage_model,
    log,
    run,
    train_config,
    write_json,
    write_timing,
)
from pipeline.params import parse_student_id
from pipeline.provenance import seal


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


def _signal_cache(params: dict, x, y, teacher_sha: str, dev: str):
    """The cached teacher signals as fit's batch_source, checked against this teacher and
    these images (a file made for another teacher or other data is refused)."""
    from kdiga.signals import SignalCache, SignalMismatchError, load_signals

    sig = params["signals"]
    signal_set = load_signals(dag.SIGNALS, teacher_sha256=teacher_sha, n=y.numel())
    meta = signal_set.meta
    want = {
        "views": sig["views"],
        "grad_dtype": sig["grad_dtype"],
        "augment": params["distill"]["augment"],
        "crop_padding": params["distill"]["crop_padding"],
        "seed": params["seed"],
    }
    differ = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if differ:
        raise SignalMismatchError(
            f"{dag.SIGNALS} was computed with other settings (file vs params: {differ}); "
            "re-run the signals stage"
        )
    log.info("training from cached teacher signals: %d views (%s)", sig["views"], dag.SIGNALS)
    return SignalCache(signal_set, x, y, seed=params["seed"], schedule=sig["schedule"],
                       device=dev)  # fmt: skip


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
    from kdiga.models import build_model, save_model
    from kdiga.train import evaluate, fit
    from kdiga.utils import sha256_file

    student, method = parse_student_id(params, model_id)
    provenance = begin(params, "distill", model_id)
    d = params["distill"]
    x, y, manifest = load_split("train")
    val = load_split("val")[:2]
    model = build_model(student, **data_info(manifest), **d["student_kwargs"])
    criterion = build_loss(method, **loss_settings(method, d))
    cfg = train_config(d, params["seed"])
    teacher, cached = None, dag.uses_signals(params, method)
    if method not in dag.TEACHERLESS:
        teacher_sha = sha256_file(dag.model_path("teacher"))
        if not cached:
            teacher = load_stage_model(params, "teacher")[0]
    # Resumable state is keyed by everything that makes the model (params, input hashes,
    # code): never resume another run's, and deleted once the model is written.
    ckpt = checkpoint_path("distill", model_id, provenance)
    with _device(info) as dev:
        extra = {}
        if cached:
            extra["batch_source"] = _signal_cache(params, x, y, teacher_sha, dev)
            cfg = dataclasses.replace(cfg, augment="none")  # the cache holds the views
        start = time.perf_counter()
        history = fit(model, criterion, x, y, cfg, teacher=teacher, checkpoint_path=ckpt,
                      device=dev, val=val, **extra)  # fmt: skip
        seconds = time.perf_counter() - start
        # fit measured it after the last epoch; a run of 0 epochs has no history
        val_acc = history[-1]["val_acc"] if history else evaluate(model, *val, device=dev)
    if not is_main():
        return
    model.cpu()
    epoch_s = [r.pop("time_s", None) for r in history]  # wall clock: not in hashed outputs
    write_timing("distill", model_id, seconds=seconds, epoch_s=epoch_s)
    meta = {"model_id": model_id, "student": student, "method": method, "val_acc": val_acc}
    if cached:
        meta["teacher_signals"] = {k: params["signals"][k] for k in ("views", "grad_dtype")}
    write_json(history, dag.history_path(model_id))
    meta["provenance"] = seal(provenance, [dag.history_path(model_id)])
    save_model(model, dag.model_path(model_id), meta=meta)  # last: its record marks the job done
    ckpt.unlink(missing_ok=True)
    log.info("%s: val accuracy %.4f after %d epochs (%.1f s)", model_id, val_acc, cfg.epochs,
             seconds)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--model", required=True, help="student id <student>--<method>")

    return run("distill", "Distill one student with one method.", body, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
