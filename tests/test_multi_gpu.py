"""Several GPUs per distill job: the param, the DAG's gpu resource, the torchrun launch (one
node, in held slots; several nodes, under srun), the SLURM mapping. CPU only, no network."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline import dag, launch
from pipeline.params import ParamError, load_params, parse_student_id, validate
from pipeline.stages import common, distill

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KDIGA = "pgdat--kdiga--small_cnn--s0"


def _raw(**distill_keys) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["distill"].update(distill_keys)
    return raw


# --- the param and the job table --------------------------------------------------------------


def test_default_params_give_one_gpu_per_job_and_an_unchanged_dvc_yaml():
    params = load_params(ROOT / "params.yaml")
    assert params.distill.gpus_per_job == 1
    jobs = dag.jobs(params)
    assert {j.stage: j.gpus for j in jobs} == {
        "shard": 0,
        "teacher": 1,
        "distill": 1,
        "attack": 1,
        "bounds": 1,
        "bounds_teacher": 1,
        "report": 0,
    }
    assert not any("distill.gpus_per_job" in j.params for j in jobs)
    assert dag.check_fresh(ROOT / "params.yaml", ROOT / "dvc.yaml") is None
    without_key = _raw()
    del without_key["distill"]["gpus_per_job"]
    assert dag.dvc_yaml(validate(without_key)) == (ROOT / "dvc.yaml").read_text()


def test_gpus_per_job_reaches_the_distill_jobs_only():
    base = {j.name: j for j in dag.jobs(validate(_raw()))}
    params = validate(_raw(gpus_per_job=4))
    four = {j.name: j for j in dag.jobs(params)}
    assert set(four) == set(base)
    for name, job in four.items():
        if job.stage == "distill":
            assert job.gpus == 4 and "distill.gpus_per_job" in job.params, name
            assert "distill.gpus_per_job" in dag._dvc_stage(params, job)["params"]
        else:
            assert (job.gpus, job.params, job.cmd) == (
                base[name].gpus,
                base[name].params,
                base[name].cmd,
            ), name


@pytest.mark.parametrize("bad", [0, -2, 1.5, "4", True, 1025])
def test_gpus_per_job_must_be_an_int_from_1(bad):
    with pytest.raises(ParamError, match=r"distill\.gpus_per_job = .* expected an integer >= 1"):
        validate(_raw(gpus_per_job=bad))


def test_a_student_that_cannot_be_split_is_refused_before_any_worker_starts():
    params = validate(_raw(gpus_per_job=3))  # batch_size 64
    job = parse_student_id(params, KDIGA)
    with pytest.raises(ParamError, match=r"gpus_per_job = 3 .*not divisible by world size 3"):
        distill.check_world(params, job, 3)
    distill.check_world(params, job, 4)
    frob = _raw(gpus_per_job=4)
    frob["distill"]["iga"]["reduction"] = "batch_frobenius"
    params = validate(frob)
    with pytest.raises(ParamError, match="batch_frobenius"):
        distill.check_world(params, parse_student_id(params, KDIGA), 4)
    distill.check_world(params, parse_student_id(params, "pgdat--kd--small_cnn--s0"), 4)


# --- one node: torchrun in held slots ---------------------------------------------------------


def test_torchrun_command_for_four_gpus():
    argv = distill.stage_argv(argparse.Namespace(model=KDIGA, params=None, log="logs/x.log"))
    assert argv == ["--model", KDIGA, "--log", "logs/x.log"]
    assert launch.torchrun_command("pipeline.stages.distill", argv, 4, python="py") == [
        "py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "4",
        "-m",
        "pipeline.stages.distill",
        "--",
        "--model",
        KDIGA,
        "--log",
        "logs/x.log",
    ]
    assert launch.torchrun_command("m", [], 1)[0] == sys.executable
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="nproc must be an int >= 1"):
            launch.torchrun_command("m", [], bad)


def test_torchrun_hands_the_stage_its_own_arguments():
    """torchrun's own parser (as `python -m torch.distributed.run` runs it) leaves the stage's
    arguments alone, `--log` included, and the stage reads them back."""
    from torch.distributed.run import get_args_parser

    argv = ["--model", KDIGA, "--log", "logs/distill/x.log", "--params", "p.yaml"]
    cmd = launch.torchrun_command("pipeline.stages.distill", argv, 4)
    args = get_args_parser().parse_args(cmd[3:])
    assert (args.standalone, args.nproc_per_node, args.module) == (True, "4", True)
    assert args.training_script == "pipeline.stages.distill"
    seen = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill, "run", lambda stage, d, body, a, add: seen.setdefault("argv", a))
        distill.main(list(args.training_script_args))
    assert seen["argv"] == argv
    with pytest.raises(SystemExit):  # why the separator: --log is ambiguous to torchrun
        get_args_parser().parse_args([*cmd[3:7], "-m", "pipeline.stages.distill", *argv])


_CHILD = """
import fcntl, json, os, sys
from pathlib import Path

