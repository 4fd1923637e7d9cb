# kdiga study: data -> shards -> teachers -> [cached teacher signals, when signals.enabled]
# -> distill (teacher x method x student x seed) -> attack (model x attack, a sweep over radii)
# -> local-linearity bounds -> report.
#
#   snakemake --cores all                      # the default study, on CPU
#   snakemake --cores all --resources gpu=4    # four GPU jobs at a time, one GPU each
#   snakemake --cores all --resources gpu=8    # with distill.gpus_per_job: 4, two students at
#                                              # a time, each a torchrun job on 4 GPUs
#
# Every rule takes its jobs' inputs, params and command from the job table in pipeline/dag.py,
# which also writes dvc.yaml: both tools run the same commands (tests/test_dag.py checks it).

import os
import re
import shutil
from pathlib import Path

from snakemake.exceptions import WorkflowError

from pipeline import dag, forkserver
from pipeline.provenance import REUSE_ENV
from pipeline.runners import RUNNER_ENV, SNAKEMAKE, StudyBusyError, refuse_if_dvc_runs
from pipeline.params import (
    check_models,
    check_paths,
    load_params,
    model_ids,
    params_file,
    read_yaml,
    student_ids,
    teacher_ids,
)

# The jobs this run starts hand themselves to a fork server that has imported torch once
# (pipeline/forkserver.py): about 1.5 s less CPU per job. KDIGA_FORKSERVER=0 turns it off.
os.environ.setdefault(forkserver.ENABLE_ENV, "1")
# Snakemake re-runs every job below one it re-runs (it judges by mtimes); a job whose outputs
# are already what it would make (same params, input bytes and code, by their provenance)
# keeps them and ends at once. Hence the outputs flagged update(): Snakemake keeps them for the
# job to look at (and restores them if the job fails) instead of deleting them first; every
# stage writes its outputs whole, through a temporary file and a rename.
# KDIGA_REUSE_CURRENT=0 (with --forceall) recomputes them.
os.environ.setdefault(REUSE_ENV, "1")
# This run's jobs are its own (a job started beside a Snakemake run stops: pipeline/runners.py).
os.environ[RUNNER_ENV] = SNAKEMAKE

PARAMS = params_file()  # params.yaml, or a preset: KDIGA_PARAMS=configs/cifar10.yaml snakemake
# The one schema, before Snakemake parses the file itself: a key given twice, bytes that are
# not UTF-8 or a bad value stop here with one line, before any job runs. The models are built
# (on the meta device, which imports torch) only before a real run, in onstart: a dry run
# reads the tables alone.
P = load_params(PARAMS, build=False)
configfile: PARAMS

if config != read_yaml(PARAMS):
    raise WorkflowError(
        f"the stages read {PARAMS}, but --config/--configfile changed Snakemake's copy: "
        f"put the change in {PARAMS} (or a copy named by KDIGA_PARAMS) instead"
    )
JOBS = {(job.stage, job.key): job for job in dag.jobs(P)}
TEACHERS = teacher_ids(P)
STUDENTS = student_ids(P)
MODELS = model_ids(P)
ATTACKS = P.attack.attacks


def _one_of(names):
    return "|".join(re.escape(n) for n in names) or "(?!)"


wildcard_constraints:
    teacher=_one_of(TEACHERS),
    sid=_one_of(STUDENTS),
    bkey=_one_of([dag.bounds_key(s, t) for s, t in dag.bounds_pairs(P)]),
    model=_one_of(MODELS),
    attack=_one_of(ATTACKS),


def job(stage, key):
    return JOBS[stage, key]


PRODUCED = {out for j in JOBS.values() for out in j.outputs}


def made_or_present(deps):
    """A job's inputs: those the DAG makes, and user files (a file: teacher or student init)
    once they are there; a missing one stops a real run in onstart (check_paths, naming
    it) and leaves `snakemake -n` usable."""
    return [d for d in deps if d in PRODUCED or Path(d).exists()]


def values(stage, key=None):
    """The params a job reads, as canonical JSON: a change re-runs exactly that job."""
    return dag.params_view(P, job(stage, key).params)


def command(stage, key=None):
    """The job's command (``python -m pipeline.stages <stage> ... --log <its log>``), as in
    dvc.yaml; a params entry, so a changed command re-runs the job, as it does for DVC."""
    return job(stage, key).cmd


