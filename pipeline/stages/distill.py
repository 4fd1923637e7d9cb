"""Stage distill: one student of the grid, (teacher, method, student, seed), trained from its
init (scratch, pretrained weights or a checkpoint); resumable from its last epoch; per-epoch
metrics for plots.
``python -m pipeline.stages distill --model <teacher>--<method>--<student>--s<seed>``.

The method's loss, its settings and whether it needs the teacher come from the method table
(``kdiga.methods``). With ``signals.enabled``, students of methods that take the teacher only
at the clean input train from that teacher's cached signals (stage signals): each epoch a
sample gets one of its K stored views, and the teacher is never run.

One run over several GPUs: ``distill.gpus_per_job: N`` (> 1). The job then holds N GPUs of the
slot pool at once and runs its own command again as a torchrun job of N workers in them
(:mod:`pipeline.launch`); Snakemake counts its N GPUs (``resources: gpu=N``). Over several
nodes: ``python -m pipeline.launch <id> --nnodes M`` prints a SLURM batch script (torchrun
under ``srun``, c10d rendezvous). A run started by torchrun directly (``torchrun
--nproc-per-node=N -m pipeline.stages.distill -- --model <id> --log <file>``; the ``--`` keeps
torchrun from reading ``--log`` as its own ``--log-dir``) trains as it is. The batch size is the
global batch (divisible by the number of workers); every rank trains on its slice through
DistributedDataParallel and rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable

import torch

from kdiga.distributed import barrier, check_run, init_from_env, is_main, shutdown
from kdiga.files import sha256_file
from kdiga.methods import get_method
from kdiga.models import CheckpointError, build_model, save_model
from kdiga.shards import read_manifest
from kdiga.signals import SignalCache, SignalMismatchError, load_signals
from kdiga.teachers import load_teacher
from kdiga.train import evaluate, fit
from kdiga.utils import seed_everything
from pipeline import dag, launch
from pipeline.params import ParamError, StudentJob, Study, check_train_shards, parse_student_id
from pipeline.provenance import seal
from pipeline.stages.common import (
    begin,
    checkpoint_path,
    data_info,
    device,
    load_split,
    load_stage_model,
    log,
    manifest_path,
    run,
    run_record,
    train_config,
    train_data,
    write_json,
    write_timing,
)


def _device(info) -> contextlib.AbstractContextManager[str]:
    """Under torchrun each rank uses its local GPU (or the CPU); else a GPU slot or the CPU."""
    if not info.is_distributed:
        return device()

    dev = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    return contextlib.nullcontext(dev)


def _signal_cache(params: Study, job: StudentJob, x, y, teacher_sha: str, dev: str):
    """The teacher's cached signals as fit's batch_source, checked against this teacher and
    these images (a file made for another teacher or other data is refused)."""
    sig, path = params.signals, dag.signals_path(job.teacher)
    signal_set = load_signals(path, teacher_sha256=teacher_sha, n=y.numel())
    meta = signal_set.meta
    want = {
        "views": sig.views,
        "grad_dtype": sig.grad_dtype,
        "augment": params.distill.augment,
        "crop_padding": params.distill.crop_padding,
        "seed": params.shard.seed,
    }
    differ = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if differ:
        raise SignalMismatchError(
            f"{path} was computed with other settings (file vs params: {differ}); "
            "re-run its signals stage"
        )
    log.info("training from cached teacher signals: %d views (%s)", sig.views, path)
    return SignalCache(signal_set, x, y, seed=job.seed, schedule=sig.schedule, device=dev)


def build_student(params: Study, job: StudentJob, info: dict):
    """The student before training: built from scratch, with pretrained timm/torchvision
    weights (offline: a clear error naming the model), or from a checkpoint file."""
    s = params.students[job.student]
    if s.init == "scratch":
        return build_model(s.arch, **info, **s.kwargs)
    if s.init == "pretrained":
        try:
            return build_model(s.arch, pretrained=True, **info, **s.kwargs)
        except RuntimeError as err:  # no network, or no such weights
            raise CheckpointError(
                f"students.{job.student}: pretrained weights for {s.arch} are not available "
                f"({' '.join(str(err).split())})"
            ) from None

    model, _ = load_teacher(
        s.init,
        arch=s.arch,
        sha256=s.sha256,
        model_kwargs=s.kwargs,
        sha256_key=f"students.{job.student}.sha256",
        **info,
    )
    return model.requires_grad_(True)  # loaded frozen, as a teacher: train it


def stage_argv(args: argparse.Namespace) -> list[str]:
    """This job's own arguments (``--model``, and ``--params`` and ``--log`` when given)."""
    argv = ["--model", args.model]
    argv += ["--params", args.params] if args.params else []
    return argv + (["--log", args.log] if args.log else [])


