"""The Snakefile and dvc.yaml describe one DAG: same jobs, commands, inputs and outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipeline import dag
from pipeline.params import ParamError, load_params, parse_student_id, student_ids, validate

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
    """`snakemake -n --forceall` on the repository's Snakefile, params and presets, in a
    folder of its own (its own .snakemake, beside any other test's); its output (it must
    succeed)."""
    env = dict(
        os.environ,
        KDIGA_PARAMS=params_file,
        PATH=f"{BIN}:{os.environ['PATH']}",
        PYTHONPATH=str(ROOT),
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("Snakefile", "params.yaml", "configs", "profiles", "data"):
            if (ROOT / name).exists():
                (Path(tmp) / name).symlink_to(ROOT / name)
        proc = subprocess.run(
            [_tool("snakemake"), "-n", "--forceall", "--nolock", *args],
            cwd=tmp,
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
            # an output kept for its job to reuse (update()) is printed "<path> (update)"
            job[m.group(1)] = {p.strip().removesuffix(" (update)") for p in m.group(2).split(",")}
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


#: the exact job counts of each preset, per stage (and in all): shard, teachers, students
#: (ST per student and seed; the rest per teacher, method, student and seed), an attack job
#: per model and attack, a bounds_teacher job per teacher and a bounds job per student, the
#: report
PRESET_JOBS = {
    # 2 teachers, 1 student, 6 methods (st + 5 with a teacher), 3 seeds; each ST student is
    # bounded against each teacher
    "params.yaml": {
        "shard": 1,
        "teacher": 2,
        "distill": 3 * (1 + 2 * 5),
        "attack": (2 + 3 * 11) * 2,
        "bounds_teacher": 2,
        "bounds": 3 * (2 + 10),
        "report": 1,
    },
    # 1 teacher, 1 student, 9 methods (st + 8), 3 seeds
    "configs/cifar10.yaml": {
        "shard": 1,
        "teacher": 1,
        "distill": 3 + 8 * 3,
        "attack": (1 + 27) * 2,
        "bounds_teacher": 1,
        "bounds": 3 + 24,
        "report": 1,
    },
    # 5 teachers, 5 students, 3 methods (st + 2), 1 seed
    "configs/imagenet.yaml": {
        "shard": 1,
        "teacher": 5,
        "distill": 5 + 5 * 2 * 5,
        "attack": (5 + 55) * 2,
        "bounds_teacher": 5,
        "bounds": 5 * 5 + 50,
        "report": 1,
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("params_file", list(PRESET_JOBS))
def test_snakemake_runs_exactly_the_dag_jobs(params_file):
    """Every preset dry-runs, Snakemake's jobs are the table's jobs, command for command,
    and their number per stage is the grid's."""
    sm = snakemake_jobs(params_file)
    params = load_params(ROOT / params_file)
    assert _as_set(sm) == _dag_set(params)
    counts = {stage: sum(j["rule"] == stage for j in sm) for stage in PRESET_JOBS[params_file]}
    assert counts == PRESET_JOBS[params_file]
    assert len(sm) == sum(PRESET_JOBS[params_file].values()) == len(dag.jobs(params))


def test_dvc_yaml_is_fresh():
    """dvc.yaml is generated from params.yaml; a stale copy would run another DAG."""
    problem = dag.check_fresh(ROOT / "params.yaml", ROOT / "dvc.yaml")
    assert problem is None, problem


def _dvc_stages(root: Path) -> dict:
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        return {s.addressing: s for s in repo.index.stages}
    finally:
        repo.close()