locked = []
for lock in sorted(Path(os.environ["KDIGA_GPU_LOCK_DIR"]).glob("gpu*.lock")):
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        locked.append(lock.name)
    os.close(fd)
names = ("CUDA_VISIBLE_DEVICES", "KDIGA_LOG_APPEND")
Path(sys.argv[1]).write_text(json.dumps({"locked": locked} | {n: os.environ.get(n) for n in names}))
"""


def test_run_torchrun_runs_its_command_inside_the_held_devices(monkeypatch, tmp_path):
    """The command (here a stand-in for torchrun) runs holding N devices of the pool."""
    out = tmp_path / "child.json"
    monkeypatch.setenv("KDIGA_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "7,5,6")
    for name in ("CUDA_VISIBLE_DEVICES", "KDIGA_GPU_HELD", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    stand_in = [sys.executable, "-c", textwrap.dedent(_CHILD), str(out)]
    monkeypatch.setattr(launch, "torchrun_command", lambda module, argv, n: stand_in)
    assert launch.run_torchrun("pipeline.stages.distill", ["--model", KDIGA], 2)
    child = json.loads(out.read_text())
    assert child["CUDA_VISIBLE_DEVICES"] == "5,6"  # two of the pool, in sorted order
    assert child["locked"] == ["gpu5.lock", "gpu6.lock"]  # held while it runs
    assert child["KDIGA_LOG_APPEND"] == "1"
    from pipeline.gpu import gpu_slots

    with gpu_slots(3, timeout=0):  # and released after
        pass


def test_run_torchrun_without_a_gpu_runs_nothing_and_a_failure_is_one_error(monkeypatch):
    monkeypatch.setenv("KDIGA_GPU_SLOTS", "0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("KDIGA_GPU_HELD", raising=False)
    assert launch.run_torchrun("no_such_module", [], 4) is False
    monkeypatch.setattr("pipeline.gpu.run_in_slots", lambda cmd, n, extra_env: 1)
    with pytest.raises(launch.LaunchError, match="exited with status 1"):
        launch.run_torchrun("pipeline.stages.distill", ["--model", KDIGA], 2)
    assert issubclass(launch.LaunchError, common.KdigaError)  # one line, no traceback


@pytest.fixture
def _restore_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], root.level = saved


@pytest.mark.usefixtures("_restore_logging")
def test_only_rank_0_writes_the_log_and_a_launched_rank_0_adds_to_it(monkeypatch, tmp_path):
    path = tmp_path / "logs" / "distill.log"
    for name in ("RANK", common.LOG_APPEND_ENV):
        monkeypatch.delenv(name, raising=False)
    common._setup_logging(str(path))  # the launcher: a fresh file
    common.log.info("launcher line")
    monkeypatch.setenv("RANK", "1")
    common._setup_logging(str(path))
    common.log.info("rank 1 line")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(common.LOG_APPEND_ENV, "1")
    common._setup_logging(str(path))
    common.log.info("rank 0 line")
    lines = path.read_text().splitlines()
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["launcher line", "rank 0 line"]
    assert "[rank 0] kdiga.pipeline" in lines[1]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv(common.LOG_APPEND_ENV)
    common._setup_logging(str(path))  # a plain run starts the file afresh
    assert path.read_text() == ""


# --- several nodes: torchrun under srun -------------------------------------------------------


def test_srun_command_and_sbatch_script_for_two_nodes_of_four():
    line = launch.srun_command(
        "pipeline.stages.distill", ["--model", KDIGA], nnodes=2, nproc_per_node=4, port=29400
    )
    assert line == (
        "srun --ntasks-per-node=1 python -m torch.distributed.run --nnodes 2 --nproc-per-node 4 "
        '--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:29400" --rdzv-id "$SLURM_JOB_ID" '
        f"-m pipeline.stages.distill -- --model {KDIGA}"
    )
    script = launch.sbatch_script(KDIGA, nnodes=2, nproc_per_node=4)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4"} <= set(
        lines
    )
    master = 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    assert master in lines
    assert lines[-1].endswith(f"-- --model {KDIGA} --log {dag.log_path('distill', KDIGA)}")
    assert '"$MASTER_ADDR:29500"' in lines[-1]
    with pytest.raises(ValueError, match="port must be"):
        launch.srun_command("m", [], nnodes=2, nproc_per_node=4, port=0)


def test_launch_cli_splits_gpus_per_job_over_the_nodes(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_raw(gpus_per_job=8), sort_keys=False))
    assert launch.main([KDIGA, "--nnodes", "2", "--params", str(path)]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=4" in out and "--nnodes 2 --nproc-per-node 4" in out
    assert f"--params {path}" in out
    assert launch.main([KDIGA, "--nnodes", "3", "--params", str(path)]) == 2
    assert "gpus_per_job = 8 is not allowed; it must be a multiple of --nnodes 3" in (
        capsys.readouterr().err
    )
    assert launch.main(["nobody--s0", "--nnodes", "2", "--params", str(path)]) == 2


# --- Snakemake and SLURM ----------------------------------------------------------------------


def _dry_run_resources(tmp_path: Path, params: dict) -> list[tuple[str, str, dict]]:
    """`snakemake -n --profile profiles/slurm` in a copy: (rule, wildcards, resources) per job."""
    for name in ("Snakefile", "profiles"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    snakemake = BIN / "snakemake"
    if not snakemake.exists():
        pytest.skip("snakemake is not installed")
    env = dict(
        os.environ,
        KDIGA_PARAMS="params.yaml",
        PYTHONPATH=str(ROOT),
        PATH=f"{BIN}:{os.environ['PATH']}",
    )
    proc = subprocess.run(
        [str(snakemake), "-n", "--forceall", "--nolock", "--profile", "profiles/slurm"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs, rule, wildcards = [], None, ""
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule, wildcards = line.split()[1].rstrip(":"), ""
        elif line.strip().startswith("wildcards: "):
            wildcards = line.split(": ", 1)[1]
        elif line.strip().startswith("resources: ") and rule != "all":
            pairs = (kv.partition("=") for kv in line.split(": ", 1)[1].split(", "))
            res = {k: int(v) if v.isdigit() else v for k, _, v in pairs}
            jobs.append((rule, wildcards, res))
    return jobs


class _Resources(dict):
    """A job's resources as the SLURM plugin reads them (``.get`` and attributes)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _sbatch_args(resources: dict) -> list[str]:
    """The sbatch arguments snakemake-executor-plugin-slurm builds for a job's resources."""
    plugin = pytest.importorskip("snakemake_executor_plugin_slurm")
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command

    job = SimpleNamespace(resources=_Resources(resources), threads=1)
    params = {
        "run_uuid": "u",
        "slurm_logfile": "log",
        "comment_str": "c",
        "account": "",
        "partition": "-p gpu",
        "workdir": None,
    }
    return (get_submit_command(job, params) + plugin.utils.set_gres_string(job)).split()


