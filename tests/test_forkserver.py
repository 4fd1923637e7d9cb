"""The fork server (pipeline.forkserver): a job run by a warm child behaves as the job run by
itself (exit code, streams, working directory, environment, files), and follows its job's
process (signals passed on; a job killed with SIGKILL takes its child with it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import forkserver

ROOT = Path(__file__).resolve().parents[1]

#: a job: reports who ran it and where, writes a file, then does what argv[1] says
PROBE = textwrap.dedent(
    """
    import json, os, sys, time
    from pipeline.forkserver import stage_main

    def main():
        mode = sys.argv[1]
        record = {"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv[1:],
                  "env": os.environ.get("PROBE_VALUE"), "umask": os.umask(0),
                  "torch": "torch" in sys.modules,
                  "child": os.environ.get("KDIGA_FORKSERVER_CHILD")}
        with open("record.json", "w") as fh:
            json.dump(record, fh)
        print("to stdout", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        if mode == "fail":
            raise RuntimeError("the job went wrong")
        if mode == "sleep":
            time.sleep(60)
        return int(mode)

    if __name__ == "__main__":
        raise SystemExit(stage_main("probe", main))
    """
)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A folder for this module's fork server (one server, shared by the tests that leave it
    running); the server is stopped at the end."""
    folder = tmp_path_factory.mktemp("servers")
    yield folder
    env = dict(os.environ, KDIGA_FORKSERVER_DIR=str(folder))
    subprocess.run([sys.executable, "-m", "pipeline.forkserver", "--stop"], env=env, check=True)


@pytest.fixture
def job(tmp_path, servers):
    """Run the probe job in ``tmp_path/work``, through the module's server when ``served``."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "probe.py").write_text(PROBE)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(
        os.environ,
        PYTHONPATH=f"{tmp_path / 'code'}:{ROOT}",
        PROBE_VALUE="from the job",
        KDIGA_FORKSERVER_DIR=str(servers),
        KDIGA_FORKSERVER_IDLE="30",
    )
    env.pop("KDIGA_FORKSERVER_CHILD", None)

    def start(mode: str, served: bool) -> subprocess.Popen:
        env[forkserver.ENABLE_ENV] = "1" if served else "0"
        return subprocess.Popen(
            [sys.executable, "-m", "probe", mode],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(mode: str, served: bool) -> tuple[subprocess.Popen, dict]:
        proc = start(mode, served)
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=120)
        return proc, json.loads((work / "record.json").read_text())

    run.start, run.work, run.env = start, work, env
    return run


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("mode", ["0", "3", "fail"])
def test_a_served_job_behaves_as_the_job_run_by_itself(job, mode):
    alone, alone_record = job(mode, served=False)
    job(mode, served=True)  # the first served job may find no server yet, and start one
    served, record = job(mode, served=True)
    assert record["pid"] != served.pid and record["child"] == "1"  # a child of the server ran it
    assert record["torch"] and not alone_record["torch"]  # imported before the job began
    assert alone_record["child"] is None and alone_record["pid"] == alone.pid
    assert served.returncode == alone.returncode == (1 if mode == "fail" else int(mode))
    assert served.stdout_text == alone.stdout_text == "to stdout\n"
    assert served.stderr_text.startswith("to stderr\n")
    if mode == "fail":  # the traceback a job prints when it fails
        assert "RuntimeError: the job went wrong" in served.stderr_text
        assert served.stderr_text.count("Traceback") == alone.stderr_text.count("Traceback") == 1
    else:
        assert served.stderr_text == alone.stderr_text
    for key in ("cwd", "argv", "env", "umask"):
        assert record[key] == alone_record[key], key


def test_without_the_variable_a_job_runs_itself(job):
    proc, record = job("0", served=False)
    assert proc.returncode == 0 and record["child"] is None and not record["torch"]


def test_a_job_killed_with_sigkill_takes_its_child_with_it(job):
    job("0", served=True)  # a server is up
    proc = job.start("sleep", served=True)
    record_file = job.work / "record.json"
    deadline = time.monotonic() + 60
    while not record_file.exists() or json.loads(record_file.read_text())["argv"] != ["sleep"]:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    child = json.loads(record_file.read_text())["pid"]
    assert child != proc.pid and _alive(child)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _gone_within(child, 5.0), "the child outlived its job"


def test_sigterm_to_the_job_reaches_the_child(job):
    job("0", served=True)
    proc = job.start("sleep", served=True)
    record_file = job.work / "record.json"
    deadline = time.monotonic() + 60
    while not record_file.exists() or json.loads(record_file.read_text())["argv"] != ["sleep"]:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    child = json.loads(record_file.read_text())["pid"]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM  # the job ends as its child did
    assert _gone_within(child, 5.0)


def test_a_stopped_server_leaves_jobs_to_run_themselves(job, servers):
    """`--stop` removes the socket: the next job starts a server again (its new socket)."""
    job("0", served=True)
    (before,) = servers.glob("*.sock")
    subprocess.run([sys.executable, "-m", "pipeline.forkserver", "--stop"], env=job.env, check=True)
    assert not before.exists()
    proc, record = job("0", served=True)
    assert proc.returncode == 0 and record["child"] == "1" and before.exists()


def test_the_server_ends_when_idle(tmp_path):
    path = tmp_path / "s.sock"
    env = dict(os.environ, PYTHONPATH=str(ROOT), KDIGA_FORKSERVER_IDLE="0.5")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.forkserver", "--serve", str(path)], env=env, timeout=120
    )
    assert proc.returncode == 0 and not path.exists()
