"""The sweep-reuse benchmark's core: correctness properties on a tiny model (no timings)."""

from __future__ import annotations

import pytest
import torch

from bench.sweep_reuse import Comparison, RadiusRow, compare_sweeps, format_comparison
from kdiga.data import load_dataset, to_float
from kdiga.methods import build_loss
from kdiga.models import build_model
from kdiga.train import TrainConfig, fit

RADII = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25)


@pytest.fixture(scope="module", params=[0, 1])
def tiny(request):
    """A tiny CNN trained briefly on 8x8 synthetic data, and 64 held-out images in [0, 1]."""
    seed = request.param
    torch.manual_seed(seed)
    x, y = load_dataset("synthetic", "train", image_size=8, channels=1, n=256, seed=seed)
    xt, yt = load_dataset("synthetic", "test", image_size=8, channels=1, n=64, seed=seed)
    model = build_model("small_cnn", 10, in_chans=1, image_size=8, width=8)
    fit(model, build_loss("st"), x, y, TrainConfig(epochs=12, batch_size=32, lr=0.05, seed=seed))
    return model.eval(), to_float(xt), yt


def test_reuse_never_more_robust_and_cost_between_floor_and_bound(tiny):
    model, x, y = tiny
    c = compare_sweeps(model, x, y, RADII, steps=10, batch_size=64)
    assert c.clean > 0.6  # the model learned something: points get attacked
    assert any(r.robust_reuse < c.clean for r in c.rows)  # and some get broken
    for r in c.rows:
        assert r.ok, r
        assert r.robust_reuse <= r.robust_indep
        assert r.floor <= r.evals_reuse <= r.bound, r
        assert r.evals_reuse <= r.evals_indep, r
    assert c.evals_reuse <= 1.05 * c.bound
    # robust accuracy does not grow with the radius in reuse mode
    acc = [r.robust_reuse for r in c.rows]
    assert acc == sorted(acc, reverse=True)


def test_one_step_reuse_cost_equals_bound_exactly(tiny):
    # With one PGD step from x (no random start) each attacked point costs exactly one
    # gradient evaluation, and reuse attacks exactly the points robust at r_(k-1).
    model, x, y = tiny
    c = compare_sweeps(model, x, y, RADII, steps=1, batch_size=64)
    assert [r.evals_reuse for r in c.rows] == [r.bound for r in c.rows]
    assert c.evals_indep == len(RADII) * round(c.clean * c.n)


def test_reuse_cost_within_5_percent_of_bound_when_little_breaks(tiny):
    # At radii too small to break (almost) anything, every attacked point runs the full
    # PGD length: reuse's cost is the bound, and reuse costs what independent attacks do.
    model, x, y = tiny
    c = compare_sweeps(model, x, y, (1e-4, 2e-4, 5e-4, 1e-3), steps=5, batch_size=64)
    assert 0.95 * c.bound <= c.evals_reuse <= c.bound
    assert c.evals_reuse == pytest.approx(c.evals_indep, rel=0.05)


def test_format_flags_a_radius_where_reuse_is_more_robust():
    row_ok = RadiusRow(0.1, 0.5, 0.5, 100, 120, 110, 90)
    row_bad = RadiusRow(0.2, 0.4, 0.3, 80, 100, 100, 80)
    c = Comparison(10, 0.9, 10, False, [row_ok, row_bad], 1.0, 1.0)
    text = format_comparison("t", c)
    assert not c.all_ok and "FAIL" in text
    assert "FAIL" not in format_comparison("t", Comparison(10, 0.9, 10, False, [row_ok], 1.0, 1.0))
