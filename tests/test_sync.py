"""pipeline.sync --dvc records stages in dvc.lock in one write through DVC's API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from pipeline import sync

BIN = Path(sys.executable).parent

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
    from dvc.dvcfile import Lockfile

    repo = _repo(tmp_path)
    stale = {"cmd": "echo gone", "outs": [{"path": "gone.txt", "md5": "0" * 32, "size": 1}]}
    (repo / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"gone": stale}}))
    writes = []
    dump = Lockfile.dump_stages

    def counted(self, stages, **kwargs):
        writes.append([s.name for s in stages])
        return dump(self, stages, **kwargs)

    monkeypatch.setattr(Lockfile, "dump_stages", counted)
    monkeypatch.chdir(repo)
    sync._commit_once(["a", "b", "c"])
    assert writes == [["a", "b", "c"]]  # one write for the three stages
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
