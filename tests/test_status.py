"""python -m pipeline.status: one row per job that is running, failed, stopped or to run, read
from the progress files beside the logs; jobs done and the device-hours left; and a real stage
job followed while it runs, then killed without a word."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_study import ROOT, TINY, env

from pipeline import dag
from pipeline.params import load_params
from pipeline.plan import Plan, Row
from pipeline.progress import FORMAT, iso, progress_path, read_progress
from pipeline.status import STALE_BEATS, job_row, main, status, study_rows

NOW = 1_800_000_000.0
KD = "pgdat--kd--small_cnn--s0"


@pytest.fixture
def study(tmp_path, monkeypatch):
    """The tiny study's params in an empty directory: every job still to run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDIGA_PARAMS", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    return load_params("params.yaml")


def job(params, name: str) -> dag.Job:
    return next(j for j in dag.jobs(params) if j.name == name)


def write_progress(j: dag.Job, **fields) -> None:
    info = {
        "format": FORMAT,
        "stage": j.stage,
        "job": j.name,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": iso(NOW - 600),
        "heartbeat": iso(NOW - 2),
        "heartbeat_s": 10.0,
        "state": "running",
        "task": "train",
        "done": 30,
        "total": 100,
        "unit": "steps",
        "rate": 0.1,
        "eta_s": 700.0,
        "step": "train 30/100 steps (epoch 3/10, step 0/10)",
        "error": None,
    } | fields
    path = Path(progress_path(j.stage, j.key))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))


def make_done(params, j: dag.Job) -> None:
    """``j``'s outputs, its record made by it from the current params."""
    record = {"job": j.name, "params": json.loads(dag.params_view(params, j.params))}
    for out in j.outputs:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if out == dag.SHARDS:
            Path(out).mkdir()
        elif out != j.record:
            Path(out).write_text("{}")
    Path(j.record).write_text(json.dumps({"provenance": record} if j.stage != "shard" else record))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_each_state_from_the_progress_files_and_the_outputs(study):
    params = study
    make_done(params, job(params, "shard"))
    write_progress(job(params, "shard"), state="done", task="shard test", done=120, total=120)
    write_progress(job(params, "teacher-pgdat"))
    write_progress(
        job(params, "distill-st--small_cnn--s0"),
        state="failed",
        heartbeat=iso(NOW - 300),
        error="NonFiniteLossError: non-finite loss at epoch 1, batch 3 (loss=nan)",
        step="train 3/14 steps (epoch 1/1, step 3/14)",
        done=3,
        total=14,
    )
    write_progress(
        job(params, f"distill-{KD}"), host="another-node", heartbeat=iso(NOW - STALE_BEATS * 10 - 1)
    )
    write_progress(job(params, "distill-pgdat--kdiga--small_cnn--s0"), pid=dead_pid())
    write_progress(job(params, "attack-pgdat--pgd"), state="done")  # its output is gone
    rows = {j.name: job_row(params, j, NOW) for j in dag.jobs(params)}

    assert rows["shard"].state == "done"
    running = rows["teacher-pgdat"]
    assert (running.state, running.progress) == ("running", "train 30/100 steps (30%)")
    assert (running.elapsed, running.eta) == (600, 698)  # the ETA as of now, 2 s after the beat
    assert running.where == "epoch 3/10, step 0/10"  # the progress column has the rest
    failed = rows["distill-st--small_cnn--s0"]
    assert (failed.state, failed.elapsed) == ("failed", 300)
    assert failed.progress == "train 3/14 steps (21%)"
    assert failed.where == (
        "failed at epoch 1/1, step 3/14: NonFiniteLossError: non-finite loss at epoch 1, "
        "batch 3 (loss=nan)"
    )
    silent = rows[f"distill-{KD}"]
    assert silent.state == "stopped"
    assert silent.where == "stopped at epoch 3/10, step 0/10; no heartbeat for 31 s"
    gone = rows["distill-pgdat--kdiga--small_cnn--s0"]
    assert gone.state == "stopped" and gone.where.endswith(" is gone") and gone.eta is None
    assert rows["attack-pgdat--pgd"].state == "to run"
    assert sum(r.state == "to run" for r in rows.values()) == len(rows) - 5

    text = status(params, now=NOW)
    assert "teacher-pgdat" in text and "\nshard " not in text  # done rows only with --all
    assert text.splitlines()[-2] == "jobs: 1 of 18 done; 1 running, 1 failed, 2 stopped, 13 to run"
    assert text.splitlines()[-1].endswith(
        ": unknown (no cost plan at logs/plan.json: "
        "`python -m pipeline.plan --json > logs/plan.json` "
        "writes one)"
    )
    assert "\nshard " in status(params, now=NOW, show_all=True)


