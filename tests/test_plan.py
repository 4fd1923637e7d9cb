"""The cost plan (pipeline.plan): one row per job of the DAG, positive finite estimates, a
total that is their sum, JSON that round-trips, hours that follow the params, and the usual
error for a bad params file. One calibration (CPU, one timed step) serves every test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from pipeline import dag
from pipeline.params import load_params, read_yaml, validate
from pipeline.plan import Calibrator, Plan, autoattack_passes, make_plan, render, split_sizes
from pipeline.plan import main as plan_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def calibrator():
    return Calibrator(device="cpu", steps=1, budget_s=0.02)  # small batches, scaled


@pytest.fixture(scope="module")
def plan(study, calibrator):
    return make_plan(study, calibrator, "params.yaml")


def test_one_row_per_dag_job_in_order(study, plan):
    jobs = dag.jobs(study)
    assert [r.job for r in plan.rows] == [j.name for j in jobs]
    assert [r.stage for r in plan.rows] == [j.stage for j in jobs]
    assert {r.stage for r in plan.rows} == {
        "shard",
        "teacher",
        "distill",
        "attack",
        "bounds_teacher",
        "bounds",
        "report",
    }


def test_every_estimate_is_positive_and_finite(plan):
    for r in plan.rows:
        assert math.isfinite(r.hours) and r.hours > 0, r
        assert r.peak_bytes > 0, r
        assert r.memory in ("measured", "estimate", "nominal")
    assert all(r.on == "cpu" for r in plan.rows)


def test_total_is_the_sum_of_the_rows(plan):
    d = plan.to_dict()
    assert d["total_hours"] == pytest.approx(sum(r["hours"] for r in d["rows"]), rel=1e-12)
    lines = render(plan).splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("job "))) :]
    rows = [x for x in table if x.split()[:1] and x.split()[0] in {r.job for r in plan.rows}]
    shown = sum(float(x.split()[2].replace(",", "")) for x in rows)
    (total,) = [x for x in table if x.startswith("total")]
    assert float(total.split()[1].replace(",", "")) == pytest.approx(shown, abs=1e-4 * len(rows))


def test_json_round_trips(plan, calibrator, capsys):
    measured = len(calibrator.costs)
    assert plan_main(["--params", "params.yaml", "--json"], calibrator=calibrator) == 0
    assert len(calibrator.costs) == measured  # nothing measured twice
    d = json.loads(capsys.readouterr().out)
    again = Plan.from_dict(d)
    assert again.to_dict() == d
    assert again.rows == plan.rows  # the same calibration, the same estimates
    assert render(again).splitlines()[1:] == render(plan).splitlines()[1:]


def test_more_epochs_give_proportionally_more_distill_hours(plan, calibrator):
    raw = read_yaml(ROOT / "params.yaml")
    raw["distill"]["epochs"] *= 2
    measured = len(calibrator.costs)
    longer = {r.job: r for r in make_plan(validate(raw), calibrator).rows}
    assert len(calibrator.costs) == measured  # epochs are no part of a calibration
    for r in plan.rows:
        ratio = longer[r.job].hours / r.hours
        assert ratio == pytest.approx(2.0 if r.stage == "distill" else 1.0, rel=1e-9), r.job


def test_a_bigger_batch_costs_more_per_step_and_fewer_steps(calibrator):
    raw = read_yaml(ROOT / "params.yaml")
    raw["distill"] |= {"methods": ["st"], "batch_size": 32}
    raw["seeds"] = [0]
    small = make_plan(validate(raw), calibrator)
    raw["distill"]["batch_size"] = 64
    big = make_plan(validate(raw), calibrator)
    (s,) = [r for r in small.rows if r.stage == "distill"]
    (b,) = [r for r in big.rows if r.stage == "distill"]
    assert "x 29 steps" in s.basis and "x 14 steps" in b.basis  # 958 train images


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("params: {distill: {epochs: -1}}", "error: params: distill.epochs = -1 is not allowed"),
        (None, "error: params: params file = "),
    ],
)
def test_bad_params_file_exits_2_with_the_usual_message(tmp_path, capsys, lines, expected):
    path = tmp_path / "bad.yaml"
    if lines is not None:
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        raw["distill"]["epochs"] = -1
        path.write_text(yaml.safe_dump(raw))
    assert plan_main(["--params", str(path)], calibrator=Calibrator(device="cpu")) == 2
    captured = capsys.readouterr()
    assert expected in captured.err and captured.out == ""


def test_autoattack_passes_follow_its_versions(study):
    # params.yaml: custom [apgd-ce, apgd-dlr], 1 restart, 15 iterations
    assert autoattack_passes(study) == (15 + 15, 0)
    raw = read_yaml(ROOT / "params.yaml")
    raw["attack"]["autoattack"] = {"version": "standard", "n_restarts": None, "n_iter": None}
    # standard, 10 classes: APGD-CE 100, APGD-T 9 targets x 100, FAB-T 9 x 100; Square 5000
    assert autoattack_passes(validate(raw)) == (100 + 900 + 900, 5000)


def test_split_sizes_from_manifests_when_they_match(study, tmp_path):
    assert split_sizes(study, tmp_path) == split_sizes(study)  # no manifests: the dataset's
    z = split_sizes(study)
    assert (z.train + z.val, z.test) == (1198, 200)
    for split, n in (("train", 900), ("val", 298), ("test", 150)):
        doc = {"dataset": "digits", "image_size": 16, "num_samples": n}
        (tmp_path / f"{split}.json").write_text(json.dumps(doc))
    z = split_sizes(study, tmp_path)
    assert (z.train, z.val, z.test, z.source) == (900, 298, 150, "the shard manifests")
