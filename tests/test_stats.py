"""Tests for kdiga.stats: t quantiles, seed and bootstrap intervals, paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdiga.stats import (
    VERDICT_RULE,
    VERDICTS,
    Estimate,
    bootstrap_ci,
    estimate,
    mean_ci,
    paired_difference,
    t_quantile,
    verdict,
)


def bernoulli(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


# ----------------------------------------------------------------------------- t quantiles


@pytest.mark.parametrize(
    ("df", "expected"), [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)]
)
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=5e-4)


def test_t_quantile_closed_forms_and_limits():
    for p in (0.6, 0.9, 0.975, 0.999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(0.5, 3) == 0.0
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)  # the normal limit


def test_t_quantile_matches_scipy_on_a_grid():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 7, 15, 60, 500, 0.7, 3.5):
        for p in (0.001, 0.3, 0.55, 0.9, 0.95, 0.975, 0.995, 0.9999):
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)


@pytest.mark.parametrize(
    ("p", "df", "match"),
    [(0.0, 3, "p must"), (1.0, 3, "p must"), (0.9, 0, "df must"), (0.9, math.inf, "df must")],
)
def test_t_quantile_rejects_bad_input(p, df, match):
    with pytest.raises(ValueError, match=match):
        t_quantile(p, df)


# ----------------------------------------------------------------------------- seeds


def test_mean_ci_is_the_t_interval_by_hand():
    est = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1
    half = 4.302653 / math.sqrt(3)
    assert (est.mean, est.n, est.method) == (2.0, 3, "seeds")
    assert est.lo == pytest.approx(2 - half, abs=1e-6)
    assert est.hi == pytest.approx(2 + half, abs=1e-6)
    assert mean_ci([1.0, 2.0, 3.0], level=0.9).hi == pytest.approx(2 + 2.919986 / 3**0.5)


def test_two_seeds_give_the_wide_honest_interval():
    est = mean_ci([0.60, 0.62])  # sd = 0.02 / sqrt(2), so half-width = 12.706 * 0.01
    assert est.hi - est.mean == pytest.approx(0.127062, abs=1e-5)
    assert est.format() == "61.0 [48.3, 73.7]"


def test_mean_ci_covers_the_true_mean_95_percent_of_the_time_with_three_seeds():
    # with the normal quantile 1.96 instead of t_{0.975,2} = 4.30 the coverage would be ~0.81
    rng = np.random.default_rng(0)
    draws = rng.normal(0.7, 0.05, size=(2000, 3))
    covered = [(e.lo <= 0.7 <= e.hi) for e in map(mean_ci, draws)]
    assert 0.935 < np.mean(covered) < 0.965


def test_one_value_has_no_interval():
    for est in (mean_ci([0.61]), estimate([[0.61]]), bootstrap_ci([0.61])):
        assert (est.mean, est.lo, est.hi, est.n, est.method) == (0.61, None, None, 1, "single")
        assert est.format() == "61.0 (no CI)"
        assert verdict(est, "greater") == "inconclusive"


def test_identical_seeds_give_a_zero_width_interval():
    est = mean_ci([0.5, 0.5, 0.5])
    assert (est.lo, est.hi) == (0.5, 0.5)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_of_a_fair_coin_has_the_normal_half_width():
    x = np.random.default_rng(3).permutation(np.repeat([0.0, 1.0], 150))  # p = 0.5, n = 300
    est = bootstrap_ci(x)
    assert (est.mean, est.n, est.method) == (0.5, 300, "bootstrap")
    half = (est.hi - est.lo) / 2
    assert half == pytest.approx(1.96 * math.sqrt(0.25 / 300), rel=0.1)  # ≈ 0.0566
    assert est.lo < 0.5 < est.hi
    assert abs((est.hi - 0.5) - (0.5 - est.lo)) < 0.01  # nearly symmetric at p = 0.5


def test_bootstrap_is_deterministic_and_ignores_the_global_rngs():
    x = bernoulli(250, 0.7, seed=1)
    np.random.seed(1)
    torch.manual_seed(1)
    first = bootstrap_ci(x, seed=5)
    np.random.seed(2)
    torch.manual_seed(2)
    np.random.default_rng(9).random(10)
    again = bootstrap_ci(list(x), seed=5)
    assert first == again and repr(first) == repr(again)
    assert bootstrap_ci(torch.tensor(x).bool(), seed=5) == first
    other = bootstrap_ci(x, seed=6)
    assert (other.lo, other.hi) != (first.lo, first.hi)
    assert other.mean == first.mean


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=40),
    level=st.sampled_from([0.5, 0.9, 0.95]),
)
def test_intervals_lie_within_the_data(values, level):
    boot = bootstrap_ci(values, level=level, n_boot=200)
    t = mean_ci(values, level=level)
    assert min(values) - 1e-9 <= boot.lo <= boot.hi <= max(values) + 1e-9
    assert t.lo <= t.mean <= t.hi
    assert t.hi - t.mean == pytest.approx(t.mean - t.lo, abs=1e-9)


def test_estimate_follows_the_rule():
    seeds = [bernoulli(200, p, seed=i) for i, p in enumerate((0.6, 0.65, 0.7))]
    several = estimate(seeds)
    assert several == mean_ci([float(s.mean()) for s in seeds])
    assert several.method == "seeds" and several.n == 3
    one = estimate(seeds[:1], n_boot=500, seed=2)
    assert one == bootstrap_ci(seeds[0], n_boot=500, seed=2)
    assert one.method == "bootstrap" and one.n == 200
    assert estimate(np.stack(seeds)) == several  # an array [S, N] reads as one row per seed


# ----------------------------------------------------------------------------- paired


def correlated_pair(n: int = 400, flips: int = 12, seed: int = 0):
    """Two 0/1 vectors over the same images that agree except on ``flips`` images where
    only ``a`` is correct: a is better by flips / n, and both vary a lot image to image."""
    a = bernoulli(n, 0.6, seed)
    b = a.copy()
    b[np.flatnonzero(a)[:flips]] = 0.0
    return a, b


def test_paired_difference_is_much_narrower_than_the_unpaired_one():
    a, b = correlated_pair()
    paired = paired_difference([a], [b])
    assert paired.mean == pytest.approx(12 / 400)
    ha = (bootstrap_ci(a).hi - bootstrap_ci(a).lo) / 2
    hb = (bootstrap_ci(b, seed=1).hi - bootstrap_ci(b, seed=1).lo) / 2
    unpaired_half = math.hypot(ha, hb)  # independent resamples: the variances add
    assert (paired.hi - paired.lo) / 2 < 0.3 * unpaired_half
    assert verdict(paired, "greater") == "supported"
    assert math.hypot(ha, hb) > paired.mean  # unpaired, the same gap would be inconclusive


def test_one_seed_paired_bootstrap_resamples_the_images_once_for_both():
    a, b = correlated_pair(n=100)
    est = paired_difference([a], [b], n_boot=300, seed=4)
    idx = np.random.default_rng(4).integers(0, 100, size=(300, 100))
    lo, hi = np.quantile(a[idx].mean(1) - b[idx].mean(1), [0.025, 0.975])
    assert (est.lo, est.hi) == pytest.approx((lo, hi), abs=1e-12)
    assert est == bootstrap_ci(a - b, n_boot=300, seed=4)


def test_several_seeds_are_paired_by_seed():
    # a large seed-to-seed spread shared by both methods; a is better by 2 points every seed
    base = [0.50, 0.58, 0.66, 0.54]
    noise = [0.001, -0.002, 0.0015, -0.0005]
    a = [np.full(10, m + 0.02 + e) for m, e in zip(base, noise, strict=True)]
    b = [np.full(10, m) for m in base]
    paired = paired_difference(a, b)
    assert paired.method == "seeds" and paired.n == 4
    assert paired.mean == pytest.approx(0.02)
    assert verdict(paired, "greater") == "supported"
    assert verdict(paired, "less") == "not supported"
    ea, eb = estimate(a), estimate(b)
    assert ea.lo < eb.hi  # unpaired, the two intervals overlap
    assert paired_difference(b, a).mean == pytest.approx(-0.02)


# ----------------------------------------------------------------------------- verdict


@pytest.mark.parametrize(
    ("lo", "hi", "direction", "expected"),
    [
        (0.01, 0.05, "greater", "supported"),
        (0.01, 0.05, "less", "not supported"),
        (-0.05, -0.01, "less", "supported"),
        (-0.05, -0.01, "greater", "not supported"),
        (-0.01, 0.05, "greater", "inconclusive"),
        (-0.01, 0.05, "less", "inconclusive"),
        (0.0, 0.05, "greater", "inconclusive"),  # an interval touching zero does not exclude it
    ],
)
def test_verdict(lo, hi, direction, expected):
    assert verdict(Estimate((lo + hi) / 2, lo, hi, 3, "seeds"), direction) == expected
    assert expected in VERDICTS


def test_verdict_rule_is_a_quotable_sentence():
    assert VERDICT_RULE.endswith(".") and VERDICT_RULE.count(". ") == 0
    assert all(v in VERDICT_RULE for v in VERDICTS)


def test_verdict_rejects_bad_input():
    est = Estimate(0.1, 0.0, 0.2, 3, "seeds")
    with pytest.raises(ValueError, match="greater"):
        verdict(est, "bigger")
    with pytest.raises(ValueError, match="Estimate"):
        verdict((0.0, 0.2), "greater")


# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    ("est", "kwargs", "text"),
    [
        (Estimate(0.61, 0.553, 0.667, 300, "bootstrap"), {}, "61.0 [55.3, 66.7]"),
        (Estimate(0.61, 0.553, 0.667, 300, "bootstrap"), {"digits": 2}, "61.00 [55.30, 66.70]"),
        (Estimate(0.032, -0.004, 0.068, 3, "seeds"), {"signed": True}, "+3.2 [-0.4, +6.8]"),
        (Estimate(-0.0001, -0.02, 0.02, 3, "seeds"), {}, "0.0 [-2.0, 2.0]"),
        (Estimate(1.25, 1.0, 1.5, 3, "seeds"), {"scale": 1, "digits": 2}, "1.25 [1.00, 1.50]"),
        (Estimate(0.61, None, None, 1, "single"), {"signed": True}, "+61.0 (no CI)"),
    ],
)
def test_format(est, kwargs, text):
    assert est.format(**kwargs) == text


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: paired_difference([[1, 0, 1]], [[1, 0]]), "same images"),
        (lambda: paired_difference([[1, 0], [0, 1]], [[1, 0]]), "same seeds"),
        (lambda: estimate([[1, 0, 1], [1, 0]]), "same images"),
        (lambda: estimate([1, 0, 1]), "one vector per seed"),
        (lambda: estimate([]), "no seeds"),
        (lambda: bootstrap_ci([]), "empty"),
        (lambda: bootstrap_ci([1.0, math.nan]), "non-finite"),
        (lambda: bootstrap_ci([[1, 0], [0, 1]]), "1-D"),
        (lambda: bootstrap_ci("0101"), "string"),
        (lambda: bootstrap_ci([1, 0], n_boot=0), "n_boot"),
        (lambda: bootstrap_ci([1, 0], seed=-1), "seed"),
        (lambda: mean_ci([1, 0], level=95), "level"),
        (lambda: Estimate(0.5, 0.4, None, 3, "seeds"), "both be None"),
        (lambda: Estimate(0.5, None, None, 3, "seeds"), "single"),
        (lambda: Estimate(0.5, 0.6, 0.4, 3, "seeds"), "lo must not exceed hi"),
        (lambda: Estimate(0.5, 0.4, 0.6, 3, "normal"), "method must be one of"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