@pytest.mark.slow
def test_dvc_reads_the_same_jobs():
    """DVC's own parse of dvc.yaml: the same commands, data inputs, outputs and params, with
    no dependency or params key listed twice (nothing padded)."""
    stages = _dvc_stages(ROOT)
    params = load_params(ROOT / "params.yaml")
    jobs = {j.name: j for j in dag.jobs(params)}
    assert set(stages) == {*jobs, dag.GUARD}  # the jobs, and DVC's guard stage first
    for name, job in jobs.items():
        stage = stages[name]
        assert stage.cmd == job.cmd
        paths = [d.def_path for d in stage.deps if not str(d.def_path).endswith("params.yaml")]
        assert len(paths) == len(set(paths)), name
        assert set(paths) == {dag.DAG_RECORD, *job.deps, *dag.code_deps(job.stage)}
        (tracked,) = [d for d in stage.deps if str(d.def_path).endswith("params.yaml")]
        keys = list(tracked.params)
        assert len(keys) == len(set(keys)), name
        assert set(keys) == set(dag.dvc_params(params, job.params)), name  # every key it reads
        assert {o.def_path for o in stage.outs} == set(job.outputs)
    guard = stages[dag.GUARD]
    assert {o.def_path for o in guard.outs} == {dag.DAG_RECORD}
    assert "params.yaml" in {d.def_path for d in guard.deps}  # the whole file: any change


def test_dvc_yaml_is_plain_stages():
    """Stages a DVC user could have written: no foreach/matrix templating, names that `dvc
    stage add` accepts."""
    import yaml
    from dvc.stage.utils import is_valid_name

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert is_valid_name(name), name
        assert not {"foreach", "matrix", "do"} & set(stage), name
        assert "${" not in json.dumps(stage), name


def test_a_key_left_to_its_default_is_written_into_the_file_for_dvc(tmp_path):
    """DVC reads params from the file alone: `python -m pipeline.dag` writes the keys the
    jobs read that the file leaves out, with their defaults, keeping its comments; dvc.yaml
    then tracks them, and a file that leaves one out again is reported as stale."""
    text = (ROOT / "params.yaml").read_text()
    text = text.replace("methods: [st, kd,", "methods: [st, rslad, kd,", 1)
    start = text.index("  rslad:\n")
    end = text.index("\n  compile_teacher:")
    text = text[:start] + text[end + 1 :]  # no distill.rslad section
    path, out = tmp_path / "params.yaml", tmp_path / "dvc.yaml"
    path.write_text(text)
    assert dag.unset_keys(load_params(path, build=False)) == ["distill.rslad"]
    with pytest.raises(ParamError, match="leaves these keys the jobs read to their defaults"):
        dag.dvc_yaml(load_params(path, build=False))
    assert dag.main(["--params", str(path), "--output", str(out)]) == 0
    written = path.read_text()
    assert "  rslad:\n    adv_weight: 0.8333333333333334\n" in written
    assert "# each (teacher, method, student) is trained once per seed" in written  # comments
    params = load_params(path, build=False)
    assert params.distill.rslad.adv_weight == 5 / 6 and dag.unset_keys(params) == []
    stages = yaml.safe_load(out.read_text())["stages"]
    assert "distill.rslad" in stages["distill-pgdat--rslad--small_cnn--s0"]["params"]
    assert "distill.rslad" not in stages["distill-pgdat--kd--small_cnn--s0"]["params"]
    assert dag.check_fresh(path, out) is None
    path.write_text(text)
    assert "leaves keys the jobs read to their defaults (distill.rslad)" in dag.check_fresh(
        path, out
    )


