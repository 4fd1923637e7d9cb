"""What every stage shares: CLI and logging set-up, clear errors, device choice, shard I/O."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from kdiga.errors import KdigaError
from kdiga.files import atomic_write_text
from kdiga.models import CheckpointError, load_model
from kdiga.shards import load_sharded, read_manifest
from kdiga.stream import ShardBatches, load_image_split
from kdiga.train import TrainConfig
from kdiga.utils import gpu_name, machine_info, seed_everything
from pipeline import dag, paths, progress
from pipeline.gpu import check_cuda, gpu_slot
from pipeline.params import (
    ParamError,
    Study,
    check_paths,
    load_params,
    params_file,
    parse_student_id,
)
from pipeline.provenance import REUSE_ENV, JobIsCurrent, open_job
from pipeline.runners import RUNNER_ENV, SNAKEMAKE, refuse_if_snakemake_runs

log = logging.getLogger("kdiga.pipeline")

SPLITS = ("train", "val", "test")


def parser(stage: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m pipeline.stages {stage}", description=description)
    ap.add_argument(
        "--params", default=None, help="the params file (default: $KDIGA_PARAMS or params.yaml)"
    )
    ap.add_argument("--log", default=None, help="also write the log to this file")
    return ap


#: set by a stage that runs itself again as a torchrun job (pipeline.launch): its workers'
#: rank 0 adds to the log file it started rather than truncating it
LOG_APPEND_ENV = "KDIGA_LOG_APPEND"


LOG_LEVEL_ENV = "KDIGA_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _setup_logging(log_file: str | None) -> ParamError | None:
    """Log to stderr and to ``log_file``. Under torchrun (``RANK`` set) only rank 0 writes the
    file, and every line names its rank; the file is opened for appending, so a launcher's
    lines and its workers' never overwrite each other.

    A bad ``$KDIGA_LOG_LEVEL`` or a ``log_file`` that cannot be written is returned, not
    raised: logging then goes to stderr at INFO, and :func:`run` reports it in one line."""
    rank = os.environ.get("RANK")
    problem = None
    level = os.environ.get(LOG_LEVEL_ENV, "INFO")
    if level.strip().upper() not in LOG_LEVELS:
        problem = ParamError(LOG_LEVEL_ENV, level, f"allowed: {', '.join(LOG_LEVELS)} (any case)")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file and rank in (None, "0"):
        try:
            handlers.append(_log_file(log_file))
        except ParamError as err:
            problem = problem or err
    where = "" if rank is None else f"[rank {rank}] "
    logging.basicConfig(
        level=logging.INFO if problem else level.strip().upper(),
        format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    return problem


def _log_file(log_file: str) -> logging.Handler:
    """A handler appending to ``log_file`` (emptied first, unless a launcher started it)."""
    path = Path(log_file)
    if path.is_dir():
        raise ParamError("--log", log_file, "it is a directory: give a file, e.g. logs/x.log")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.environ.get(LOG_APPEND_ENV):
            path.write_bytes(b"")
        return logging.FileHandler(path, mode="a")
    except OSError as err:
        raise ParamError(
            "--log",
            log_file,
            f"the log cannot be written there ({err.strerror or err}): give "
            "a file in a directory this job can write",
        ) from None


#: what an interrupted job of each stage keeps for the next run of it
RESUMES = {
    "teacher": "its training checkpoint (the last finished epoch, or checkpoint_every step) "
    "is kept: run the job again to resume from it",
    "distill": "its training checkpoint (the last finished epoch, or checkpoint_every step) "
    "is kept: run the job again to resume from it",
    "attack": "the batches it finished are kept: run the job again to resume after them",
}


def _interrupted(stage: str, job: progress.JobProgress) -> str:
    """One line saying where an interrupted job stopped and what its next run resumes."""
    latest = job.latest
    if latest is None:
        at = "before it started its work"
    else:
        e = latest.event
        at = f"at {e.detail or f'{e.task} {e.done}/{e.total} {e.unit}'}"
    return f"{stage} interrupted {at}; {RESUMES.get(stage, 'run the job again to redo it')}"


def _interruptible() -> None:
    """SIGINT raises KeyboardInterrupt, as in a plain ``python`` process, also where the job
    was started with SIGINT at its default action (a pipeline.forkserver child), which would
    end the job without a line and keep nothing for the progress file; an ignored SIGINT
    (a background job of a shell) stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _job_warnings(params: Study, stage: str, args: argparse.Namespace) -> list:
    """The params warnings about this job: its stage's, and of those about one teacher,
    student or attack only this job's."""
    names = {getattr(args, "teacher", None), getattr(args, "attack", None)}
    if stage == "distill":
        with contextlib.suppress(ParamError):  # a bad --model is the stage's to report
            names.add(parse_student_id(params, args.model).student)
    return [w for w in params.warnings if w.stage == stage and (w.name is None or w.name in names)]


class MissingInputError(KdigaError, FileNotFoundError):
    """A file a stage reads is not there (its stage has not run)."""


