"""The Snakefile and dvc.yaml describe one DAG: same jobs, commands, inputs and outputs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import dag
from pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def dry_run(*args: str, params_file: str = "params.yaml") -> str:
    """`snakemake -n --forceall` in the repository; its output (it must succeed)."""
    env = dict(os.environ, KDIGA_PARAMS=params_file, PATH=f"{BIN}:{os.environ['PATH']}")
    proc = subprocess.run(
        [_tool("snakemake"), "-n", "--forceall", "--nolock", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def snakemake_jobs(params_file: str = "params.yaml") -> list[dict]:
    """Parse `snakemake -n --forceall` into jobs: rule, inputs, outputs, shell command."""
    jobs, job = [], None
    for line in dry_run("--cores", "1", params_file=params_file).splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            job = {"rule": m.group(1), "input": set(), "output": set(), "cmd": None}
            jobs.append(job)
        elif job and (m := re.match(r"^\s+(input|output): (.*)$", line)):
            job[m.group(1)] = {p.strip() for p in m.group(2).split(",")}
        elif job and line.startswith("Shell command: "):
            job["cmd"] = line[len("Shell command: ") :].strip()
    return [j for j in jobs if j["rule"] != "all"]


def _as_set(jobs: list[dict]) -> set:
    return {(j["rule"], j["cmd"], frozenset(j["input"]), frozenset(j["output"])) for j in jobs}


def _dag_set(params: dict) -> set:
    """The table's jobs as Snakemake plans them: an input file that neither exists nor is
    made by a job (a preset's teacher checkpoint on this machine) is left out of its plan."""
    jobs = dag.jobs(params)
    made = {o for j in jobs for o in j.outputs}
    return {
        (
            j.stage,
            j.cmd,
            frozenset(d for d in j.deps if d in made or (ROOT / d).exists()),
            frozenset(j.outputs),
        )
        for j in jobs
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "params_file", ["params.yaml", "configs/cifar10.yaml", "configs/imagenet.yaml"]
)
def test_snakemake_runs_exactly_the_dag_jobs(params_file):
    """Every preset dry-runs, and Snakemake's jobs are the table's jobs, command for command."""
    sm = snakemake_jobs(params_file)
    assert _as_set(sm) == _dag_set(load_params(ROOT / params_file))
    assert len(sm) == len(dag.jobs(load_params(ROOT / params_file)))


def test_dvc_yaml_is_fresh():
    """dvc.yaml is generated from params.yaml; a stale copy would run another DAG."""
    os.chdir(ROOT)
    assert dag.check_fresh() is None, "run `python -m pipeline.dag`"


@pytest.mark.slow
def test_dvc_reads_the_same_jobs():
    """DVC's own parse of dvc.yaml: the same commands, data inputs and outputs."""
    from dvc.repo import Repo

    repo = Repo(str(ROOT))
    try:
        stages = {s.addressing: s for s in repo.index.stages}
    finally:
        repo.close()
    jobs = {j.name: j for j in dag.jobs(load_params(ROOT / "params.yaml"))}
    assert set(stages) == set(jobs)
    for name, job in jobs.items():
        stage = stages[name]
        assert stage.cmd == job.cmd
        deps = {d.def_path for d in stage.deps if not str(d.def_path).endswith("params.yaml")}
        assert deps == {*job.deps, *dag.code_deps(job.stage)}
        assert {o.def_path for o in stage.outs} == set(job.outputs)


def test_stale_dvc_yaml_is_reported(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("methods: [st, kd,", "methods: [kd,")
    (tmp_path / "params.yaml").write_text(text)
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    problem = dag.check_fresh(tmp_path / "params.yaml", tmp_path / "dvc.yaml")
    assert problem is not None and "python -m pipeline.dag" in problem


def test_distill_jobs_read_only_their_own_params():
    """Changing the IGA weight re-runs only the IGA methods; st ignores the teacher."""
    params = load_params(ROOT / "params.yaml")
    by_name = {j.name: j for j in dag.jobs(params)}
    assert "distill.iga" in by_name["distill@small_cnn--kdiga"].params
    assert "distill.iga" not in by_name["distill@small_cnn--kd"].params
    assert "distill.adversarial" in by_name["distill@small_cnn--ard"].params
    assert dag.model_path("teacher") not in by_name["distill@small_cnn--st"].deps
    assert all(
        "attack" not in p for j in by_name.values() if j.stage == "distill" for p in j.params
    )


def _with_signals(views: int = 4) -> dict:
    params = load_params(ROOT / "params.yaml")
    params["signals"] = {**params["signals"], "enabled": True, "views": views}
    return params


def test_every_stage_has_its_script_and_section():
    params = load_params(ROOT / "params.yaml")
    for stage in dag.STAGES:
        assert (ROOT / "pipeline" / f"{stage}.py").exists()
        assert stage in params
    assert not params["signals"]["enabled"]
    assert {j.stage for j in dag.jobs(params)} == set(dag.STAGES) - {"signals"}
    assert {j.stage for j in dag.jobs(_with_signals())} == set(dag.STAGES)


def test_cacheable_methods_are_those_the_losses_serve_from_a_cache():
    from kdiga.losses import build_loss
    from pipeline.distill import loss_settings

    d = load_params(ROOT / "params.yaml")["distill"]
    for method in d["methods"]:
        loss = build_loss(method, **loss_settings(method, d))
        assert getattr(loss, "accepts_teacher_cache", False) == (method in dag.CACHEABLE), method


def test_signals_stage_feeds_only_the_methods_it_serves():
    """With signals on: one signals job; kd/ard/kdiga/kdiga_ardc read its file and the
    signals params; st and kdiga_arda (teacher at x+delta) do not, and keep their params."""
    off = {j.name: j for j in dag.jobs(load_params(ROOT / "params.yaml"))}
    on = {j.name: j for j in dag.jobs(_with_signals())}
    assert [j.outs for j in on.values() if j.stage == "signals"] == [[dag.SIGNALS]]
    for name, job in on.items():
        if job.stage != "distill":
            continue
        method = job.key.split("--")[-1]
        served = method in dag.CACHEABLE
        assert (dag.SIGNALS in job.deps) == served, name
        assert ("signals" in job.params) == served, name
        if not served:
            assert job.deps == off[name].deps and job.params == off[name].params
    assert all(dag.SIGNALS not in j.deps for j in off.values())


def test_signals_on_without_a_served_method_adds_no_stage():
    params = _with_signals()
    params["distill"]["methods"] = ["st", "kdiga_arda"]
    assert "signals" not in {j.stage for j in dag.jobs(params)}


@pytest.mark.slow
def test_snakemake_runs_the_dag_jobs_with_signals(tmp_path):
    """The optional stage as Snakemake plans it: the same jobs as the table."""
    text = (ROOT / "params.yaml").read_text().replace("enabled: false", "enabled: true", 1)
    assert text != (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text)
    sm = snakemake_jobs(str(path))
    assert "signals" in {j["rule"] for j in sm}
    assert _as_set(sm) == _dag_set(load_params(path))


@pytest.mark.slow
def test_slurm_profile_dry_runs():
    """The SLURM profile loads its executor plugin and plans every job (no cluster needed)."""
    out = dry_run("--profile", "profiles/slurm")
    jobs = len(dag.jobs(load_params(ROOT / "params.yaml")))
    assert f"total         {jobs + 1}" in out  # + rule all


def test_a_file_teacher_is_a_dependency_of_the_teacher_job():
    """Replacing the checkpoint a file: teacher comes from re-runs the teacher job."""
    params = load_params(ROOT / "configs" / "cifar10.yaml")
    (teacher,) = [j for j in dag.jobs(params) if j.stage == "teacher"]
    assert teacher.deps == [dag.SHARDS, "data/raw/teachers/model_cifar_wrn.pt"]
    (default,) = [j for j in dag.jobs(load_params(ROOT / "params.yaml")) if j.stage == "teacher"]
    assert default.deps == [dag.SHARDS]
