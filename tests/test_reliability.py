"""Faults injected into real stage runs: each stops with a message naming the problem, and
nothing is lost or left half-written."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from tiny_study import TINY, env

from kdiga.utils import atomic_path, atomic_torch_save


def stage(study: Path, name: str, *args: str, params: dict | None = None):
    if params is not None:
        (study / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.run(
        [sys.executable, "-m", f"pipeline.{name}", *args],
        cwd=study,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def failed_cleanly(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A study directory with the tiny study's shards and teacher."""
    study = tmp_path_factory.mktemp("faults")
    ok(stage(study, "shard", params=TINY))
    ok(stage(study, "teacher"))
    return study


def _copy_study(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.pt"
    atomic_torch_save({"a": 1}, target)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed half-way")
    assert torch.load(target) == {"a": 1}  # the complete old file, not the partial one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


@pytest.mark.slow
def test_truncated_shard_names_the_file(sharded, tmp_path):
    study = _copy_study(sharded, tmp_path / "s")
    shard = study / "data" / "shards" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = stage(study, "distill", "--model", "small_cnn--st")
    failed_cleanly(proc, "train-000000.tar")
    assert not (study / "data" / "models" / "small_cnn--st.pt").exists()


@pytest.mark.slow
def test_unloadable_checkpoint_names_the_file(sharded, tmp_path):
    study = _copy_study(sharded, tmp_path / "s")
    (study / "data" / "models" / "teacher.pt").write_bytes(b"not a checkpoint")
    proc = stage(study, "attack", "--model", "teacher", "--attack", "pgd")
    failed_cleanly(proc, "teacher.pt")
    assert not (study / "data" / "evals").exists()


@pytest.mark.slow
def test_nan_loss_names_epoch_and_batch(sharded, tmp_path):
    study = _copy_study(sharded, tmp_path / "s")
    params = json.loads(json.dumps(TINY))
    params["distill"]["lr"] = 1e30
    proc = stage(study, "distill", "--model", "small_cnn--st", params=params)
    failed_cleanly(proc, "non-finite loss at epoch 1, batch")
    assert not (study / "data" / "models" / "small_cnn--st.pt").exists()


@pytest.mark.slow
def test_same_seed_same_params_same_results(sharded, tmp_path):
    """Training and evaluation on CPU are deterministic: two fresh runs, identical outputs.
    (Weights are compared, not file bytes: torch.save writes a per-save serialization id.)"""
    from kdiga.models import load_model

    runs = []
    for i in range(2):
        study = _copy_study(sharded, tmp_path / f"s{i}")
        ok(stage(study, "distill", "--model", "small_cnn--kdiga"))
        ok(stage(study, "attack", "--model", "small_cnn--kdiga", "--attack", "pgd"))
        model, _ = load_model(study / "data" / "models" / "small_cnn--kdiga.pt")
        result = json.loads((study / "data" / "evals" / "small_cnn--kdiga--pgd.json").read_text())
        runs.append((model.state_dict(), result["clean"], result["robust"]))
    (w0, *m0), (w1, *m1) = runs
    assert m0 == m1
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


_KILLED_AUTOATTACK = textwrap.dedent(
    """
    import os, signal, sys, torch
    from kdiga.attacks import robust_sweep
    from kdiga.data import load_dataset, to_float
    from kdiga.models import build_model
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_chans=1, image_size=8, width=8).eval()
    x, y = load_dataset("digits", "test", image_size=8, n=96, seed=0)
    calls = [0]
    def hook(module, args):
        # Once the first batch's progress is saved, die a few model calls into the next one.
        if os.environ.get("KILL_AFTER") and os.path.exists(sys.argv[1]):
            calls[0] += 1
            if calls[0] > int(os.environ["KILL_AFTER"]):
                os.kill(os.getpid(), signal.SIGKILL)
    model.register_forward_pre_hook(hook)
    result = robust_sweep(model, to_float(x), y, [0.05, 0.1], attack="autoattack",
                          batch_size=32, seed=0, state_path=sys.argv[1],
                          autoattack_kwargs={"version": "custom", "attacks": ["apgd-ce"],
                                             "n_iter": 10})
    torch.save({"robust": result.robust, "clean": result.clean_correct}, sys.argv[2])
    """
)


@pytest.mark.slow
def test_autoattack_killed_half_way_resumes_to_the_same_result(tmp_path):
    script = tmp_path / "aa.py"
    script.write_text(_KILLED_AUTOATTACK)

    def go(state: Path, out: Path, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), str(state), str(out)],
            env=env(**extra),
            capture_output=True,
            text=True,
            timeout=600,
        )

    ok(go(tmp_path / "plain.state", tmp_path / "plain.pt"))
    killed = go(tmp_path / "k.state", tmp_path / "k.pt", KILL_AFTER="5")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "k.state").exists() and not (tmp_path / "k.pt").exists()
    ok(go(tmp_path / "k.state", tmp_path / "k.pt"))
    plain, resumed = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "k.pt")
    assert torch.equal(plain["robust"], resumed["robust"])
    assert torch.equal(plain["clean"], resumed["clean"])


def test_report_marks_a_suspect_result():
    from pipeline.params import validate
    from pipeline.report import accuracy_table

    params = validate(json.loads(json.dumps(TINY)))
    good = {"clean": 0.9, "robust": [0.5, 0.3], "radius_labels": ["0.05", "0.1"], "suspect": False}
    bad = good | {"robust": [0.95, 0.3], "suspect": True}
    evals = {(m, "pgd"): good for m in ("teacher", "small_cnn--st", "small_cnn--kdiga")}
    evals[("small_cnn--kd", "pgd")] = bad
    teacher = {"arch": "small_cnn", "source": "train", "train": {"method": "at"}}
    table = accuracy_table(params, "pgd", evals, teacher)
    models = table["Model"].to_list()
    assert [m for m in models if "(suspect)" in m] == [
        "small_cnn (PGD-AT) -KD-> small_cnn (suspect)"
    ]
