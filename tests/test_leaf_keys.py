"""Every leaf key of the schema, changed alone in a finished tiny study: Snakemake and DVC
see the same change, on exactly the jobs that read the key.

For each key (its new value below; a key that goes with another is set with it):
- a key that changes dvc.yaml (the jobs, their inputs, the keys they read, the plots) makes
  it stale, which DVC's first stage refuses (``pipeline.dag.check_fresh``);
- any other key re-runs exactly the jobs that read it: Snakemake by its params trigger (the
  params it recorded for each output against the job's params now, as Snakemake compares
  them), DVC by ``dvc status`` with the same dvc.yaml (every key a job reads is listed in it,
  defaults included). A key no job reads changes nothing for either.
"""

from __future__ import annotations

import ast
import base64
import copy
import json
from pathlib import Path

import pytest
import yaml
from tiny_study import copy_study

from pipeline import dag
from pipeline.params import ParamError, describe, validate

T, S = "pgdat", "small_cnn"
ALT = {
    "seeds": [0, 1],
    "shard.dataset": "synthetic",
    "shard.root": "data/elsewhere",
    "shard.image_size": 12,
    "shard.val_fraction": 0.25,
    "shard.test_samples": 100,
    "shard.max_per_shard": 400,
    # keys that go with another: the others they need, set at once
    "shard.num_classes": {
        "shard.num_classes": 10,
        "shard.dataset": "imagenet",
        "shard.root": "data/elsewhere",
    },
    "shard.resize_short": 32,
    "shard.workers": 3,
    "shard.shuffle_buffer": 500,
    "shard.max_gb": 8.0,
    "shard.seed": 1,
    f"teachers.{T}.source": "file:data/elsewhere/teacher.safetensors",
    f"teachers.{T}.arch": "resnet18",
    f"teachers.{T}.arch_kwargs": {"width": 12},
    f"teachers.{T}.sha256": {
        f"teachers.{T}.sha256": "0" * 64,
        f"teachers.{T}.source": "file:data/elsewhere/teacher.safetensors",
    },
    f"teachers.{T}.mean": {f"teachers.{T}.mean": [0.5], f"teachers.{T}.std": [0.25]},
    f"teachers.{T}.std": {f"teachers.{T}.mean": [0.25], f"teachers.{T}.std": [0.5]},
    f"teachers.{T}.max_mb": 100.0,
    f"teachers.{T}.train.epochs": 3,
    f"teachers.{T}.train.batch_size": 32,
    f"teachers.{T}.train.lr": 0.1,
    f"teachers.{T}.train.momentum": 0.8,
    f"teachers.{T}.train.weight_decay": 1e-3,
    f"teachers.{T}.train.milestones": [1],
    f"teachers.{T}.train.augment": "crop",
    f"teachers.{T}.train.crop_padding": 1,
    f"teachers.{T}.train.checkpoint_every": 5,
    f"teachers.{T}.train.method": "trades",
    f"teachers.{T}.train.seed": 1,
    f"teachers.{T}.train.eps": 0.05,
    f"teachers.{T}.train.steps": 3,
    f"teachers.{T}.train.step_size": 0.02,
    f"teachers.{T}.train.trades_beta": 3.0,
    f"students.{S}.arch": "resnet18",
    f"students.{S}.init": "file:data/elsewhere/student.safetensors",
    f"students.{S}.sha256": {
        f"students.{S}.sha256": "0" * 64,
        f"students.{S}.init": "file:data/elsewhere/student.safetensors",
    },
    f"students.{S}.kwargs": {"width": 12},
    f"students.{S}.epochs": 2,
    f"students.{S}.batch_size": 32,
    f"students.{S}.lr": 0.1,
    f"students.{S}.momentum": 0.8,
    f"students.{S}.weight_decay": 1e-3,
    f"students.{S}.milestones": [1],
    "distill.epochs": 2,
    "distill.batch_size": 32,
    "distill.lr": 0.1,
    "distill.momentum": 0.8,
    "distill.weight_decay": 1e-3,
    "distill.milestones": [1],
    "distill.augment": "crop",
    "distill.crop_padding": 1,
    "distill.checkpoint_every": 5,
    "distill.methods": ["kd", "kdiga"],
    "distill.ce_weight": 0.4,
    "distill.kl_weight": 0.6,
    "distill.temperature": 2.0,
    "distill.iga.weight": 2.0,
    "distill.iga.reduction": "batch_frobenius",
    "distill.iga.grad_mode": "eval",
    "distill.adversarial.eps": 0.05,
    "distill.adversarial.steps": 3,
    "distill.adversarial.step_size": 0.02,
    "distill.rslad.adv_weight": 0.5,
    "distill.adaad.alpha": 0.5,
    "distill.iad.alpha": 0.5,
    "distill.iad.beta": 0.2,
    "distill.iad.warmup": 0.5,
    "distill.iad.weight_teacher": True,
    "distill.igdm.weight": 2.0,
    "distill.compile_teacher": True,
    "distill.gpus_per_job": 2,
    "signals.enabled": True,
    "signals.views": 2,
    "signals.grad_dtype": "float32",
    "signals.schedule": "random",
    "signals.batch_size": 128,
    "signals.max_gb": 10.0,
    "attack.split": "val",
    "attack.attacks": ["pgd"],
    "attack.radii": [0.05, 0.15],
    "attack.norm": "l2",
    "attack.batch_size": 60,
    "attack.compile": True,
    "attack.pgd.steps": 4,
    "attack.pgd.restarts": 2,
    "attack.pgd.step_size": 0.02,
    "attack.autoattack.version": "standard",
    "attack.autoattack.attacks": ["apgd-ce", "apgd-dlr"],
    "attack.autoattack.n_restarts": 2,
    "attack.autoattack.n_iter": 10,
    "attack.autoattack.n_target_classes": 3,
    "bounds.radii": [0.05],
    "bounds.samples": 30,
    "bounds.steps": 3,
    "bounds.restarts": 2,
    "bounds.tol": 1e-3,
    "bounds.patience": 2,
    "bounds.check_samples": 10,
    "bounds.batch_size": 20,
    "report.figure_attack": "autoattack",
    "report.claim_radius": 0.05,
}


