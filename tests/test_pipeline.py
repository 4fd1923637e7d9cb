"""End to end, as a user runs it: Snakemake, then DVC, on a tiny study in a fresh git repo.

One module-scoped study (digits at 8x8, one epoch, three methods, two radii) is built once
by Snakemake; the tests then check the outputs, that DVC sees Snakemake's work as done,
that changing an attack radius re-runs only the attack stages and after, and that a bad
params file stops before any job with one clear message.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_study import BIN, ROOT, TINY, env

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env(PYTHONPATH=str(cwd)), capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def write_params(study: Path, params: dict) -> None:
    (study / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([sys.executable, "-m", "pipeline.dag"], study)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A fresh git + DVC repo holding the tiny study, built once by Snakemake."""
    path = tmp_path_factory.mktemp("study")
    shutil.copy(ROOT / "Snakefile", path / "Snakefile")
    for code in ("pipeline", "kdiga"):  # a clone: DVC tracks the code as dependencies
        shutil.copytree(ROOT / code, path / code, ignore=shutil.ignore_patterns("__pycache__"))
    run(["git", "init", "-q"], path)
    run(["git", "config", "user.email", "ci@example.invalid"], path)
    run(["git", "config", "user.name", "ci"], path)
    run([str(BIN / "dvc"), "init", "-q"], path)
    (path / ".gitignore").write_text("/data/\n/logs/\n/reports/\n.snakemake/\n__pycache__/\n")
    write_params(path, TINY)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "tiny study"], path)
    run([str(BIN / "snakemake"), "--cores", "2"], path)
    return path


def test_snakemake_builds_the_report(study):
    report = (study / "reports" / "report.md").read_text()
    assert "Accuracy (%) under 3-step PGD" in report
    assert "AutoAttack (custom: apgd-ce; 1 restart(s); 20 iterations)" in report
    assert "Table 4" in report
    assert (study / "reports" / "figure1.png").stat().st_size > 1000
    metrics = json.loads((study / "reports" / "metrics.json").read_text())
    for mid in ("teacher", "small_cnn--st", "small_cnn--kd", "small_cnn--kdiga"):
        assert 0 <= metrics[mid]["pgd"]["0.1"] <= metrics[mid]["clean"] <= 1
    assert "bounds" in metrics["small_cnn--kdiga"]


def test_dvc_sees_snakemake_work_as_done(study):
    status = run([str(BIN / "dvc"), "status"], study).stdout
    assert "up to date" in status, status


def test_changing_a_radius_reruns_only_attacks_and_after(study):
    before = {p.name: p.stat().st_mtime_ns for p in (study / "data" / "models").glob("*.pt")}
    params = json.loads(json.dumps(TINY))
    params["attack"]["radii"] = [0.05, 0.15]
    write_params(study, params)
    out = run([str(BIN / "dvc"), "repro"], study).stdout
    after = {p.name: p.stat().st_mtime_ns for p in (study / "data" / "models").glob("*.pt")}
    assert before == after, "distillation or teacher re-ran"
    assert "Running stage 'attack@small_cnn--kd--pgd'" in out
    assert "Running stage 'distill" not in out and "Running stage 'teacher'" not in out
    metrics = json.loads((study / "reports" / "metrics.json").read_text())
    assert "0.15" in metrics["small_cnn--kd"]["pgd"]
    assert "up to date" in run([str(BIN / "dvc"), "status"], study).stdout


def test_snakemake_after_dvc_has_nothing_to_do(study):
    """Snakemake re-runs a job whose params changed since *it* last ran it; after DVC ran
    them, `snakemake --touch` (the README's hand-off) adopts DVC's outputs, running nothing."""
    before = {p.name: p.read_bytes() for p in (study / "data" / "evals").glob("*.json")}
    run([str(BIN / "snakemake"), "--touch", "--cores", "1"], study)
    after = {p.name: p.read_bytes() for p in (study / "data" / "evals").glob("*.json")}
    assert before == after
    proc = run([str(BIN / "snakemake"), "-n", "--cores", "1"], study)
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    assert "up to date" in run([str(BIN / "dvc"), "status"], study).stdout


def test_teacher_signals_stage_serves_the_grid(study):
    """signals.enabled: Snakemake adds the signals job and the served students retrain from
    its file without running the teacher; st keeps its model; DVC sees it all as done."""
    from kdiga.models import load_model

    models = study / "data" / "models"
    before = {p.name: p.read_bytes() for p in models.glob("*.pt")}
    params = json.loads(json.dumps(TINY))
    params["signals"]["enabled"] = True
    write_params(study, params)
    proc = run([str(BIN / "snakemake"), "--cores", "2"], study)
    ran = re.findall(r"^(?:local)?rule (\w+):", proc.stdout + proc.stderr, re.M)
    trained = set(re.findall(r"wildcards: sid=(\S+)", proc.stdout + proc.stderr))
    assert "signals" in ran and "teacher" not in ran and "shard" not in ran, ran
    assert trained == {"small_cnn--kd", "small_cnn--kdiga"}
    assert (study / "data" / "signals.pt").stat().st_size > 0
    after = {p.name: p.read_bytes() for p in models.glob("*.pt")}
    for name in ("teacher.pt", "small_cnn--st.pt"):
        assert after[name] == before[name], f"{name} changed"
    for sid in sorted(trained):
        meta = load_model(models / f"{sid}.pt")[1]
        assert meta["teacher_signals"] == {"views": 1, "grad_dtype": "float16"}
        assert "cached teacher signals" in (study / "logs" / "distill" / f"{sid}.log").read_text()
    report = (study / "reports" / "report.md").read_text()
    assert "The KD, KDIGA students trained from the teacher's cached signals (1 fixed" in report
    assert "up to date" in run([str(BIN / "dvc"), "status"], study).stdout


def test_dvc_exp_run_and_show(study):
    run(["git", "add", "-A"], study)
    run(["git", "commit", "-qm", "radius change", "--allow-empty"], study)
    run([str(BIN / "dvc"), "exp", "run", "-S", "distill.iga.weight=3.0"], study)
    show = run([str(BIN / "dvc"), "exp", "show", "--json"], study).stdout
    assert "distill.iga.weight" in show or '"weight": 3.0' in show
    assert "small_cnn--kdiga" in show


def test_bad_params_stop_before_any_job(study, tmp_path):
    bad = json.loads(json.dumps(TINY))
    bad["distill"]["methods"] = ["kd", "kdgia"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    bad_env = env(PYTHONPATH=str(study), KDIGA_PARAMS=str(path))
    proc = subprocess.run(
        [str(BIN / "snakemake"), "-n", "--cores", "1"],
        cwd=study,
        env=bad_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "distill.methods[1] = 'kdgia' is not allowed" in proc.stdout + proc.stderr
