"""Provenance: every artifact records what it was made from; consumers check it.

A job's record (:func:`make_record`) holds the params it read (its ``dag.Job.params`` view),
the sha256 of every data input it read (a directory of shards: of its JSON manifests, which
hold each shard's sha256) and a digest of its code (``pipeline/stages/<stage>.py`` and ``kdiga/``,
the code DVC tracks for the stage). It is stored in the job's ``record`` output: a model's or
signal file's safetensors header, an evaluation's or the teacher's JSON, or a
``provenance.json`` (shards, report).

Two users:

- every stage, before it reads anything, checks that each upstream artifact is current
  (:func:`require_current_inputs`): made with today's params from the inputs that are on disk
  now. An evaluation of another model file, bounds of an older model, a report over mixed
  generations stop with a message naming both hashes and the job to re-run;
- the Snakemake-to-DVC hand-off (``python -m pipeline.sync``) records in ``dvc.lock`` only the
  jobs that are current, their code included, and whose upstream jobs are too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from kdiga.errors import KdigaError
from kdiga.files import read_meta, sha256_file
from pipeline import dag

#: the stages' logger (pipeline.stages.common): :func:`open_job`'s line goes to the job's log
log = logging.getLogger("kdiga.pipeline")

RECORD_KEY = "provenance"
_SHORT = 16  # hex digits of a sha256 shown in messages


class ProvenanceError(KdigaError, RuntimeError):
    """An input was made from other data or params than those on disk now."""


def _file_sha256(path: Path) -> str:
    st = path.stat()
    return _cached_sha256(str(path.resolve()), st.st_mtime_ns, st.st_size)


@cache
def _cached_sha256(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def digest(path: str | Path) -> str | None:
    """sha256 of a file; of a directory, over its JSON manifests (names and bytes); None if
    it does not exist."""
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(path.glob("*.json")):
        if f.name != "provenance.json":
            h.update(f"{f.name}\0{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def code_digest(stage: str, root: str | Path = ".") -> str:
    """sha256 over the stage's code (``dag.code_deps``: its script, the shared pipeline
    modules and every file under ``kdiga/``, bytecode caches left out): the code DVC lists
    as the stage's dependencies."""
    root = Path(root)
    files = []
    for dep in map(Path, dag.code_deps(stage)):
        tree = [root / dep] if not (root / dep).is_dir() else (root / dep).rglob("*")
        files += [f for f in tree if "__pycache__" not in f.parts and f.suffix != ".pyc"]
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
        if f.is_file():
            h.update(f"{f.relative_to(root).as_posix()}\0{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def make_record(params: dict, job: dag.Job) -> dict[str, Any]:
    """What ``job`` is made from right now: its params view, input hashes and code."""
    return {
        "job": job.name,
        "params": json.loads(dag.params_view(params, job.params)),
        "inputs": {dep: digest(dep) for dep in job.deps},
        "code": code_digest(job.stage),
    }


def seal(record: dict[str, Any], outputs: Iterable[str]) -> dict[str, Any]:
    """``record`` with the hashes of the job's other outputs, written before the record:
    a file replaced afterwards (or left over from an interrupted run) no longer passes."""
    return {**record, "outputs": {out: digest(out) for out in outputs}}


def read_record(job: dag.Job) -> dict[str, Any] | None:
    """The record stored in ``job.record``; None if the file has none (or is unreadable)."""
    path = Path(job.record)
    try:
        if path.name == "provenance.json":
            return json.loads(path.read_text())
        if path.suffix == ".json":
            return json.loads(path.read_text()).get(RECORD_KEY)
        meta = read_meta(path)
        return meta.get(RECORD_KEY) or (meta.get("meta") or {}).get(RECORD_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def _short(sha: str | None) -> str:
    return "nothing (missing)" if sha is None else sha[:_SHORT]


def problems(params: dict, job: dag.Job, *, code: bool = True) -> list[str]:
    """Why ``job``'s outputs are not what its current params, inputs (and code) make: empty
    when they are current."""
    if not Path(job.record).exists():
        return [f"{job.record} is missing"]
    rec = read_record(job)
    if not rec:
        return [f"{job.record} records no provenance (made by an older kdiga, or corrupt)"]
    if rec.get("job") != job.name:
        return [f"{job.record} was made by job {rec.get('job')!r}, not {job.name!r}"]
    missing = [o for o in job.outputs if not Path(o).exists()]
    if missing:
        return [f"{missing[0]} is missing"]
    out = _param_changes(params, job, rec)
    for path, old in (rec.get("outputs") or {}).items():
        new = digest(path)
        if old != new:
            return [
                f"{path} has sha256 {_short(new)}, not the {_short(old)} {job.record} "
                "records: it was replaced after the job ran"
            ]
    out += _input_changes(job, rec)
    if code and rec.get("code") != code_digest(job.stage):
        deps = ", ".join(dag.code_deps(job.stage))
        out.append(f"{job.record} was made by other code (changed since: one of {deps})")
    return out


def _param_changes(params: dict, job: dag.Job, rec: dict) -> list[str]:
    """The params keys of ``job`` whose current value differs from its record ``rec``'s, in
    key order."""
    out = []
    now = json.loads(dag.params_view(params, job.params))
    then = rec.get("params") or {}
    for key in sorted(set(now) | set(then)):
        if now.get(key) != then.get(key):
            out.append(
                f"{job.record} was made with params {key} = {json.dumps(then.get(key))}, "
                f"now {json.dumps(now.get(key))}"
            )
    return out


def _input_changes(job: dag.Job, rec: dict) -> list[str]:
    """The inputs of ``job`` whose sha256 differs from its record ``rec``'s (or that only one
    of them has), in path order."""
    out = []
    inputs = rec.get("inputs") or {}
    for dep in sorted(set(job.deps) | set(inputs)):
        old, new = inputs.get(dep), digest(dep) if dep in job.deps else None
        if old != new:
            out.append(
                f"{job.record} was made from {dep} with sha256 {_short(old)}, but {dep} now "
                f"has {_short(new)}"
            )
    return out


def producers(jobs: Iterable[dag.Job]) -> dict[str, dag.Job]:
    """Output path -> the job that writes it."""
    return {o: j for j in jobs for o in j.outputs}


def ancestors(params: dict, job: dag.Job) -> list[dag.Job]:
    """The jobs ``job`` depends on, directly or not, nearest first: each found from the path
    it writes (:func:`pipeline.dag.producer`), without building the study's other jobs."""
    seen: dict[str, dag.Job] = {}
    frontier = [job]
    while frontier:
        nxt = []
        for j in frontier:
            for dep in j.deps:
                up = dag.producer(params, dep)
                if up is not None and up.name not in seen:
                    seen[up.name] = up
                    nxt.append(up)
        frontier = nxt
    return list(seen.values())


def how_to_rerun(job: dag.Job) -> str:
    return f"re-run it (`snakemake {job.outs[0]}` or `dvc repro {job.name}`)"


def require_current_inputs(params: dict, job: dag.Job) -> None:
    """Raise :class:`ProvenanceError` if an artifact ``job`` reads, directly or through the
    artifacts it was made from, is not what the current params and files make.

    Code changes are not checked here (``pipeline.sync`` does, before DVC records a job):
    editing kdiga/ does not stop a Snakemake run, as Snakemake does not track it either.
    """
    for up in ancestors(params, job):
        if not all(Path(o).exists() for o in up.outs):
            continue  # the stage itself names the missing input
        found = problems(params, up, code=False)
        if found:
            raise ProvenanceError(f"{job.name}: stale input: {found[0]}; {how_to_rerun(up)}")


#: "1": a job whose outputs are already what it would make (its provenance: the same params,
#: the same input bytes, the same code) keeps them and ends at once, moving their mtimes
#: forward. The Snakefile sets it: Snakemake judges by mtimes and re-runs everything below a
#: job it re-runs, even when that job's outputs come back byte-identical. DVC, which compares
#: hashes, runs a job only when something changed (or when forced, to recompute).
REUSE_ENV = "KDIGA_REUSE_CURRENT"


class JobIsCurrent(Exception):
    """Raised by :func:`open_job` when the job's outputs are current and may be reused."""


def open_job(params: dict, stage: str, key: str | None = None, *, reuse: bool = False) -> dict:
    """What a stage does first: find its job, check that every artifact it reads is current
    (else :class:`ProvenanceError` naming both hashes), and return the record its outputs
    will carry (:func:`make_record`). With ``reuse``, a job whose outputs are already current
    (the same params, input bytes and code, and model files that still hold what it wrote:
    :func:`output_problem`) moves their mtimes forward and raises :class:`JobIsCurrent`."""
    job = current_job(params, stage, key)
    require_current_inputs(params, job)
    if reuse:
        stale = problems(params, job)
        if not stale and (why := output_problem(job)):
            stale = [why]
        if not stale:
            now = time.time()
            for out in job.outputs:
                os.utime(out, (now, now))
            raise JobIsCurrent(
                f"{job.name}: its outputs are current (made with these params, from these "
                f"inputs by this code: {', '.join(job.outputs)}); nothing to do"
            )
        log.info("%s: running (%s)", job.name, stale[0])
    return make_record(params, job)


def output_problem(job: dag.Job) -> str | None:
    """Why an output of ``job`` no longer holds what its job wrote: a model file whose
    tensors are not those its header records (edited after the job wrote it); None when
    none is. A record says what made the outputs, not whether they are still what was made.
    Reads the model files, so it imports torch: for a stage deciding whether to reuse its
    outputs and for ``sync --dvc``, never for :func:`freshness`, which stays torch-free."""
    # torch and safetensors: loaded only by the callers above, see the docstring
    from kdiga.models import CheckpointError  # noqa: PLC0415
    from kdiga.models.io import check_tensors, read_model_record  # noqa: PLC0415

    models = [o for o in job.outputs if o.startswith("data/models/") and o.endswith(".safetensors")]
    for path in filter(os.path.isfile, models):
        try:
            check_tensors(read_model_record(path), path)
        except CheckpointError as err:
            return str(err)
    return None


def current_job(params: dict, stage: str, key: str | None = None) -> dag.Job:
    """The DAG's job for ``stage`` (and ``key``) under ``params``, built from its key
    (:func:`pipeline.dag.job`), not by building every job of the study."""
    job = dag.job(params, stage, key)
    if job is None:
        raise ProvenanceError(f"no {stage} job {key!r} in the DAG of the current params")
    return job


def freshness(params: dict, *, code: bool = True) -> dict[str, list[str]]:
    """Job name -> why it is not current (empty list: current, and so is every job it
    depends on). In dependency order."""
    jobs = dag.jobs(params)
    made_by = producers(jobs)
    out: dict[str, list[str]] = {}
    for job in jobs:
        reasons = problems(params, job, code=code)
        ups = {made_by[d].name for d in job.deps if d in made_by}
        stale_up = sorted(name for name in ups if out.get(name))
        if stale_up and not reasons:
            reasons = [f"an input is not current: {', '.join(stale_up)}"]
        out[job.name] = reasons
    return out