rule all:
    input:
        # Every job's outputs, not just the report: the report is kept in git, so in a fresh
        # clone it exists while the models and evaluations it was made from do not.
        [out for j in JOBS.values() for out in j.outputs],


rule shard:
    output:
        directory(dag.SHARDS),
    params:
        values=values("shard"),
        cmd=command("shard"),
    log:
        dag.log_path("shard"),
    shell:
        "{params.cmd}"


rule teacher:
    input:
        lambda w: made_or_present(job("teacher", w.teacher).deps),
    output:
        model=update(dag.model_path("{teacher}")),
        meta=update(dag.teacher_meta_path("{teacher}")),
    params:
        values=lambda w: values("teacher", w.teacher),
        cmd=lambda w: command("teacher", w.teacher),
    log:
        dag.log_path("teacher", "{teacher}"),
    resources:
        gpu=1,
    shell:
        "{params.cmd}"


rule signals:
    input:
        lambda w: job("signals", w.teacher).deps,
    output:
        update(dag.signals_path("{teacher}")),
    params:
        values=lambda w: values("signals", w.teacher),
        cmd=lambda w: command("signals", w.teacher),
    log:
        dag.log_path("signals", "{teacher}"),
    resources:
        gpu=1,
    shell:
        "{params.cmd}"


rule distill:
    input:
        lambda w: made_or_present(job("distill", w.sid).deps),
    output:
        model=update(dag.model_path("{sid}")),
        history=update(dag.history_path("{sid}")),
    params:
        values=lambda w: values("distill", w.sid),
        cmd=lambda w: command("distill", w.sid),
    log:
        dag.log_path("distill", "{sid}"),
    resources:
        gpu=lambda w: job("distill", w.sid).gpus,  # distill.gpus_per_job
    shell:
        "{params.cmd}"


rule attack:
    input:
        lambda w: job("attack", f"{w.model}--{w.attack}").deps,
    output:
        update(dag.eval_path("{model}", "{attack}")),
    params:
        values=lambda w: values("attack", f"{w.model}--{w.attack}"),
        cmd=lambda w: command("attack", f"{w.model}--{w.attack}"),
    log:
        dag.log_path("attack", "{model}--{attack}"),
    resources:
        gpu=1,
    shell:
        "{params.cmd}"


rule bounds_teacher:
    input:
        lambda w: job("bounds_teacher", w.teacher).deps,
    output:
        update(dag.bounds_teacher_path("{teacher}")),
    params:
        values=lambda w: values("bounds_teacher", w.teacher),
        cmd=lambda w: command("bounds_teacher", w.teacher),
    log:
        dag.log_path("bounds_teacher", "{teacher}"),
    resources:
        gpu=1,
    shell:
        "{params.cmd}"


rule bounds:
    input:
        lambda w: job("bounds", w.bkey).deps,
    output:
        update(dag.bounds_path("{bkey}")),
    params:
        values=lambda w: values("bounds", w.bkey),
        cmd=lambda w: command("bounds", w.bkey),
    log:
        dag.log_path("bounds", "{bkey}"),
    resources:
        gpu=1,
    shell:
        "{params.cmd}"


rule report:
    input:
        job("report", None).deps,
    output:
        md=update(dag.REPORT_MD),
        png=update(dag.REPORT_PNG),
        record=update(dag.REPORT_RECORD),
        metrics=update(dag.METRICS),
        plot=update(dag.PLOT_CSV),
    params:
        values=values("report"),
        cmd=command("report"),
    log:
        dag.log_path("report"),
    shell:
        "{params.cmd}"


onstart:
    try:
        refuse_if_dvc_runs()  # dvc repro / dvc exp run writes the same outputs
    except StudyBusyError as err:
        raise WorkflowError(str(err)) from None
    check_paths(P)  # a missing dataset root, teacher or student file stops the run before any job
    check_models(P)  # so does a model its params cannot build (a bad kwargs)


onsuccess:
    # Record in dvc.lock the jobs whose outputs are current (params, inputs and code, checked
    # against each artifact's provenance), so `dvc status` / `dvc repro` see them as done; a
    # stale output left by a targeted run is never recorded.
    if shutil.which("dvc") and Path(".dvc").is_dir() and Path("dvc.yaml").is_file():
        shell("python -m pipeline.sync --dvc --quiet || echo 'pipeline.sync failed: run it by hand'")