def leaf_keys() -> list[str]:
    """The schema's leaf keys, with the tiny study's teacher and student names."""
    names = {"teachers.<name>": f"teachers.{T}", "students.<name>": f"students.{S}"}
    out = []
    for key, default, _ in describe():
        if default == "":  # a section
            continue
        for pattern, name in names.items():
            key = key.replace(pattern, name)
        out.append(key)
    return out


def test_every_leaf_key_has_a_new_value():
    """A key added to the schema must be added here (and so walked)."""
    assert sorted(ALT) == sorted(leaf_keys())


def _set(raw: dict, key: str, value) -> None:
    *path, leaf = key.split(".")
    for part in path:
        raw = raw.setdefault(part, {})
    raw[leaf] = value


def _changed(raw: dict, key: str) -> dict:
    new = copy.deepcopy(raw)
    value = ALT[key]
    for k, v in (value if isinstance(value, dict) and key in value else {key: value}).items():
        _set(new, k, v)
    return new


def _reads(params, job: dag.Job, key: str) -> bool:
    """Whether the job's results depend on the key (a key such as a download cap is read,
    but its results do not depend on it: neither tool re-runs the job for it)."""
    return any(key == p or key.startswith(f"{p}.") for p in dag.dvc_params(params, job.params))


def _recorded_params(study: Path) -> dict[str, str]:
    """Each output's job params as Snakemake recorded them (.snakemake/metadata)."""
    out = {}
    for f in (study / ".snakemake" / "metadata").iterdir():
        meta = json.loads(f.read_text())
        values = [ast.literal_eval(p) for p in meta.get("params") or []]
        views = [v for v in values if isinstance(v, str) and v.startswith("{")]
        if views:
            out[base64.urlsafe_b64decode(f.name).decode()] = views[0]
    return out


def _dvc_yaml(params) -> str | None:
    """dvc.yaml for ``params``; None when the file must first be completed (new keys read)."""
    try:
        return dag.dvc_yaml(params)
    except ParamError:
        return None


@pytest.mark.slow
def test_snakemake_and_dvc_see_each_leaf_key_on_exactly_the_jobs_that_read_it(
    tiny_study_built, tmp_path
):
    from dvc.repo import Repo  # dvc is heavy to import: only this test needs it

    study = copy_study(tiny_study_built, tmp_path / "study")
    params_path = study / "params.yaml"
    raw = yaml.safe_load(params_path.read_text())
    base = {j.name: j for j in dag.jobs(validate(raw, build=False))}
    recorded = _recorded_params(study)
    dvc_yaml = (study / "dvc.yaml").read_text()
    assert all(j.outputs[0] in recorded for j in base.values())
    report = {}
    for key in leaf_keys():
        new_raw = _changed(raw, key)
        new = validate(new_raw, build=False)
        jobs = {j.name: j for j in dag.jobs(new)}
        params_path.write_text(yaml.safe_dump(new_raw, sort_keys=False))
        stale = dag.check_fresh(str(params_path), str(study / "dvc.yaml"))
        if _dvc_yaml(new) != dvc_yaml:  # other jobs, inputs, keys read or plots: DVC
            assert stale, f"{key}: dvc.yaml must change and was not found stale"  # refuses
            report[key] = "shape"
            continue
        assert not stale, (key, stale)
        assert set(jobs) == set(base)
        assert all((jobs[n].deps, jobs[n].params) == (base[n].deps, base[n].params) for n in jobs)
        reads = {n for n, j in jobs.items() if _reads(new, j, key)}
        snakemake = {
            n for n, j in jobs.items() if dag.params_view(new, j.params) != recorded[j.outputs[0]]
        }
        with Repo(str(study)) as repo:
            dvc = {name.rsplit(":", 1)[-1] for name in repo.status()} - {dag.GUARD}
        assert snakemake == dvc == reads, (key, sorted(reads), sorted(snakemake), sorted(dvc))
        report[key] = len(reads)
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with Repo(str(study)) as repo:
        assert set(repo.status()) == set()
    shape = [k for k, v in report.items() if v == "shape"]
    print(
        f"{len(report)} keys: {len(shape)} change the DAG's shape ({', '.join(shape)}); "
        f"{sum(1 for v in report.values() if v == 0)} are read by no job of this study"
    )
    assert {"seeds", "distill.methods", "attack.attacks"} <= set(shape)
    assert report["distill.iga.weight"] == 1 and report["attack.pgd.steps"] >= 2
