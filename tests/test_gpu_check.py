"""The prepared GPU check (bench/gpu_check.py) in its --dry mode, and the opt-in compilation it
measures (kdiga.train's compile_teacher, kdiga.attacks.pgd's compile_model) on the CPU, where
both are no-ops. Nothing here needs a GPU."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

import pytest
import torch

from bench import gpu_check
from bench.common import REPO_ROOT
from kdiga.attacks import pgd
from kdiga.data import load_dataset
from kdiga.methods import build_loss
from kdiga.models import build_model
from kdiga.train import TrainConfig, fit, maybe_compile_teacher

STATUSES = {"ok", "failed", "error", "skipped"}


def test_dry_run_writes_every_section_and_prints_the_summary(tmp_path):
    """The CLI as CI runs it: every section ran (ok), the file has the documented shape."""
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry", "--out", str(out), "--budget", "600"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["format"] == gpu_check.FORMAT and record["mode"] == "dry"
    assert set(record["sections"]) == set(gpu_check.SECTIONS)
    for name, sec in record["sections"].items():
        assert sec["status"] == "ok", (name, sec["error"])
        assert isinstance(sec["result"], dict) and sec["seconds"] >= 0
    step = record["sections"]["step_cost"]["result"]
    assert {p.name for p in gpu_check.sizes(True).pairs} <= set(step)
    combos = {(r["channels_last"], r["bn_conversion"]) for r in step["~70x"]["rows"]}
    assert combos == {(False, False), (False, True), (True, False), (True, True)}
    epoch = record["sections"]["epoch"]["result"]
    assert epoch["floor_s"] == pytest.approx(epoch["floor_teacher_s"] + epoch["floor_student_s"])
    assert epoch["teacher_flops_per_step"] > 0 and epoch["student_written_bytes_per_step"] > 0
    tests = record["sections"]["gpu_tests"]["result"]
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 1  # no GPU here
    assert proc.stdout.startswith("GPU check (dry)")
    for name in gpu_check.SECTIONS:
        assert f"== {name}: ok" in proc.stdout
    assert len(proc.stdout.splitlines()) <= 60  # one screen


def test_budget_skips_what_does_not_fit_and_the_file_is_still_whole(tmp_path):
    out = tmp_path / "check.json"
    record = gpu_check.check(dry=True, budget_s=0.0, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert all(s["status"] == "skipped" for s in record["sections"].values())
    assert "left" in record["sections"]["step_cost"]["error"]
    text = gpu_check.summary(record)
    assert "0 ok" in text and f"{len(gpu_check.SECTIONS)} skipped" in text


def test_a_failing_section_is_recorded_and_the_rest_still_run(monkeypatch, tmp_path):
    def broken(ctx):
        raise RuntimeError("no such kernel")

    sections = dict(gpu_check.SECTIONS)
    sections["step_cost"] = (broken, "broken on purpose")
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    record = gpu_check.check(
        dry=True, budget_s=600.0, only=["step_cost", "compile_teacher"], out=tmp_path / "c.json"
    )
    secs = record["sections"]
    assert secs["step_cost"]["status"] == "error"
    assert "RuntimeError: no such kernel" in secs["step_cost"]["error"]
    assert secs["compile_teacher"]["status"] == "ok"
    assert secs["epoch"]["status"] == "skipped"
    assert {s["status"] for s in secs.values()} <= STATUSES
    assert "RuntimeError: no such kernel" in gpu_check.summary(record)


def test_compile_teacher_is_off_by_default_and_a_logged_no_op_on_cpu(caplog):
    assert TrainConfig(epochs=1).compile_teacher is False
    teacher = build_model("small_cnn", 10, width=4)
    with caplog.at_level(logging.INFO, logger="kdiga.train"):
        assert maybe_compile_teacher(teacher, True, torch.device("cpu")) is teacher
    assert "compile_teacher=True is ignored on cpu" in caplog.text
    assert maybe_compile_teacher(teacher, False, torch.device("cuda")) is teacher
    assert maybe_compile_teacher(None, True, torch.device("cuda")) is None


def test_fit_with_compile_teacher_on_cpu_trains_as_without_and_may_resume(tmp_path):
    """On the CPU the flag changes nothing (bit for bit), and a run may be resumed with it
    switched (it changes how, not what, an epoch computes)."""
    x, y = load_dataset("synthetic", "train", n=32, image_size=8, seed=1)
    teacher = build_model("small_cnn", 10, image_size=8, width=4).eval()
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05)
    weights = []
    for flag in (False, True):
        torch.manual_seed(0)
        student = build_model("small_cnn", 10, image_size=8, width=4)
        run_cfg = dataclasses.replace(cfg, compile_teacher=flag)
        path = tmp_path / f"run{int(flag)}.pt"
        fit(student, build_loss("kdiga"), x, y, run_cfg, teacher=teacher, checkpoint_path=path)
        weights.append(student.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    more = dataclasses.replace(cfg, epochs=2, compile_teacher=False)
    history = fit(student, build_loss("kdiga"), x, y, more, teacher=teacher, checkpoint_path=path)
    assert [h["epoch"] for h in history] == [1, 2]


def test_pgd_compile_model_is_a_logged_no_op_on_cpu(caplog):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, image_size=8, width=4).eval()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    runs = []
    for flag in (False, True):
        with caplog.at_level(logging.INFO, logger="kdiga.attacks.pgd"):
            gen = torch.Generator().manual_seed(0)
            runs.append(pgd(model, x, y, eps=0.1, steps=3, generator=gen, compile_model=flag))
    assert torch.equal(*runs)
    assert "compile_model=True is ignored on cpu" in caplog.text