def check_world(params: Study, job: StudentJob, world: int) -> None:
    """Refuse, before any worker starts, a student that cannot be split over ``world`` ranks
    (:func:`kdiga.distributed.check_run`: a batch not divisible by it, a batch_frobenius IGA
    term, ...).

    Raises:
        ParamError: naming ``distill.gpus_per_job`` and what is wrong.
    """
    method = get_method(job.method)
    criterion = method.build_from(params.value("distill"))
    cfg = train_config(params.train_settings(job.student), job.seed)
    try:  # N = one batch: the final-batch rule is drop_last's, checked by fit itself
        check_run(
            cfg.batch_size,
            cfg.batch_size,
            cfg.drop_last,
            world,
            criterion,
            sync_bn=cfg.sync_bn,
            device=torch.device("cuda"),
        )
    except ValueError as err:
        raise ParamError("distill.gpus_per_job", world, f"for {job.id}: {err}") from None


def launch_ddp(args: argparse.Namespace, params: Study, gpus: int) -> bool:
    """Run this job again as a torchrun job on ``gpus`` held GPUs (:mod:`pipeline.launch`):
    True once it has succeeded, False (nothing run) without a GPU."""
    job = parse_student_id(params, args.model)
    check_world(params, job, gpus)
    begin(params, "distill", args.model)  # a stale input stops here once, not once per rank
    return launch.run_torchrun("pipeline.stages.distill", stage_argv(args), gpus)


def body(args: argparse.Namespace, params: Study) -> None:
    gpus = params.distill.gpus_per_job
    if gpus > 1 and not launch.under_torchrun():
        if launch_ddp(args, params, gpus):
            return
        log.warning(
            "distill.gpus_per_job is %d but there is no GPU: training in this one "
            "process, on the CPU",
            gpus,
        )
    info = init_from_env()  # a no-op unless launched by torchrun
    if info.is_distributed and info.world_size != gpus:
        log.warning(
            "%d workers train %s but distill.gpus_per_job is %d: set it to the "
            "number of workers, so that the model's record says how it was trained",
            info.world_size,
            args.model,
            gpus,
        )
    try:
        distill(args.model, params, info, args.progress)
        barrier()
    finally:
        shutdown()


def distill(model_id: str, params: Study, info, progress: Callable | None = None) -> None:
    job = parse_student_id(params, model_id)
    method = get_method(job.method)
    provenance = begin(params, "distill", model_id)
    cfg = train_config(params.train_settings(job.student), job.seed)
    cfg = dataclasses.replace(cfg, compile_teacher=params.distill.compile_teacher)
    if params.shard.streamed:  # before the loader, which would refuse it in a traceback
        check_train_shards(params, read_manifest(manifest_path("train")), info.world_size)
    data, cfg, manifest = train_data(params, cfg)
    val = load_split("val")[:2]
    seed_everything(job.seed)  # the student's seed: its init and every draw of its training
    model = build_student(params, job, data_info(manifest))
    criterion = method.build_from(params.value("distill"))
    teacher, cached = None, dag.uses_signals(params, job.method)
    if job.teacher is not None:
        teacher_sha = sha256_file(dag.model_path(job.teacher))
        if not cached:
            teacher = load_stage_model(params, job.teacher)[0]
    # Resumable state is keyed by everything that makes the model (params, input hashes,
    # code): never resume another run's, and deleted once the model is written.
    ckpt = checkpoint_path("distill", model_id, provenance)
    with _device(info) as dev:
        extra = {}
        if cached:
            x, y = data["images"], data["labels"]
            extra["batch_source"] = _signal_cache(params, job, x, y, teacher_sha, dev)
            cfg = dataclasses.replace(cfg, augment="none")  # the cache holds the views
        start = time.perf_counter()
        history = fit(
            model,
            criterion,
            cfg=cfg,
            teacher=teacher,
            checkpoint_path=ckpt,
            checkpoint_record=run_record(provenance),
            device=dev,
            val=val,
            progress=progress,
            **data,
            **extra,
        )
        seconds = time.perf_counter() - start
        # fit measured it after the last epoch; a run of 0 epochs has no history
        val_acc = history[-1]["val_acc"] if history else evaluate(model, *val, device=dev)
    if not is_main():
        return
    model.cpu()
    epoch_s = [r.pop("time_s", None) for r in history]  # wall clock: not in hashed outputs
    write_timing("distill", model_id, seconds=seconds, epoch_s=epoch_s)
    meta = {
        "model_id": model_id,
        "teacher": job.teacher,
        "method": job.method,
        "student": job.student,
        "seed": job.seed,
        "val_acc": val_acc,
    }
    if cached:
        meta["teacher_signals"] = {
            "views": params.signals.views,
            "grad_dtype": params.signals.grad_dtype,
        }
    write_json(history, dag.history_path(model_id))
    meta["provenance"] = seal(provenance, [dag.history_path(model_id)])
    save_model(model, dag.model_path(model_id), meta=meta)  # last: its record marks the job done
    ckpt.unlink(missing_ok=True)
    log.info(
        "%s: val accuracy %.4f after %d epochs (%.1f s)", model_id, val_acc, cfg.epochs, seconds
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # torchrun ... -m pipeline.stages.distill -- <args> (pipeline.launch)
        argv = argv[1:]

    def add(ap: argparse.ArgumentParser) -> None:
        ap.add_argument(
            "--model", required=True, help="student id <teacher>--<method>--<student>--s<seed>"
        )

    return run("distill", "Distill one student with one method.", body, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
