"""End to end, as a user runs it: Snakemake, then DVC, on a tiny study in a fresh git repo.

The tiny study (digits at 8x8, one epoch, three methods, two radii) is built once per test
run by Snakemake and its results committed (``tiny_study_built``); each test works on its
own copy, so the tests run in any order and side by side. They check: the outputs; that DVC
sees Snakemake's work as done; that a fresh clone plans every job and writes the same bytes;
that targeted runs of either tool never leave a stale result called current; that changing
an attack radius re-runs only the attack stages and after; that `dvc exp show` and
`dvc plots diff` compare committed experiments by their own numbers; and that a bad params
file stops before any job.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_study import (
    BIN,
    TINY,
    build_once,
    copy_study,
    env,
    git_commit_all,
    run,
)

from pipeline import dag, provenance

KD, KDIGA, ST = "pgdat--kd--small_cnn--s0", "pgdat--kdiga--small_cnn--s0", "st--small_cnn--s0"

pytestmark = pytest.mark.slow

COMPARED = (
    "dvc.lock",
    "reports/report.md",
    "reports/metrics.json",
    "reports/figure1.png",
    "reports/robustness.csv",
    "reports/provenance.json",
)


@pytest.fixture
def study(tiny_study_built, tmp_path) -> Path:
    """This test's own copy of the finished tiny study."""
    return copy_study(tiny_study_built, tmp_path / "study")


def dvc(*args: str, cwd: Path, **extra: str) -> str:
    return run([str(BIN / "dvc"), *args], cwd, **extra).stdout


def planned(study: Path) -> list[str]:
    """The jobs `snakemake -n` would run, as 'rule' or 'rule:wildcards'."""
    out = run([str(BIN / "snakemake"), "-n", "--cores", "1"], study)
    text = out.stdout + out.stderr
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        if m := re.match(r"(?:local)?rule (\w+):", block.strip()):
            wc = re.search(r"wildcards: (.*)", block)
            jobs.append(m.group(1) + (":" + wc.group(1).strip() if wc else ""))
    return sorted(j for j in jobs if j != "all")


def changed_stages(study: Path) -> set[str]:
    """The stages `dvc status` lists as changed (empty when it says up to date)."""
    out = dvc("status", cwd=study)
    return {line[:-1] for line in out.splitlines() if line.endswith(":") and line[0] != "\t"}