def test_a_job_is_done_only_for_the_current_params(study):
    params = study
    shard = job(params, "shard")
    make_done(params, shard)
    assert job_row(params, shard, NOW).state == "done"
    changed = TINY | {"shard": TINY["shard"] | {"seed": 1}}
    Path("params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    assert job_row(load_params("params.yaml"), shard, NOW).state == "to run"


def test_a_job_whose_input_is_to_be_made_again_is_to_run(study):
    params = study
    make_done(params, job(params, "teacher-pgdat"))
    assert job_row(params, job(params, "teacher-pgdat"), NOW).state == "done"  # on its own
    teacher = next(r for r in study_rows(params, NOW) if r.job == "teacher-pgdat")
    assert (teacher.state, teacher.where) == ("to run", "after shard")
    make_done(params, job(params, "shard"))
    states = {r.job: r.state for r in study_rows(params, NOW)}
    assert states["shard"] == states["teacher-pgdat"] == "done"


def _plan(rows: dict[str, float]) -> None:
    plan = Plan(
        params="params.yaml",
        device="cpu",
        threads=1,
        clock="process CPU time",
        calibrate_steps=1,
        calibration_s=0.5,
        sizes={},
        rows=[
            Row(name, name.split("-")[0], "cpu", h, 0, "estimate", "") for name, h in rows.items()
        ],
    )
    Path("logs").mkdir(exist_ok=True)
    Path("logs/plan.json").write_text(json.dumps(plan.to_dict()))


def test_the_device_hours_left_come_from_the_cost_plan(study, capsys):
    params = study
    names = [j.name for j in dag.jobs(params)]
    _plan(dict.fromkeys(names, 0.5))
    write_progress(job(params, "teacher-pgdat"))
    assert main([]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (
        "device-hours of the 17 jobs not started: 8.5 h (8 h 30 min), from the cost plan "
        "logs/plan.json"
    )
    assert "plan 30 min 00 s" in status(params, now=NOW)  # each job's own, in the ETA column
    _plan(dict.fromkeys(names[:3], 0.25))  # shard, teacher (running) and one student
    last = status(params, now=NOW).splitlines()[-1]
    assert last == (
        "device-hours of the 17 jobs not started: at least 0.5 h (30 min 00 s); 15 of them "
        "not in the cost plan logs/plan.json, unknown"
    )


# -- a real job, followed and then killed ---------------------------------------------------


@pytest.fixture
def distilling(tiny_study_built, tmp_path):
    """A copy of the tiny study's params (with many epochs), shards and teacher."""
    study = tmp_path / "study"
    (study / "data" / "models").mkdir(parents=True)
    params = TINY | {"distill": TINY["distill"] | {"epochs": 1000}}
    (study / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(tiny_study_built / "data" / "shards", study / "data" / "shards")
    for name in ("pgdat.safetensors", "pgdat.json"):
        shutil.copy2(tiny_study_built / "data" / "models" / name, study / "data" / "models" / name)
    return study


def _status(study: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.status"],
        cwd=study,
        env=env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout


def _row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"{name} "))


@pytest.mark.slow
def test_a_running_job_shows_its_progress_and_a_killed_one_shows_stopped(distilling):
    study, name = distilling, f"distill-{KD}"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.stages",
        "distill",
        "--model",
        KD,
        "--log",
        dag.log_path("distill", KD),
    ]
    progress = study / progress_path("distill", KD)
    proc = subprocess.Popen(
        cmd,
        cwd=study,
        env=env(PYTHONPATH=str(ROOT), KDIGA_HEARTBEAT="2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while (info := read_progress(progress)) is None or not info["done"]:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no training step reported"
            time.sleep(0.2)
        assert (info["state"], info["task"], info["unit"]) == ("running", "train", "steps")
        row = _row(_status(study), name)
        assert row.split()[1:3] == ["distill", "running"] and " train " in row
        assert " steps (" in row and "  epoch " in row  # progress, then where it is
    finally:
        proc.send_signal(signal.SIGKILL)  # no word: no handler runs, no file is written
        proc.wait()
    last = read_progress(progress)
    assert last["state"] == "running" and 0 < last["done"] < last["total"]
    step = re.fullmatch(
        r"train (\d+)/(\d+) steps \(epoch (\d+)/1000, step (\d+)/(\d+)\)", last["step"]
    )
    done, total, epoch, at, per_epoch = map(int, step.groups())
    assert total == 1000 * per_epoch and done == (epoch - 1) * per_epoch + at
    row = _row(_status(study), name)
    assert row.split()[2:6] == ["stopped", "train", f"{done}/{total}", "steps"]
    assert row.endswith(
        f"stopped at epoch {epoch}/1000, step {at}/{per_epoch}; pid {last['pid']} is gone"
    )