def run(
    stage: str,
    description: str,
    body: Callable[[argparse.Namespace, Study], None],
    argv: list[str] | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse the CLI, validate params, run ``body(args, params)``. A bad input, or a missing,
    stale or corrupt file, exits 2 with one logged line naming what is wrong (set
    KDIGA_DEBUG=1 for its traceback); any other error keeps its traceback.

    ``args.progress`` is the job's progress callback for kdiga's long loops
    (:class:`pipeline.progress.JobProgress`): shown as ``$KDIGA_PROGRESS`` says and kept in a
    progress file beside the ``--log`` file, whose state ends done, or failed with the
    error's first line."""
    ap = parser(stage, description)
    if add_args:
        add_args(ap)
    args = ap.parse_args(argv)
    _interruptible()
    problem = _setup_logging(args.log)
    log_ok = problem is None or problem.key != "--log"
    args.progress = job = progress.start_job(stage, args.log if log_ok else None)
    try:
        if problem:
            raise problem
        params = _prepare_job(stage, args)
        body(args, params)
    except JobIsCurrent as done:
        log.info("%s", done)
    except KdigaError as err:  # a user's mistake or a bad file: one line
        job.close(err)
        if os.environ.get("KDIGA_DEBUG"):
            raise
        log.error("%s failed: %s", stage, err)
        return 2
    except KeyboardInterrupt as err:  # SIGINT: one line, and the shell's code for it
        job.close(err)
        if os.environ.get("KDIGA_DEBUG"):
            raise
        log.error("%s", _interrupted(stage, job))
        return 130
    except SystemExit as err:
        job.close(None if err.code in (0, None) else err)
        raise
    except BaseException as err:  # a bug: recorded, then raised as it was
        job.close(err)
        raise
    job.close()
    return 0


def _prepare_job(stage: str, args: argparse.Namespace) -> Study:
    """The job's params, loaded and checked (with its warnings logged), once it is known not to
    run beside a Snakemake run; CPU threads and seeds set."""
    path = args.params or params_file()
    params = load_params(path)
    for warning in _job_warnings(params, stage, args):
        log.warning("%s", warning)
    refuse_if_snakemake_runs()  # DVC or a hand run beside a Snakemake run of the study
    check_paths(params, (stage,))

    set_cpu_threads()  # the same bytes whichever tool runs the job
    seed_everything(params.shard.seed)  # any draw a stage makes: same seed, same run
    # A job run by hand: say when dvc.yaml no longer describes the params (DVC's own
    # first stage refuses then; a Snakemake run reads no dvc.yaml, and its end-of-run
    # sync checks it before recording anything)
    by_hand = os.environ.get(RUNNER_ENV) != SNAKEMAKE
    described = path == "params.yaml" and Path("dvc.yaml").exists()
    if by_hand and described and (stale := dag.check_fresh(path)):
        log.warning("%s", stale)
    return params


THREADS_ENV = "KDIGA_THREADS"


def set_cpu_threads() -> int:
    """Run torch's CPU kernels on ``$KDIGA_THREADS`` threads (default 1), whoever starts the
    job. CPU results depend on the thread count (a reduction split over two threads adds in
    another order), and Snakemake sets OMP_NUM_THREADS to a job's ``threads`` while DVC
    leaves it alone: pinning it here makes the two tools write the same bytes. Snakemake
    still fills every core, with jobs side by side."""
    raw = os.environ.get(THREADS_ENV, "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 1024:
        raise ParamError(THREADS_ENV, raw, "expected a number of CPU threads from 1 to 1024")
    torch.set_num_threads(int(raw))
    return int(raw)


@contextlib.contextmanager
def device() -> Iterator[str]:
    """A device for this job: its own GPU when there are any (a slot from pipeline.gpu), else
    the CPU. Held for the whole job."""
    with gpu_slot() as slot:
        if slot is None:
            yield "cpu"
        else:
            check_cuda([slot])  # KDIGA_GPU_SLOTS names a GPU: refuse one CUDA cannot see
            log.info("running on GPU %s", slot)
            if "record" in _RECORD:
                _RECORD["record"]["machine"]["gpu"] = gpu_name("cuda")
            yield "cuda"


# -- shards -------------------------------------------------------------------------------


def manifest_path(split: str) -> Path:
    return Path(dag.SHARDS) / f"{split}.json"


def load_split(split: str) -> tuple[Any, Any, dict]:
    """A split from the shard stage: uint8 images [N, C, H, W], labels [N], its manifest.

    Image shards (ImageNet) are decoded with the evaluation view (resize, center crop); the
    training split of those streams instead (:func:`train_data`)."""
    path = manifest_path(split)
    if not path.exists():
        raise MissingInputError(f"{path} is missing: run the shard stage first")
    if read_manifest(path).get("encoding") == "image":
        return load_image_split(path)
    return load_sharded(path)


def train_data(params: Any, cfg: Any) -> tuple[dict, Any, dict]:
    """The training split as :func:`kdiga.train.fit` takes it: ``(data, cfg, manifest)``.

    ``data`` is ``{"images", "labels"}`` in memory, or for image shards ``{"images": None,
    "labels": None, "stream": kdiga.stream.ShardBatches}`` with ``cfg.augment`` set to "none"
    (the loader's RandomResizedCrop and flip are the augmentation; ``augment`` and
    ``crop_padding`` apply to in-memory data)."""
    path = manifest_path("train")
    if not path.exists():
        raise MissingInputError(f"{path} is missing: run the shard stage first")
    manifest = read_manifest(path)
    if manifest.get("encoding") != "image":
        x, y, manifest = load_split("train")
        return {"images": x, "labels": y}, cfg, manifest

    s = params.shard
    stream = ShardBatches(
        path,
        batch_size=cfg.batch_size,
        image_size=int(manifest["image_size"]),
        workers=s.workers,
        seed=cfg.seed,
        shuffle_buffer=s.shuffle_buffer,
    )
    cfg = dataclasses.replace(cfg, augment="none")
    return {"images": None, "labels": None, "stream": stream}, cfg, manifest


def data_info(manifest: dict) -> dict:
    """num_classes, in_chans and image_size of the study's data, from a split's manifest."""
    return {
        "num_classes": int(manifest["num_classes"]),
        "in_chans": int(manifest["channels"]),
        "image_size": int(manifest["image_size"]),
    }


def train_config(section: Any, seed: int):
    """kdiga.train.TrainConfig from training settings: a teacher's ``train`` section, or a
    student's (:meth:`pipeline.params.Study.train_settings`, a mapping)."""
    get = section.get if isinstance(section, dict) else lambda k: getattr(section, k)
    keys = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "augment", "crop_padding")
    return TrainConfig(
        **{k: get(k) for k in keys},
        milestones=tuple(get("milestones")),
        checkpoint_every=get("checkpoint_every"),
        seed=seed,
        drop_last=True,  # train-mode BatchNorm fails on a last batch of one
    )


# -- small I/O ----------------------------------------------------------------------------


def write_json(obj: Any, path: str | Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path} is missing: run the stage that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MissingInputError(
            f"{path} is not valid JSON ({err}); delete it and re-run the stage that writes it"
        ) from None


def write_timing(stage: str, key: str | None, **figures: Any) -> None:
    """Wall-clock figures of this job, beside its log: never in an output DVC hashes."""
    write_json(figures, paths.timing_path(stage, key))


#: the provenance record of this process's job (one job a process): :func:`device` adds the
#: GPU it picks to its machine
_RECORD: dict[str, Any] = {}


def begin(params: Study, stage: str, key: str | None = None) -> dict:
    """Check that every artifact this job reads is current (else raise ProvenanceError
    naming both hashes), and return the provenance record its outputs will carry, with the
    machine that makes them (a record, not an input: nothing is stale because it changed).
    With :data:`REUSE_ENV` set, a job whose outputs are current raises
    :class:`~pipeline.provenance.JobIsCurrent` instead (:func:`pipeline.provenance.open_job`)."""
    reuse = os.environ.get(REUSE_ENV) == "1"
    record = open_job(params, stage, key, reuse=reuse) | {"machine": machine_info()}
    _RECORD.clear()
    _RECORD["record"] = record
    return record


def load_stage_model(params: Study, model_id: str):
    """A model of the study (a teacher's name or a student id), refused if its tensors are
    not those its job wrote, if its header holds another model than the study declares
    (architecture, options, classes, input shape), or if it was written for another model id."""
    path = dag.model_path(model_id)
    if model_id in params.teachers:
        t = params.teachers[model_id]
        arch = t.arch if t.arch is not None else t.source  # a timm: teacher: the source's model
        kwargs = t.arch_kwargs
    else:
        s = params.students[parse_student_id(params, model_id).student]
        arch, kwargs = s.arch, s.kwargs
    if not Path(path).exists():
        raise MissingInputError(f"{path} is missing: run the job that writes it first")
    model, meta = load_model(path, arch=arch, expect={"kwargs": kwargs, **params.data})
    made_for = meta.get("model_id")
    if made_for is not None and made_for != model_id:
        raise CheckpointError(
            f"{path} was written for model {made_for!r}, not {model_id!r}: delete it and "
            "re-run the job that writes it"
        )
    return model, meta


def config_hash(*objs: Any) -> str:
    """A short hash of JSON-able values: names resumable state so a params change never
    resumes a checkpoint made for other params."""
    text = json.dumps(objs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: what makes a job's outputs, in its provenance record: a resume checkpoint carries it and
#: is resumed only by the run it was made for (kdiga.train.fit's checkpoint_record)
RUN_KEYS = ("job", "params", "inputs", "code")


def run_record(provenance: dict) -> dict:
    """The part of a job's provenance record that says which run it is (:data:`RUN_KEYS`)."""
    return {k: provenance[k] for k in RUN_KEYS if k in provenance}


def checkpoint_path(kind: str, key: str, provenance: dict) -> Path:
    """Where job ``key`` of stage ``kind`` keeps its resumable state: named by the job's
    :func:`run_record`, not by the machine in its provenance (a run resumed on another GPU
    or thread count finds its checkpoint; the checkpoint's own record is checked on resume)."""
    return paths.checkpoint_dir() / kind / f"{key}-{config_hash(run_record(provenance))}.pt"