def set_param(study: Path, key: str, value) -> None:
    """Set one dotted params key in the study's params.yaml (as a user edits it)."""
    params = yaml.safe_load((study / "params.yaml").read_text())
    *path, leaf = key.split(".")
    section = params
    for part in path:
        section = section[part]
    section[leaf] = value
    (study / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def sha(path: Path) -> str:
    from kdiga.files import sha256_file

    return sha256_file(path)


def test_snakemake_builds_the_report(study):
    report = (study / "reports" / "report.md").read_text()
    assert "Accuracy (%) under 3-step PGD" in report
    assert "AutoAttack (custom: apgd-ce; 1 restart(s); 20 iterations)" in report
    assert "Table 4" in report
    assert (study / "reports" / "figure1.png").stat().st_size > 1000
    metrics = json.loads((study / "reports" / "metrics.json").read_text())
    for mid in ("pgdat", ST, KD, KDIGA):
        assert 0 <= metrics[mid]["pgd"]["0.1"] <= metrics[mid]["clean"] <= 1
    assert "bounds" in metrics[KDIGA]
    cost = (study / "logs" / "cost.md").read_text()  # wall clock: beside the logs
    assert re.search(r"\| st--small_cnn--s0 \| \d+\.\d\d \|", cost), cost
    assert "s / epoch" not in report


def test_bounds_record_each_sample_and_the_check(study):
    """A bounds file holds, per radius, each sample's γ, steps and convergence, and the
    Proposition 2 check's rate and points per kind, on the samples the params name."""
    from pipeline.params import load_params

    params = load_params(study / "params.yaml").bounds  # the defaults included
    b = json.loads((study / f"data/bounds/{KDIGA}.json").read_text())
    n, checked = b["n"], b["prop2"]["n"]
    assert checked == min(params.check_samples, n) > 0
    assert b["radius_labels"] == list(b["convergence"]) == list(b["prop2"]["radii"])
    for i, label in enumerate(b["radius_labels"]):
        conv = b["convergence"][label]
        steps, converged = conv["steps_per_sample"], conv["converged_per_sample"]
        assert len(b["llm_per_sample"][i]) == len(steps) == len(converged) == n
        assert all(0 < k <= params.steps * params.restarts for k in steps)
        assert sum(steps) / n == pytest.approx(conv["steps"])
        assert sum(converged) / n == pytest.approx(conv["converged"])
        check = b["prop2"]["radii"][label]
        assert check["pgd_student"]["points"] == check["pgd_teacher"]["points"] == checked
        assert 0 <= check["all"]["rate"] <= 1


def test_dvc_sees_snakemake_work_as_done(study):
    assert "up to date" in dvc("status", cwd=study)
    assert planned(study) == []  # and recording it in dvc.lock changed nothing for Snakemake


def test_dvc_repro_forced_rewrites_snakemakes_bytes(study):
    """DVC re-running the teacher and a student over Snakemake's outputs (a job Snakemake ran
    single-threaded in a child of the fork server, DVC with every core in a process of its
    own, were they not pinned) writes the same bytes, so nothing downstream goes stale."""
    models = study / "data" / "models"
    before = {p.name: sha(p) for p in models.glob("*.safetensors")}
    for stage in ("teacher-pgdat", f"distill-{KDIGA}"):
        out = dvc("repro", "--force", "--single-item", stage, cwd=study, KDIGA_FORKSERVER="0")
        assert f"Running stage '{stage}'" in out
    assert {p.name: sha(p) for p in models.glob("*.safetensors")} == before
    assert "up to date" in dvc("status", cwd=study)
    run([sys.executable, "-m", "pipeline.sync", "--snakemake", "--quiet"], study)
    assert planned(study) == []  # the hand-off: Snakemake adopts DVC's (identical) outputs


@pytest.fixture(scope="session")
def fresh_clone(shared_root, tiny_study_built) -> Path:
    """A git clone of the finished study, built from clean by Snakemake (once per run).

    Before the run it records what a user of the clone meets (``before.json``: whether the
    committed report is there, and the jobs Snakemake plans); then the committed lock and
    report files are deleted, so every one of them is written again by the run."""

    def build(path: Path) -> None:
        run(["git", "clone", "-q", str(tiny_study_built), str(path)], shared_root)
        before = {"report": (path / "reports" / "report.md").exists(), "planned": planned(path)}
        (path / "before.json").write_text(json.dumps(before))
        for f in COMPARED:
            (path / f).unlink()
        run([str(BIN / "snakemake"), "--cores", "2"], path)

    return build_once(shared_root, "tiny-study-clone", build)


def test_a_second_study_from_clean_writes_the_same_bytes(tiny_study_built, fresh_clone):
    """Same inputs and params, same bytes: dvc.lock's hashes and every report file, all
    written again by the clone's own run."""
    differ = [
        f for f in COMPARED if (fresh_clone / f).read_bytes() != (tiny_study_built / f).read_bytes()
    ]
    assert differ == []
    logs = {p.relative_to(fresh_clone).as_posix() for p in fresh_clone.glob("logs/**/*.log")}
    assert logs == {j.log for j in _dag_jobs(fresh_clone)}  # every job ran in the clone


def test_a_fresh_clone_runs_the_whole_study(fresh_clone):
    """The report is in git, its models and evaluations are not: in a clone, Snakemake plans
    every job rather than taking the committed report as done."""
    before = json.loads((fresh_clone / "before.json").read_text())
    assert before["report"]
    jobs = before["planned"]
    assert [j for j in jobs if j.startswith(("shard", "teacher", "report"))] == [
        "report",
        "shard",
        "teacher:teacher=pgdat",
    ]
    assert len(jobs) == len(_dag_jobs(fresh_clone))


def test_a_targeted_snakemake_run_blesses_nothing_stale(study):
    """Change the IGA weight and rebuild only the KDIGA model: its evaluations, bounds and the
    report are stale, and neither tool may call them current; a stage reading them stops."""
    model = study / "data" / "models" / f"{KDIGA}.safetensors"
    set_param(study, "distill.iga.weight", 3.0)
    run([str(BIN / "snakemake"), "--cores", "2", str(model.relative_to(study))], study)
    stale = {f"attack-{KDIGA}--pgd", f"attack-{KDIGA}--autoattack", f"bounds-{KDIGA}", "report"}
    assert changed_stages(study) == stale
    assert planned(study) == sorted(
        [
            f"attack:model={KDIGA}, attack=pgd",
            f"attack:model={KDIGA}, attack=autoattack",
            f"bounds:bkey={KDIGA}",
            "report",
        ]
    )
    report = run([sys.executable, "-m", "pipeline.stages", "report"], study, check=False)
    old = json.loads((study / f"data/evals/{KDIGA}--pgd.json").read_text())
    assert report.returncode == 2
    assert old["model_sha256"][:16] in report.stderr and sha(model)[:16] in report.stderr
    run([str(BIN / "snakemake"), "--cores", "2"], study)
    assert changed_stages(study) == set()
    new = json.loads((study / f"data/evals/{KDIGA}--pgd.json").read_text())
    assert new["model_sha256"] == sha(model)
    metrics = json.loads((study / "reports" / "metrics.json").read_text())
    robust = dict(zip(new["radius_labels"], new["robust"], strict=True))
    assert metrics[KDIGA]["pgd"] == robust


def test_a_targeted_dvc_repro_then_snakemake(study):
    """The other way round: DVC rebuilds one model; the hand-off adopts only what is current
    and Snakemake redoes exactly the evaluations, bounds and report made from the old one."""
    set_param(study, "distill.iga.weight", 0.3)
    dvc("repro", f"distill-{KDIGA}", cwd=study)
    run([sys.executable, "-m", "pipeline.sync", "--snakemake", "--quiet"], study)
    assert planned(study) == sorted(
        [
            f"attack:model={KDIGA}, attack=pgd",
            f"attack:model={KDIGA}, attack=autoattack",
            f"bounds:bkey={KDIGA}",
            "report",
        ]
    )
    run([str(BIN / "snakemake"), "--cores", "2"], study)
    assert changed_stages(study) == set() and planned(study) == []
    bounds = json.loads((study / f"data/bounds/{KDIGA}.json").read_text())
    model = study / "data" / "models" / f"{KDIGA}.safetensors"
    assert bounds["provenance"]["inputs"][f"data/models/{KDIGA}.safetensors"] == sha(model)


@pytest.fixture(scope="session")
def radius_changed(shared_root, tiny_study_built) -> Path:
    """A copy of the study after a user changed the attack radii and ran `dvc repro` (once
    per run); ``repro.json`` holds what the run printed and the models' mtimes around it."""

    def build(path: Path) -> None:
        copy_study(tiny_study_built, path)
        models = path / "data" / "models"
        before = {p.name: p.stat().st_mtime_ns for p in models.glob("*.safetensors")}
        set_param(path, "attack.radii", [0.05, 0.15])
        run([sys.executable, "-m", "pipeline.dag"], path)
        out = dvc("repro", cwd=path)
        after = {p.name: p.stat().st_mtime_ns for p in models.glob("*.safetensors")}
        (path / "repro.json").write_text(json.dumps({"out": out, "before": before, "after": after}))

    return build_once(shared_root, "tiny-study-radius", build)


def test_changing_a_radius_reruns_only_attacks_and_after(radius_changed, tmp_path):
    study = copy_study(radius_changed, tmp_path / "study")
    repro = json.loads((study / "repro.json").read_text())
    out = repro["out"]
    assert repro["before"] == repro["after"], "distillation or teacher re-ran"
    assert f"Running stage 'attack-{KD}--pgd'" in out
    assert "Running stage 'distill" not in out and "Running stage 'teacher-pgdat'" not in out
    metrics = json.loads((study / "reports" / "metrics.json").read_text())
    assert "0.15" in metrics[KD]["pgd"]
    assert "up to date" in dvc("status", cwd=study)


def test_snakemake_after_dvc_has_nothing_to_do(radius_changed, tmp_path):
    """Snakemake re-runs a job whose params changed since *it* last ran it; after DVC ran
    them, `python -m pipeline.sync --snakemake` (the README's hand-off) adopts DVC's current
    outputs, running nothing."""
    study = copy_study(radius_changed, tmp_path / "study")
    assert planned(study) != []  # Snakemake did not run the new radii itself
    before = {p.name: p.read_bytes() for p in (study / "data" / "evals").glob("*.json")}
    run([sys.executable, "-m", "pipeline.sync", "--snakemake", "--quiet"], study)
    after = {p.name: p.read_bytes() for p in (study / "data" / "evals").glob("*.json")}
    assert before == after
    assert planned(study) == []
    assert "up to date" in dvc("status", cwd=study)


def test_teacher_signals_stage_serves_the_grid(study):
    """signals.enabled: Snakemake adds the signals job and the served students retrain from
    its file without running the teacher; st keeps its model; DVC sees it all as done."""
    from kdiga.models import load_model

    models = study / "data" / "models"
    before = {p.name: p.read_bytes() for p in models.glob("*.safetensors")}
    set_param(study, "signals.enabled", True)
    run([sys.executable, "-m", "pipeline.dag"], study)
    proc = run([str(BIN / "snakemake"), "--cores", "2"], study)
    ran = re.findall(r"^(?:local)?rule (\w+):", proc.stdout + proc.stderr, re.M)
    trained = set(re.findall(r"wildcards: sid=(\S+)", proc.stdout + proc.stderr))
    assert "signals" in ran and "teacher" not in ran and "shard" not in ran, ran
    assert trained == {KD, KDIGA}
    assert (study / "data" / "signals" / "pgdat.safetensors").stat().st_size > 0
    after = {p.name: p.read_bytes() for p in models.glob("*.safetensors")}
    for name in ("pgdat.safetensors", f"{ST}.safetensors"):
        assert after[name] == before[name], f"{name} changed"
    for sid in sorted(trained):
        meta = load_model(models / f"{sid}.safetensors")[1]
        assert meta["teacher_signals"] == {"views": 1, "grad_dtype": "float16"}
        assert "cached teacher signals" in (study / "logs" / "distill" / f"{sid}.log").read_text()
    report = (study / "reports" / "report.md").read_text()
    assert "The KD, KDIGA students trained from their teacher's cached signals (1 fixed" in report
    assert "up to date" in dvc("status", cwd=study)


def _experiments(show: list) -> dict[str, dict]:
    """`dvc exp show --json` as name (baseline: its commit) -> (params, metrics)."""
    out = {}
    for row in show:
        if row["rev"] != "workspace":
            out["baseline"] = row
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                out[rev["name"]] = rev
    return {
        name: {
            "rev": r["rev"],
            "params": r["data"]["params"]["params.yaml"]["data"],
            "metrics": r["data"]["metrics"]["reports/metrics.json"]["data"],
        }
        for name, r in out.items()
    }


#: the experiments of ``experiments``: (name, IGA weight, run from the queue)
EXPERIMENTS = (("w0", 0.0, False), ("w3", 3.0, True), ("q0.5", 0.5, True))


@pytest.fixture(scope="session")
def experiments(shared_root, tiny_study_built) -> Path:
    """A copy of the committed study after three experiments on the IGA weight (once per
    run): `dvc exp run -S` in the workspace, then two queued with `dvc exp run --queue` and
    run side by side by `dvc queue start -j 2`; ``queue.txt`` is the queue's final status."""

    def build(path: Path) -> None:
        copy_study(tiny_study_built, path)
        for name, weight, queued in EXPERIMENTS:
            setting = ["-n", name, "-S", f"distill.iga.weight={weight}"]
            dvc("exp", "run", *(["--queue"] if queued else []), *setting, cwd=path)
        # `dvc queue start` may wait on its first worker, which a race in celery's file broker
        # can leave running after the queue is empty: follow the queue, then stop the workers.
        start = subprocess.Popen(
            [str(BIN / "dvc"), "queue", "start", "-j", "2"],
            cwd=path,
            env=env(PYTHONPATH=str(path)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 600
            while re.search(r"Queued|Running", status := dvc("queue", "status", cwd=path)):
                assert time.monotonic() < deadline, status
                time.sleep(1)
        finally:
            run([str(BIN / "dvc"), "queue", "stop", "--kill"], path, check=False)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(start.pid, signal.SIGKILL)  # the workers it started, if any is left
            start.wait()
        (path / "queue.txt").write_text(status)

    return build_once(shared_root, "tiny-study-experiments", build)


def test_dvc_exp_show_compares_committed_experiments(tiny_study_built, experiments, tmp_path):
    """Two experiments (one run in the workspace, one from the queue) and the baseline commit,
    each with its own numbers: the KDIGA student's differ with the IGA weight, the models the
    weight does not touch are the same bytes."""
    study = copy_study(experiments, tmp_path / "study")
    baseline = json.loads((tiny_study_built / "reports" / "metrics.json").read_text())
    exps = _experiments(json.loads(dvc("exp", "show", "--json", cwd=study)))
    assert exps["baseline"]["metrics"] == baseline
    for name, weight in (("w0", 0.0), ("w3", 3.0)):
        assert exps[name]["params"]["distill"]["iga"]["weight"] == weight
        committed = run(["git", "show", f"{exps[name]['rev']}:reports/metrics.json"], study)
        assert exps[name]["metrics"] == json.loads(committed.stdout)
    m0, m3, mb = (exps[n]["metrics"] for n in ("w0", "w3", "baseline"))
    for mid in ("pgdat", ST, KD):
        assert m0[mid] == m3[mid] == mb[mid], mid
    assert m0[KDIGA]["bounds"] != m3[KDIGA]["bounds"]
    plots = json.loads(dvc("plots", "diff", "w0", "w3", "--json", cwd=study))["data"]
    (plot,) = plots["dvc.yaml::reports/robustness.csv"]
    assert plot["revisions"] == ["w0", "w3"]
    drawn = {
        (v["rev"], v["field"], v["radius"]): v[v["field"]]
        for v in plot["content"]["data"]["values"]
    }
    for name in ("w0", "w3"):  # every point of each experiment's own CSV, and nothing else
        csv = run(["git", "show", f"{exps[name]['rev']}:reports/robustness.csv"], study).stdout
        head, *rows = [line.split(",") for line in csv.split()]
        want = {
            (name, f, row[0]): v for row in rows for f, v in zip(head[1:], row[1:], strict=True)
        }
        assert {k: v for k, v in drawn.items() if k[0] == name} == want


def _dag_jobs(study: Path) -> list:
    from pipeline import dag
    from pipeline.params import load_params

    return dag.jobs(load_params(study / "params.yaml"))


def test_a_queued_sweep_runs_in_parallel(experiments, tmp_path):
    """`dvc exp run --queue` + `dvc queue start -j 2`: whole experiments side by side, each
    recorded with its own params and numbers."""
    study = copy_study(experiments, tmp_path / "study")
    status = (study / "queue.txt").read_text()
    assert "Failed" not in status
    assert all(name in status for name, _, queued in EXPERIMENTS if queued), status
    exps = _experiments(json.loads(dvc("exp", "show", "--json", cwd=study)))
    for name, weight, queued in EXPERIMENTS:
        if queued:
            e = exps[name]
            assert e["params"]["distill"]["iga"]["weight"] == weight
            assert 0 <= e["metrics"][KDIGA]["pgd"]["0.1"] <= 1


def test_an_applied_experiment_is_adopted_by_snakemake_after_sync(experiments, tmp_path):
    """`dvc exp apply` brings an experiment's params, lock and outputs into the workspace;
    DVC sees it current, and after `python -m pipeline.sync --snakemake` Snakemake does too
    (before, it plans the jobs whose files DVC replaced)."""
    study = copy_study(experiments, tmp_path / "study")
    dvc("exp", "apply", "w3", cwd=study)
    assert yaml.safe_load((study / "params.yaml").read_text())["distill"]["iga"]["weight"] == 3.0
    assert "up to date" in dvc("status", cwd=study)
    run([sys.executable, "-m", "pipeline.sync", "--snakemake"], study)
    assert planned(study) == []
    assert "up to date" in dvc("status", cwd=study)
    metrics = json.loads((study / "reports" / "metrics.json").read_text())
    shown = _experiments(json.loads(dvc("exp", "show", "--json", cwd=study)))["w3"]
    assert metrics[KDIGA] == shown["metrics"][KDIGA]


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


def test_a_model_the_params_cannot_build_stops_a_real_run_before_any_job(study, tmp_path):
    """The models are built (on the meta device) before a real run, not at a dry run, which
    reads the tables alone: a bad kwargs stops `snakemake` before any job, naming the key."""
    bad = json.loads(json.dumps(TINY))
    bad["students"]["small_cnn"]["kwargs"] = {"depth": 3}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    logs = sorted(p.relative_to(study) for p in study.glob("logs/**/*.log"))
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "1", "--forceall"],
        cwd=study,
        env=env(PYTHONPATH=str(study), KDIGA_PARAMS=str(path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "students.small_cnn.kwargs = {'depth': 3} is not allowed" in out, out[-2000:]
    assert "unexpected keyword argument 'depth'" in out
    assert sorted(p.relative_to(study) for p in study.glob("logs/**/*.log")) == logs
    assert all(p.stat().st_mtime_ns < path.stat().st_mtime_ns for p in study.glob("logs/**/*.log"))


def test_duplicate_key_and_bad_bytes_stop_snakemake_with_one_line(study, tmp_path):
    """Through Snakemake too, before its own YAML parser sees the file."""
    text = (study / "params.yaml").read_text()
    cases = {
        "dup.yaml": (
            text.replace("seeds:\n", "seeds: [1]\nseeds:\n", 1).encode(),
            "key 'seeds' is given twice (lines 1 and 2)",
        ),
        "latin1.yaml": (b"# caf\xe9\n" + text.encode(), "byte 5 (line 1, 0xe9) is not UTF-8"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        proc = subprocess.run(
            [str(BIN / "snakemake"), "-n", "--cores", "1"],
            cwd=study,
            env=env(PYTHONPATH=str(study), KDIGA_PARAMS=str(tmp_path / name)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode != 0
        assert message in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
        assert str(tmp_path / name) in proc.stdout + proc.stderr


def test_a_teacher_retrained_to_the_same_bytes_reruns_nothing_below_it(study):
    """Snakemake re-runs every job below a job it re-runs (it judges by mtimes); a job whose
    outputs are already what it would make (its provenance: the same params, input bytes and
    code) keeps them and ends at once, so nothing below the teacher is recomputed."""
    models = study / "data" / "models"
    before = {p.name: p.read_bytes() for p in models.glob("*.safetensors")}
    for name in ("pgdat.safetensors", "pgdat.json"):
        (models / name).unlink()
    proc = run([str(BIN / "snakemake"), "--cores", "2"], study)
    ran = re.findall(r"^(?:local)?rule (\w+):", proc.stdout + proc.stderr, re.M)
    assert ran.count("teacher") == 1 and "distill" in ran  # Snakemake scheduled them all
    assert {p.name: p.read_bytes() for p in models.glob("*.safetensors")} == before
    for sid in (KD, KDIGA):  # a student of the teacher: reused, not retrained
        log = (study / "logs" / "distill" / f"{sid}.log").read_text()
        assert "its outputs are current" in log and "epoch 1/1" not in log, log[-2000:]
    report = (study / "logs" / "report.log").read_text()
    assert "its outputs are current" in report
    assert changed_stages(study) == set() and planned(study) == []


def test_a_key_only_streamed_data_reads_changes_no_job_of_a_digits_study(study):
    """shard.workers orders the batches of streamed (ImageNet) data; digits are held in
    memory, so no job of this study reads it: neither tool plans anything."""
    set_param(study, "shard.workers", 7)
    assert planned(study) == []
    assert changed_stages(study) == {dag.GUARD}  # the guard re-reads params.yaml, nothing else


def test_the_machine_is_recorded_with_every_artifact_and_named_in_the_report(
    tiny_study_built, monkeypatch
):
    """Each artifact's record names the machine that made it (a record, not an input: the
    report says another machine computes other bytes)."""
    from kdiga.utils import machine_info
    from pipeline.params import load_params

    params = load_params(tiny_study_built / "params.yaml", build=False)
    here = machine_info()
    monkeypatch.chdir(tiny_study_built)  # records are read relative to the study
    records = [provenance.read_record(j) for j in dag.jobs(params)]
    for rec in records:
        machine = rec["machine"]
        assert machine["cpu"] == here["cpu"] and machine["torch"] == here["torch"]
        assert machine["threads"] == 1 and "gpu" not in machine  # KDIGA_THREADS, on the CPU
    report = (tiny_study_built / "reports" / "report.md").read_text()
    assert f"Computed on {here['cpu']} ({here['cpu_cores']} cores), torch {here['torch']}" in report
    assert f"({len(records) - 1} jobs)" in report  # every job but the report itself
    assert "Another processor, thread count or torch computes other bytes" in report


def test_sharing_a_study_through_a_dvc_remote_reuses_its_bytes(tiny_study_built, tmp_path):
    """README's "Share a study": push the artifacts to a DVC remote; a clone pulls them and,
    after `python -m pipeline.sync --snakemake`, neither tool has anything to do."""
    origin = copy_study(tiny_study_built, tmp_path / "origin")
    remote = tmp_path / "remote"
    dvc("remote", "add", "-d", "store", str(remote), cwd=origin)
    git_commit_all(origin, "a DVC remote")
    dvc("push", cwd=origin)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    dvc("pull", cwd=clone)
    run([sys.executable, "-m", "pipeline.sync", "--snakemake", "--quiet"], clone)
    assert "up to date" in dvc("status", cwd=clone)
    assert planned(clone) == []
    for path in origin.glob("data/**/*"):
        if path.is_file():
            assert (clone / path.relative_to(origin)).read_bytes() == path.read_bytes(), path
