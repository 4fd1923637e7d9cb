# kdiga study: data -> shards -> teacher -> [cached teacher signals, when signals.enabled]
# -> distill (student x method) -> attack (model x attack, a sweep over radii)
# -> local-linearity bounds -> report.
#
#   snakemake --cores all                      # the default study, on CPU
#   snakemake --cores all --resources gpu=4    # four GPU jobs at a time, one GPU each
#
# Every job is one command shared with dvc.yaml (generated from the same table in
# pipeline/dag.py); tests/test_dag.py checks that both describe the same jobs.

import shutil
from pathlib import Path

from snakemake.exceptions import WorkflowError

from pipeline import dag
from pipeline.params import check_paths, load_params, model_ids, params_file, read_yaml, student_ids

PARAMS = params_file()  # params.yaml, or a preset: KDIGA_PARAMS=configs/cifar10.yaml snakemake
# The one schema, before Snakemake parses the file itself: a key given twice, bytes that are
# not UTF-8 or a bad value stop here with one line, before any job runs.
P = load_params(PARAMS)
configfile: PARAMS

if config != read_yaml(PARAMS):
    raise WorkflowError(
        f"the stages read {PARAMS}, but --config/--configfile changed Snakemake's copy: "
        f"put the change in {PARAMS} (or a copy named by KDIGA_PARAMS) instead"
    )
STUDENTS = student_ids(P)
MODELS = model_ids(P)
ATTACKS = P["attack"]["attacks"]

wildcard_constraints:
    sid="[A-Za-z0-9_.+]+--[a-z_]+",
    model="teacher|[A-Za-z0-9_.+]+--[a-z_]+",
    attack="|".join(ATTACKS),


def method(sid):
    return sid.split("--")[-1]


rule all:
    input:
        # Every job's outputs, not just the report: the report is kept in git, so in a fresh
        # clone it exists while the models and evaluations it was made from do not.
        [out for job in dag.jobs(P) for out in job.outputs],


rule shard:
    output:
        directory(dag.SHARDS),
    params:
        values=dag.params_view(P, ["seed", "shard"]),
    log:
        dag.log_path("shard"),
    shell:
        "python -m pipeline.shard --log {log}"


rule teacher:
    input:
        # a file: teacher's checkpoint once it is there; a missing one stops a real run in
        # onstart (check_paths, naming it) and leaves `snakemake -n` usable
        [d for d in dag.teacher_deps(P) if d == dag.SHARDS or Path(d).exists()],
    output:
        model=dag.model_path("teacher"),
        meta=dag.teacher_meta_path(),
    params:
        values=dag.params_view(P, ["seed", "teacher"]),
    log:
        dag.log_path("teacher"),
    resources:
        gpu=1,
    shell:
        "python -m pipeline.teacher --log {log}"


rule signals:
    input:
        dag.SHARDS,
        dag.model_path("teacher"),
    output:
        dag.SIGNALS,
    params:
        values=dag.params_view(P, dag.signals_param_keys()),
    log:
        dag.log_path("signals"),
    resources:
        gpu=1,
    shell:
        "python -m pipeline.signals --log {log}"


rule distill:
    input:
        lambda w: dag.distill_deps(P, method(w.sid)),
    output:
        model=dag.model_path("{sid}"),
        history=dag.history_path("{sid}"),
    params:
        values=lambda w: dag.params_view(P, dag.distill_param_keys(method(w.sid), P)),
    log:
        dag.log_path("distill", "{sid}"),
    resources:
        gpu=1,
    shell:
        "python -m pipeline.distill --model {wildcards.sid} --log {log}"


rule attack:
    input:
        dag.SHARDS,
        dag.model_path("{model}"),
    output:
        dag.eval_path("{model}", "{attack}"),
    params:
        values=lambda w: dag.params_view(P, dag.attack_param_keys(w.attack)),
    log:
        dag.log_path("attack", "{model}--{attack}"),
    resources:
        gpu=1,
    shell:
        "python -m pipeline.attack --model {wildcards.model} --attack {wildcards.attack} --log {log}"


rule bounds:
    input:
        dag.SHARDS,
        dag.model_path("{sid}"),
        dag.model_path("teacher"),
    output:
        dag.bounds_path("{sid}"),
    params:
        values=dag.params_view(P, ["seed", "bounds"]),
    log:
        dag.log_path("bounds", "{sid}"),
    resources:
        gpu=1,
    shell:
        "python -m pipeline.bounds --model {wildcards.sid} --log {log}"


rule report:
    input:
        dag.teacher_meta_path(),
        [dag.eval_path(m, a) for m in MODELS for a in ATTACKS],
        [dag.bounds_path(s) for s in STUDENTS],
        [dag.history_path(s) for s in STUDENTS],
    output:
        md=dag.REPORT_MD,
        png=dag.REPORT_PNG,
        record=dag.REPORT_RECORD,
        metrics=dag.METRICS,
        plot=dag.PLOT_CSV,
    params:
        values=dag.params_view(P, dag.REPORT_PARAMS),
    log:
        dag.log_path("report"),
    shell:
        "python -m pipeline.report --log {log}"


onstart:
    check_paths(P)  # a missing dataset root or teacher file stops the run before any job


onsuccess:
    # Record in dvc.lock the jobs whose outputs are current (params, inputs and code, checked
    # against each artifact's provenance), so `dvc status` / `dvc repro` see them as done; a
    # stale output left by a targeted run is never recorded.
    if shutil.which("dvc") and Path(".dvc").is_dir() and Path("dvc.yaml").is_file():
        shell("python -m pipeline.sync --dvc --quiet || echo 'pipeline.sync failed: run it by hand'")