@pytest.mark.slow
def test_slurm_profile_gives_a_four_gpu_student_four_gpus(tmp_path):
    """Snakemake's plan with distill.gpus_per_job: 4 and the SLURM profile: every job's gpu
    resource is the table's, and the plugin turns the students' into `--gpus=4`."""
    raw = _raw(gpus_per_job=4)
    table = {(j.stage, j.key): j.gpus for j in dag.jobs(validate(raw))}
    planned = _dry_run_resources(tmp_path, raw)
    assert len(planned) == len(table)
    for rule, wildcards, res in planned:
        key = wildcards.split("=", 1)[1] if wildcards else None
        if rule == "attack":
            key = "{model}--{attack}".format(**dict(w.split("=") for w in wildcards.split(", ")))
        assert res.get("gpu", 0) == table[rule, key], (rule, key, res)
    student = next(res for rule, _, res in planned if rule == "distill")
    args = _sbatch_args(student)
    assert {"--gpus=4", "--cpus-per-gpu=8", "--nodes=1"} <= set(args)
    attack = _sbatch_args(next(res for rule, _, res in planned if rule == "attack"))
    assert {"--gpus=1", "--cpus-per-gpu=8"} <= set(attack)
    shard = _sbatch_args(next(res for rule, _, res in planned if rule == "shard"))
    assert "--cpus-per-task=8" in shard and not any(a.startswith("--gpus") for a in shard)
