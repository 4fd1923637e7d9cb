"""Snakemake and DVC on one study at a time (pipeline/runners.py): each refuses to start
while the other holds the study, in one line, and changes nothing."""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path

import pytest
from tiny_study import bin_path, copy_study, run

from pipeline import runners


def _hold(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+b")  # noqa: SIM115 (the caller closes it)
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fh


def test_dvc_holds_only_while_its_lock_is_held(tmp_path):
    assert not runners.dvc_holds(tmp_path)  # no repository
    lock = tmp_path / runners.DVC_LOCK
    fh = _hold(lock)
    try:
        assert runners.dvc_holds(tmp_path)
        with pytest.raises(runners.StudyBusyError, match=r"DVC holds this study \(\.dvc/tmp/lock"):
            runners.refuse_if_dvc_runs(tmp_path)
    finally:
        fh.close()
    assert lock.exists() and not runners.dvc_holds(tmp_path)
    runners.refuse_if_dvc_runs(tmp_path)


def test_a_job_beside_a_snakemake_run_stops_unless_it_is_one_of_its_jobs(tmp_path, monkeypatch):
    monkeypatch.delenv(runners.RUNNER_ENV, raising=False)
    runners.refuse_if_snakemake_runs(tmp_path)
    (tmp_path / runners.SNAKEMAKE_LOCKS).mkdir(parents=True)
    runners.refuse_if_snakemake_runs(tmp_path)  # an empty folder: no run
    (tmp_path / runners.SNAKEMAKE_LOCKS / "0.input.lock").write_text("data/x\n")
    with pytest.raises(runners.StudyBusyError, match="snakemake --unlock"):
        runners.refuse_if_snakemake_runs(tmp_path)
    monkeypatch.setenv(runners.RUNNER_ENV, runners.SNAKEMAKE)
    runners.refuse_if_snakemake_runs(tmp_path)


@pytest.mark.slow
def test_snakemake_and_dvc_refuse_to_run_beside_each_other(tiny_study_built, tmp_path):
    study = copy_study(tiny_study_built, tmp_path / "study")
    report = study / "reports" / "report.md"
    before = report.read_bytes(), report.stat().st_mtime_ns
    # DVC holds the study: Snakemake stops before any job
    fh = _hold(study / runners.DVC_LOCK)
    try:
        snakemake = [bin_path("snakemake"), "--cores", "1", "--forcerun", "report"]
        proc = run(snakemake, study, check=False)
    finally:
        fh.close()
    assert proc.returncode != 0
    assert "DVC holds this study" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (report.read_bytes(), report.stat().st_mtime_ns) == before
    # a Snakemake run holds the study: DVC's job and a hand-run job stop in one line
    (study / runners.SNAKEMAKE_LOCKS).mkdir(parents=True, exist_ok=True)
    (study / runners.SNAKEMAKE_LOCKS / "0.output.lock").write_text("reports/report.md\n")
    proc = run([sys.executable, "-m", "pipeline.stages", "report"], study, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "snakemake --unlock" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (report.read_bytes(), report.stat().st_mtime_ns) == before
    proc = run([bin_path("dvc"), "repro", "--single-item", "--force", "report"], study, check=False)
    assert proc.returncode != 0
    assert "a Snakemake run holds this study" in proc.stdout + proc.stderr
    assert (report.read_bytes(), report.stat().st_mtime_ns) == before  # kept (persist)
