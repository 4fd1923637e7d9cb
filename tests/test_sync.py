"""pipeline.sync --dvc records stages in dvc.lock in one write through DVC's API."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_study import copy_study

from pipeline import sync

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]

STAGES = {
    "stages": {
        name: {"cmd": f"cp in.txt {name}.txt", "deps": ["in.txt"], "outs": [f"{name}.txt"]}
        for name in ("a", "b", "c")
    }
}


def _repo(path: Path) -> Path:
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=path, check=True)
    (path / "in.txt").write_text("data\n")
    for name in STAGES["stages"]:
        (path / f"{name}.txt").write_text("data\n")
    (path / "dvc.yaml").write_text(yaml.safe_dump(STAGES))
    return path


def test_recording_writes_the_lock_once_and_drops_stages_gone_from_dvc_yaml(tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    stale = {"cmd": "echo gone", "outs": [{"path": "gone.txt", "md5": "0" * 32, "size": 1}]}
    (repo / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"gone": stale}}))
    writes = []
    write = sync.atomic_write_text

    def counted(text, path):
        writes.append(str(path))
        return write(text, path)

    monkeypatch.setattr(sync, "atomic_write_text", counted)
    monkeypatch.chdir(repo)
    sync._commit_once(["a", "b", "c"])
    assert [Path(w).name for w in writes] == ["dvc.lock"]  # one write for the three stages
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == ["a", "b", "c"]  # "gone" is not in dvc.yaml any more
    assert lock["stages"]["a"]["deps"][0]["path"] == "in.txt"
    status = subprocess.run(
        [str(BIN / "dvc"), "status"], cwd=repo, capture_output=True, text=True, check=True
    )
    assert "up to date" in status.stdout


def test_recording_some_stages_keeps_the_others_entries(tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    monkeypatch.chdir(repo)
    sync._commit_once(["a", "b", "c"])
    before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    (repo / "in.txt").write_text("changed\n")
    (repo / "a.txt").write_text("changed\n")
    sync._commit_once(["a"])
    after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert after["b"] == before["b"] and after["c"] == before["c"]
    assert after["a"] != before["a"]


@pytest.mark.slow
def test_a_recording_killed_at_any_point_leaves_the_old_lock_or_the_new(tmp_path):
    """kill -9 of the recording at any moment: dvc.lock is the old file or the new one, byte
    for byte, never a part of either."""
    repo = _repo(tmp_path)
    record = [sys.executable, "-c", "from pipeline import sync; sync._commit_once(['a', 'b', 'c'])"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(record, cwd=repo, env=env, check=True)
    versions = {(repo / "dvc.lock").read_bytes()}
    for i, delay in enumerate([0.3, 0.6, 0.8, 0.9, 1.0, 1.1, 1.3, 1.6, 2.0, 3.0]):
        (repo / "in.txt").write_text(f"version {i}\n")
        proc = subprocess.Popen(record, cwd=repo, env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lock = (repo / "dvc.lock").read_bytes()
        assert yaml.safe_load(lock)["stages"].keys() == {"a", "b", "c"}
        versions.add(lock)
    subprocess.run(record, cwd=repo, env=env, check=True)  # and the next recording works
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["a"]["deps"][0]["size"] == 10
    assert len(versions) > 1  # some recordings got through before they were killed


@pytest.mark.parametrize("broken", [b"", b"stages: [\n", b"just text\n"])
def test_an_empty_or_broken_lock_is_set_aside_and_written_again(
    tmp_path, monkeypatch, capsys, broken
):
    repo = _repo(tmp_path)
    monkeypatch.chdir(repo)
    (repo / "dvc.lock").write_bytes(broken)
    sync._commit_once(["a", "b", "c"])
    assert (repo / "dvc.lock.broken").read_bytes() == broken
    assert "dvc.lock was empty or unreadable (moved to dvc.lock.broken)" in capsys.readouterr().err
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == ["a", "b", "c"]


def test_an_unreadable_rwlock_left_by_a_killed_dvc_is_reset(tmp_path, monkeypatch, capsys):
    repo = _repo(tmp_path)
    monkeypatch.chdir(repo)
    (repo / ".dvc" / "tmp").mkdir(exist_ok=True)
    (repo / ".dvc" / "tmp" / "rwlock").write_text('{"write": {"a.txt": {"pid"')
    sync._commit_once(["a", "b", "c"])
    json.loads((repo / ".dvc" / "tmp" / "rwlock").read_text())  # readable again
    assert "rwlock was unreadable (a killed DVC run): reset" in capsys.readouterr().err
    assert sorted(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == ["a", "b", "c"]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["cache", "lock"])
def test_a_full_disk_during_sync_is_one_line_and_keeps_the_lock(
    tiny_study_built, tmp_path, monkeypatch, capsys, where
):
    """No space left while DVC copies the outputs into its cache (DVC logs the failed copy,
    then raises "No possible cache link types"), or while dvc.lock is written: one line,
    exit 1, dvc.lock as it was."""
    import dvc_objects.fs.local as local

    study = copy_study(tiny_study_built, tmp_path / "study")
    shutil.rmtree(study / ".dvc" / "cache", ignore_errors=True)  # every output copied again
    lock = (study / "dvc.lock").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "cache":
        monkeypatch.setattr(local.LocalFileSystem, "put_file", full)
    else:
        monkeypatch.setattr(sync, "_write_lock", full)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")  # dvc, as in a venv
    monkeypatch.chdir(study)
    assert sync.main(["--dvc", "--quiet"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert lines == [
        "ERROR: dvc commit: the disk is full (no space left to copy the outputs into DVC's "
        "cache, .dvc/cache, or to write dvc.lock); dvc.lock is as it was: free space, then run "
        "`python -m pipeline.sync --dvc` again"
    ], err
    assert "Traceback" not in err
    assert (study / "dvc.lock").read_bytes() == lock


@pytest.mark.slow
def test_a_model_file_edited_after_its_job_is_not_recorded(
    tiny_study_built, tmp_path, monkeypatch, capsys
):
    """A student's weights changed after its job wrote them (the header and mtime kept): its
    provenance still matches, but sync --dvc refuses to record those bytes as the job's
    output, in one line naming the job and both hashes, and exits 1; dvc.lock keeps the
    job's entry as it was."""
    from test_hostile_inputs import flip_weight_byte

    study = copy_study(tiny_study_built, tmp_path / "study")
    sid = "st--small_cnn--s0"
    stage = f"distill-{sid}"
    before = yaml.safe_load((study / "dvc.lock").read_text())["stages"][stage]
    flip_weight_byte(study / "data" / "models" / f"{sid}.safetensors")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")  # dvc, as in a venv
    monkeypatch.chdir(study)
    assert sync.main(["--dvc", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert (
        f"not recorded in dvc.lock: {stage}: data/models/{sid}.safetensors: its tensors have sha256"
    ) in err
    assert "its header records" in err and f"re-run its job '{stage}'" in err
    assert yaml.safe_load((study / "dvc.lock").read_text())["stages"][stage] == before