def test_stale_dvc_yaml_is_reported(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("methods: [st, kd,", "methods: [kd,")
    (tmp_path / "params.yaml").write_text(text)
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    problem = dag.check_fresh(tmp_path / "params.yaml", tmp_path / "dvc.yaml")
    assert problem is not None and "python -m pipeline.dag" in problem
    assert (
        "job(s) gone (" in problem and "distill-st--small_cnn--s0" not in problem.split("gone")[0]
    )  # what changed: ST's jobs are gone, none added


def _grid(**change) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in change.items():
        raw[key] = value
    return raw


def _jobs(raw: dict) -> dict:
    params = validate(raw)
    return {
        j.name: (j.cmd, tuple(j.deps), dag.params_view(params, j.params)) for j in dag.jobs(params)
    }


def test_adding_a_seed_or_a_teacher_adds_only_new_jobs():
    """A new seed or teacher leaves every existing job as it was (command, inputs, params):
    only the new jobs and the report run."""
    base = _jobs(_grid())
    raw = _grid()
    more_seeds = _jobs(_grid(seeds=[*raw["seeds"], 7]))
    teachers = {**raw["teachers"], "third": raw["teachers"]["pgdat"]}
    more_teachers = _jobs(_grid(teachers=teachers))
    for grown, new_key in ((more_seeds, "--s7"), (more_teachers, "third")):
        changed = {n for n in base if n in grown and grown[n] != base[n]}
        assert changed == {"report"}
        added = set(grown) - set(base)
        assert added and all(new_key in n for n in added)
        assert not set(base) - set(grown)


def test_checkpointing_more_often_changes_no_job():
    """checkpoint_every changes how much a killed run loses, not its weights: no job's
    command, inputs or params view moves, for students or for a trained teacher."""
    raw = _grid()
    raw["distill"] = {**raw["distill"], "checkpoint_every": 50}
    teacher = raw["teachers"]["pgdat"]
    raw["teachers"]["pgdat"] = {**teacher, "train": {**teacher["train"], "checkpoint_every": 7}}
    assert _jobs(raw) == _jobs(_grid())
    params = validate(raw)
    assert params.train_settings("small_cnn")["checkpoint_every"] == 50
    assert params.teachers["pgdat"].train.checkpoint_every == 7


def test_ids_name_teacher_method_student_and_seed():
    params = validate(_grid(seeds=[0, 3]))
    ids = student_ids(params)
    assert "st--small_cnn--s3" in ids and "trades--kdiga--small_cnn--s0" in ids
    assert "pgdat--st--small_cnn--s0" not in ids  # st depends on no teacher
    job = parse_student_id(params, "trades--kdiga_ardc--small_cnn--s3")
    assert (job.teacher, job.method, job.student, job.seed) == (
        "trades",
        "kdiga_ardc",
        "small_cnn",
        3,
    )
    with pytest.raises(ParamError, match="not a student of this study"):
        parse_student_id(params, "trades--kdiga--small_cnn--s9")


def test_distill_jobs_read_only_their_own_params():
    """Changing the IGA weight re-runs only the IGA methods; st ignores every teacher."""
    raw = _grid()
    raw["distill"]["methods"].append("rslad")
    params = validate(raw)
    by_name = {j.name: j for j in dag.jobs(params)}
    assert "distill.iga" in by_name["distill-pgdat--kdiga--small_cnn--s0"].params
    assert "distill.iga" not in by_name["distill-pgdat--kd--small_cnn--s0"].params
    assert "distill.adversarial" in by_name["distill-pgdat--ard--small_cnn--s0"].params
    assert "distill.rslad" in by_name["distill-trades--rslad--small_cnn--s0"].params
    st = by_name["distill-st--small_cnn--s0"]
    assert not any(d.startswith("data/models/") for d in st.deps)
    kd = by_name["distill-trades--kd--small_cnn--s0"]
    assert kd.deps == [dag.SHARDS, dag.model_path("trades")]
    assert all(
        "attack" not in p for j in by_name.values() if j.stage == "distill" for p in j.params
    )


def test_student_overrides_and_init_file_reach_the_job(tmp_path):
    raw = _grid()
    ckpt = tmp_path / "init.safetensors"
    raw["students"]["small_cnn"] |= {"lr": 1e-5, "init": f"file:{ckpt}"}
    params = validate(raw)
    assert params.train_settings("small_cnn")["lr"] == 1e-5
    assert params.train_settings("small_cnn")["epochs"] == params.distill.epochs
    job = {j.name: j for j in dag.jobs(params)}["distill-st--small_cnn--s0"]
    assert str(ckpt) in job.deps and "students.small_cnn" in job.params


def _with_signals(views: int = 4) -> dict:
    raw = _grid()
    raw["signals"] = {**raw["signals"], "enabled": True, "views": views}
    return raw


def test_every_stage_has_its_script():
    params = load_params(ROOT / "params.yaml")
    for stage in dag.STAGES:
        script = ROOT / dag.code_deps(stage)[0]  # pipeline/stages/<stage>.py or a package
        assert script.is_file() or (script / "__main__.py").is_file(), stage
    assert not params.signals.enabled
    assert {j.stage for j in dag.jobs(params)} == set(dag.STAGES) - {"signals"}
    assert {j.stage for j in dag.jobs(validate(_with_signals()))} == set(dag.STAGES)


def test_signals_stage_feeds_only_the_methods_it_serves():
    """With signals on: one signals job per teacher; students of cacheable methods read
    their own teacher's file and the signals params; st and kdiga_arda (teacher at x+delta)
    do not, and keep their params."""
    from kdiga.methods import get_method

    off = {j.name: j for j in dag.jobs(load_params(ROOT / "params.yaml"))}
    params = validate(_with_signals())
    on = {j.name: j for j in dag.jobs(params)}
    assert sorted(o for j in on.values() if j.stage == "signals" for o in j.outs) == sorted(
        dag.signals_path(t) for t in params.teachers
    )
    for name, job in on.items():
        if job.stage != "distill":
            continue
        sj = parse_student_id(params, job.key)
        served = get_method(sj.method).cacheable
        assert any(d.startswith("data/signals/") for d in job.deps) == served, name
        if served:
            assert dag.signals_path(sj.teacher) in job.deps
        assert ("signals" in job.params) == served, name
        if not served:
            assert job.deps == off[name].deps and job.params == off[name].params


def test_signals_on_without_a_served_method_adds_no_stage():
    raw = _with_signals()
    raw["distill"]["methods"] = ["st", "kdiga_arda"]
    assert "signals" not in {j.stage for j in dag.jobs(validate(raw))}


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
    assert re.search(rf"^total +{jobs + 1}$", out, re.MULTILINE)  # + rule all


def test_a_file_teacher_is_a_dependency_of_the_teacher_job():
    """Replacing the checkpoint a file: teacher comes from re-runs the teacher job."""
    params = load_params(ROOT / "configs" / "cifar10.yaml")
    (teacher,) = [j for j in dag.jobs(params) if j.stage == "teacher"]
    assert teacher.deps == [dag.SHARDS, "data/raw/teachers/model_cifar_wrn.pt"]
    default = [j for j in dag.jobs(load_params(ROOT / "params.yaml")) if j.stage == "teacher"]
    assert [j.deps for j in default] == [[dag.SHARDS], [dag.SHARDS]]


def test_a_student_without_a_teacher_is_bounded_against_every_teacher():
    params = load_params(ROOT / "params.yaml")
    by_name = {j.name: j for j in dag.jobs(params)}
    for t in params.teachers:
        st = by_name[f"bounds-st--small_cnn--s0--vs--{t}"]
        assert dag.model_path(t) in st.deps and st.args["teacher"] == t
        assert st.outs == [dag.bounds_path("st--small_cnn--s0", t)]
    kd = by_name["bounds-trades--kd--small_cnn--s0"]
    assert dag.model_path("trades") in kd.deps and dag.model_path("pgdat") not in kd.deps


def test_a_new_method_flows_through_schema_dag_and_report():
    """One table entry and its loss class: params accept it, the DAG trains it from the
    teacher's cached signals when it is cacheable, and the report names it, with no other
    edit."""
    from kdiga.losses import KDLoss
    from kdiga.methods import KD, register, unregister
    from pipeline.stages import report

    class HalfKD(KDLoss):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            return out | {"loss": out["loss"] / 2}

    register(dataclasses.replace(KD, name="halfkd", label="Half-KD", loss=HalfKD))
    try:
        raw = _with_signals()
        raw["distill"]["methods"] = ["st", "kd", "halfkd"]
        params = validate(raw)
        jobs = {j.name: j for j in dag.jobs(params)}
        job = jobs["distill-trades--halfkd--small_cnn--s0"]
        assert dag.signals_path("trades") in job.deps
        assert {"distill.ce_weight", "distill.temperature", "signals"} <= set(job.params)
        assert "attack-pgdat--halfkd--small_cnn--s0--pgd" in jobs
        cell = next(c for c in report.cells(params)["pgdat"] if c.method == "halfkd")
        assert report.model_label(params, cell, None) == "pgdat -Half-KD-> small_cnn"
        assert "halfkd" in dag.dvc_yaml(params)
    finally:
        unregister("halfkd")
    with pytest.raises(ParamError, match=r"distill\.methods\[2\] = 'halfkd' is not allowed"):
        validate(raw)


def _torch_modules_after(code: str) -> str:
    """The torch and torchvision modules a fresh interpreter holds after running ``code``."""
    code += "\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_the_schema_and_the_dag_load_without_torch():
    """A dry run, `python -m pipeline.dag` and the hand-offs read tables (the method table,
    the model names, the option lists) and build nothing: importing torch would cost them
    about 2 s each, several times per Snakemake run."""
    code = (
        "from pipeline import dag, plan, provenance, status, sync\n"
        "from pipeline.params import load_params\n"
        "for f in ('params.yaml', 'configs/cifar10.yaml', 'configs/imagenet.yaml'):\n"
        "    p = load_params(f, build=False)\n"
        "    dag.dvc_yaml(p)\n"
        "    provenance.freshness(p)"
    )
    assert _torch_modules_after(code) == "[]"


@pytest.mark.parametrize("params_file", list(PRESET_JOBS))
def test_a_stage_finds_its_job_from_its_key_alone(params_file, monkeypatch):
    """dag.job builds one job from its stage and key: the same job as the table's, without
    building the table (a stage looks itself up this way); a key not in the grid: None."""
    params = load_params(ROOT / params_file, build=False)
    table = dag.jobs(params)
    monkeypatch.setattr(dag, "jobs", None)  # a lookup that built the table would fail here
    for job in table:
        assert dag.job(params, job.stage, job.key) == job
    teacher = next(iter(params.teachers))
    for stage, key in [
        ("distill", f"{teacher}--kd--nobody--s0"),
        ("distill", f"{teacher}--kd--{next(iter(params.students))}--s99"),
        ("attack", f"{teacher}--fgsm"),
        ("teacher", "nobody"),
        ("bounds", f"{teacher}--vs--{teacher}"),
        ("report", "x"),
        ("nonsense", None),
    ]:
        assert dag.job(params, stage, key) is None, (stage, key)


@pytest.mark.parametrize("params_file", list(PRESET_JOBS))
def test_the_job_that_writes_a_file_is_found_from_its_path(params_file):
    """dag.producer finds, from a path alone, the same job as the table's for every output
    of every job, and no job for a file the study reads but does not write."""
    params = load_params(ROOT / params_file, build=False)
    table = dag.jobs(params)
    written = {out: job for job in table for out in job.outputs}
    for out, job in written.items():
        assert dag.producer(params, out) == job, out
    read_only = {d for job in table for d in job.deps} - set(written)
    for dep in read_only | {"data/models/nobody.safetensors", "data/evals/x.json", "README.md"}:
        assert dag.producer(params, dep) is None, dep


def test_the_stage_entry_hands_off_before_torch_loads_and_names_the_stages():
    """`python -m pipeline.stages <stage>` (every job's command) imports no torch before it
    hands the job to the fork server; an unknown stage gets one line naming the stages."""
    assert _torch_modules_after("import pipeline.stages.__main__") == "[]"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.stages", "distil", "--model", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown stage 'distil'; the stages: " + ", ".join(dag.STAGES) in proc.stderr
    assert "Traceback" not in proc.stderr
