"""Tests for kdiga.stats: t quantiles, intervals over seeds and images, the bootstrap, paired
differences, verdicts calibrated by simulation, and the seeds a verdict would need."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdiga.stats import (
    INTERVAL_OVER,
    INTERVAL_RULE,
    METHODS,
    NEEDS_SEEDS,
    ONE_SEED_RULE,
    SEEDS_NEEDED_RULE,
    VERDICT_RULE,
    VERDICTS,
    Estimate,
    VarianceComponents,
    bootstrap_ci,
    estimate,
    mean_ci,
    paired_difference,
    seeds_images_ci,
    seeds_needed,
    t_quantile,
    variance_components,
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
        assert verdict(est, "greater") == NEEDS_SEEDS and est.seed_sd is None


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
    assert several == seeds_images_ci(seeds)
    assert several.method == "seeds+images" and several.n == 3
    assert several.components == variance_components(seeds)
    means = [[float(s.mean())] for s in seeds]  # one value per seed: the seeds alone
    assert estimate(means) == mean_ci([m[0] for m in means])
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
    assert paired.lo > 0  # the interval over images excludes zero (one seed: no verdict)
    assert math.hypot(ha, hb) > paired.mean  # unpaired, the same gap would not


def test_one_seed_paired_bootstrap_resamples_the_images_once_for_both():
    a, b = correlated_pair(n=100)
    est = paired_difference([a], [b], n_boot=300, seed=4)
    idx = np.random.default_rng(4).integers(0, 100, size=(300, 100))
    lo, hi = np.quantile(a[idx].mean(1) - b[idx].mean(1), [0.025, 0.975])
    assert (est.lo, est.hi) == pytest.approx((lo, hi), abs=1e-12)
    assert est == bootstrap_ci(a - b, n_boot=300, seed=4)


def paired_means(a: list, b: list) -> list[float]:
    return [float(x.mean() - y.mean()) for x, y in zip(a, b, strict=True)]


def test_several_seeds_are_paired_by_seed():
    # a large seed-to-seed spread shared by both methods; a is better by 2 points every seed
    base = [0.50, 0.58, 0.66, 0.54]
    noise = [0.001, -0.002, 0.0015, -0.0005]
    a = [np.full(10, m + 0.02 + e) for m, e in zip(base, noise, strict=True)]
    b = [np.full(10, m) for m in base]
    paired = paired_difference(a, b)
    assert paired.method == "seeds+images" and paired.n == 4
    # every image agrees within a seed, so nothing is shared by images: the seeds' t-interval
    assert paired.components.image_var == 0.0
    ref = mean_ci(paired_means(a, b))
    assert (paired.lo, paired.hi) == pytest.approx((ref.lo, ref.hi))
    assert paired.mean == pytest.approx(0.02)
    assert verdict(paired, "greater") == "supported"
    assert verdict(paired, "less") == "not supported"
    ea, eb = estimate(a), estimate(b)
    assert ea.lo < eb.hi  # unpaired, the two intervals overlap
    assert paired_difference(b, a).mean == pytest.approx(-0.02)


# ----------------------------------------------------------------------------- seeds and images

#: two seeds x three images: seed means 1/3, 2/3; image means 1, 1/2, 0; grand mean 1/2
TWO_BY_THREE = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]


def test_variance_components_by_hand():
    c = variance_components(TWO_BY_THREE)
    assert (c.n_seeds, c.n_images) == (2, 3)
    assert c.seed_ms == pytest.approx(3 * (2 * (1 / 6) ** 2))  # N · var(1/3, 2/3) = 1/6
    assert c.image_ms == pytest.approx(2 * (0.25 + 0 + 0.25) / 2)  # S · var(1, 1/2, 0) = 1/2
    # residuals ±[1/6, -1/3, 1/6] in each seed: 1/3 over (S - 1)(N - 1) = 2
    assert c.resid_ms == pytest.approx(1 / 6)
    assert c.seed_sd == pytest.approx(math.sqrt(1 / 18))  # the sd of 1/3 and 2/3
    assert c.image_var == pytest.approx((1 / 2 - 1 / 6) / 2)
    # sqrt(t²_1 · s_seed² / 2 + t²_2 · s_image² / 3) = sqrt(12.706² / 36 + 4.303² / 18)
    half = math.sqrt(t_quantile(0.975, 1) ** 2 / 36 + t_quantile(0.975, 2) ** 2 / 18)
    assert c.half_width() == pytest.approx(half) and half == pytest.approx(2.348, abs=1e-3)
    est = seeds_images_ci(TWO_BY_THREE)
    assert (est.mean, est.n, est.method) == (0.5, 2, "seeds+images")
    assert (est.lo, est.hi) == pytest.approx((0.5 - half, 0.5 + half))
    at_90 = math.sqrt(t_quantile(0.95, 1) ** 2 / 36 + t_quantile(0.95, 2) ** 2 / 18)
    assert seeds_images_ci(TWO_BY_THREE, level=0.9).hi == pytest.approx(0.5 + at_90)
    assert est.components == c and est.seed_sd == c.seed_sd


def test_the_mean_squares_split_the_total_sum_of_squares():
    noise = np.random.default_rng(7).random((4, 30))
    for x in (noise + np.linspace(0, 1, 30), noise):  # with and without an image effect
        c = variance_components(x)
        s, n = x.shape
        total = ((x - x.mean()) ** 2).sum()
        parts = (s - 1) * c.seed_ms + (n - 1) * c.image_ms + (s - 1) * (n - 1) * c.resid_ms
        assert parts == pytest.approx(total)
        # s_seed² / S + s_image² / N = (MS_seed + MS_image - MS_resid) / (S N), cut at 0
        image = max(0.0, c.image_ms - c.resid_ms)
        parts = c.seed_sd**2 / s + c.image_var / n
        assert parts == pytest.approx((c.seed_ms + image) / (s * n))
    assert c.image_var == 0.0  # pure noise: nothing shared by the images
    assert c.half_width() == pytest.approx(t_quantile(0.975, 3) * c.seed_sd / 2)


def test_an_image_effect_shared_by_every_seed_widens_the_interval():
    # a is better on the first 20 of 200 images in every seed, by the same 10 points per seed:
    # the per-seed differences agree exactly, so only the images say how sure 10 points is
    a = [np.r_[np.ones(20), np.zeros(180)]] * 3
    b = [np.zeros(200)] * 3
    paired = paired_difference(a, b)
    assert paired.mean == pytest.approx(0.1) and paired.seed_sd == pytest.approx(0, abs=1e-12)
    assert paired.components.image_var == pytest.approx(20 / 200 * 180 / 199)
    half = t_quantile(0.975, 199) * math.sqrt(0.1 * 0.9 * 200 / 199 / 200)
    assert paired.hi - paired.mean == pytest.approx(half)  # df = N - 1: the images alone
    assert mean_ci(paired_means(a, b)).hi == pytest.approx(0.1)  # seeds alone: zero width


def test_no_image_spread_leaves_the_seeds_t_interval():
    x = [np.full(50, v) for v in (0.2, 0.3, 0.4)]
    est = seeds_images_ci(x)
    ref = mean_ci([0.2, 0.3, 0.4])
    assert est.components.image_var == 0.0
    assert (est.lo, est.hi) == pytest.approx((ref.lo, ref.hi))


def test_components_carried_to_more_seeds():
    c = variance_components(TWO_BY_THREE)
    assert c.at(2) is c
    five = c.at(5)
    assert (five.n_seeds, five.n_images, five.seed_ms, five.resid_ms) == (
        5,
        3,
        c.seed_ms,
        c.resid_ms,
    )
    assert five.image_ms == pytest.approx(1 / 6 + 5 * (1 / 6))  # resid + n · s_image²
    assert five.image_var == pytest.approx(c.image_var) and five.seed_sd == c.seed_sd
    seed, image = t_quantile(0.975, 4) ** 2 * c.seed_sd**2 / 5, t_quantile(0.975, 2) ** 2 / 18
    assert five.half_width() == pytest.approx(math.sqrt(seed + image))
    one = VarianceComponents(3, 1, 0.04)
    assert one.at(8) == VarianceComponents(8, 1, 0.04)


# ----------------------------------------------------------------------------- calibration

SIM_STUDIES = 1000
SIM_IMAGES = 200


def simulate_studies(rng, seeds: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-image 0/1 correctness of methods A and B [studies, seeds, images], one study per
    row: logit = -1 + shift (A only) + 5 · difficulty (shared by both methods and every
    seed) + a per-method image effect (sd 0.6, shared by that method's seeds) + a seed
    effect (sd 0.7, shared by both methods: a lucky run) + a per-method seed effect (sd 0.1).
    Robust accuracy about 43%, a model's seed-to-seed sd about 5 points, the paired
    difference's about 3 points (mostly which images flip from run to run)."""
    shape = (SIM_STUDIES, 2, seeds, SIM_IMAGES)
    difficulty = rng.normal(size=(SIM_STUDIES, 1, 1, SIM_IMAGES))
    image = rng.normal(0.0, 0.6, size=(SIM_STUDIES, 2, 1, SIM_IMAGES))
    run = rng.normal(0.0, 0.7, size=(SIM_STUDIES, 1, seeds, 1))
    own = rng.normal(0.0, 0.1, size=(SIM_STUDIES, 2, seeds, 1))
    offset = np.array([shift, 0.0]).reshape(1, 2, 1, 1)
    logit = -1.0 + offset + 5.0 * difficulty + image + run + own
    correct = (rng.random(shape) < 1.0 / (1.0 + np.exp(-logit))).astype(float)
    return correct[:, 0], correct[:, 1]


def seed_sd(x: np.ndarray) -> float:
    """The seed-to-seed sd of the per-seed means of x [studies, seeds, images], pooled."""
    return float(np.sqrt(x.mean(axis=2).var(axis=1, ddof=1).mean()))


def verdicts(a: np.ndarray, b: np.ndarray) -> list[str]:
    return [verdict(paired_difference(x, y), "greater") for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_with_no_true_difference_a_verdict_comes_out_about_5_percent_of_the_time(seeds):
    a, b = simulate_studies(np.random.default_rng(100 + seeds), seeds)
    assert 0.04 < seed_sd(a) < 0.065  # the premise: a model moves ~5 points with the seed
    assert 0.025 < seed_sd(a - b) < 0.033  # and the paired difference ~3 points
    got = verdicts(a, b)
    rate = 1 - got.count("inconclusive") / len(got)
    print(f"\nfalse verdicts, true difference 0, {seeds} seeds, {SIM_STUDIES} studies: {rate:.1%}")
    assert rate <= 0.06


def test_five_seeds_support_a_true_difference_of_two_seed_sds_most_of_the_time():
    a, b = simulate_studies(np.random.default_rng(7), 5, shift=0.8)
    d = a - b
    size = float(d.mean()) / seed_sd(d)  # the true difference, in seed sds
    assert 1.8 < size < 2.2
    got = verdicts(a, b)
    power = got.count("supported") / len(got)
    print(f"\nsupported, true difference {size:.2f} seed sds, 5 seeds: {power:.1%}")
    assert power > 0.5 and got.count("not supported") == 0


# ----------------------------------------------------------------------------- seeds needed


def test_seeds_needed_by_hand():
    diff = mean_ci([0.01, 0.03, 0.05])  # mean 0.03, sd 0.02: half-width t_{n-1} · 0.02 / √n
    halves = {n: t_quantile(0.975, n - 1) * 0.02 / math.sqrt(n) for n in (2, 3, 4, 5)}
    assert halves[4] > 0.03 > halves[5]  # 0.0318 at 4 seeds, 0.0248 at 5
    assert diff.hi - diff.mean == pytest.approx(halves[3])
    assert verdict(diff, "greater") == "inconclusive" and seeds_needed(diff) == 5
    assert seeds_needed(mean_ci([0.19, 0.21, 0.23])) == 2  # half-width 0.18 at 2 < 0.21


def test_seeds_needed_is_none_where_it_cannot_be_said():
    assert seeds_needed(mean_ci([0.01, -0.01])) is None  # a difference of zero
    assert seeds_needed(bootstrap_ci([1.0, 0.0, 1.0])) is None  # one seed
    assert seeds_needed(Estimate(0.1, 0.0, 0.2, 3, "seeds")) is None  # no components
    # images alone too wide: 2 of 20 images favour a, in every seed; t_19 · s_image / √20
    # is about 0.14 > 0.1, and no number of seeds shrinks it
    a = [np.r_[np.ones(2), np.zeros(18)] + 0.001 * k for k in range(3)]
    diff = paired_difference(a, [np.zeros(20)] * 3)
    assert diff.mean == pytest.approx(0.101) and seeds_needed(diff) is None


@settings(max_examples=60, deadline=None)
@given(
    seeds=st.integers(2, 5),
    images=st.integers(2, 12),
    data=st.data(),
)
def test_seeds_needed_agrees_with_the_verdict(seeds, images, data):
    cells = st.sampled_from([-1.0, 0.0, 0.0, 1.0])
    x = np.array(data.draw(st.lists(cells, min_size=seeds * images, max_size=seeds * images)))
    diff = estimate(x.reshape(seeds, images))
    need = seeds_needed(diff)
    conclusive = verdict(diff, "greater") != "inconclusive"
    assert conclusive == (need is not None and need <= seeds)
    comp = diff.components
    halves = [comp.at(n).half_width() for n in range(2, 40)]
    assert all(h2 <= h1 * (1 + 1e-12) for h1, h2 in pairwise(halves))
    if need is not None:
        assert comp.at(need).half_width() < abs(diff.mean)
        assert need == 2 or comp.at(need - 1).half_width() >= abs(diff.mean)


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
@pytest.mark.parametrize("method", ["seeds", "seeds+images"])
def test_verdict(lo, hi, direction, expected, method):
    assert verdict(Estimate((lo + hi) / 2, lo, hi, 3, method), direction) == expected
    assert expected in VERDICTS
    assert verdict(Estimate((lo + hi) / 2, lo, hi, 200, "bootstrap"), direction) == NEEDS_SEEDS


def test_one_seed_never_gives_a_verdict_on_the_claim():
    a, b = correlated_pair(flips=100)  # 25 points better on every resample of the images
    one = paired_difference([a], [b])
    assert one.method == "bootstrap" and one.lo > 0.15
    assert verdict(one, "greater") == verdict(one, "less") == NEEDS_SEEDS
    assert INTERVAL_OVER[one.method] == "images only, one seed"
    assert seeds_needed(one) is None and one.seed_sd is None


def test_the_rules_are_quotable_sentences():
    for rule in (VERDICT_RULE, INTERVAL_RULE, ONE_SEED_RULE, SEEDS_NEEDED_RULE):
        assert rule.endswith(".") and rule.count(". ") == 0, rule
    assert all(v in VERDICT_RULE for v in VERDICTS)
    assert set(INTERVAL_OVER) == set(METHODS)


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


TWO_COMP = VarianceComponents(2, 3, 0.1, 0.2, 0.05)


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
        (lambda: Estimate(0.5, 0.4, 0.6, 9, "bootstrap", components=TWO_COMP), "several seeds"),
        (lambda: Estimate(0.5, 0.4, 0.6, 3, "seeds", components=TWO_COMP), "over 2 seeds"),
        (lambda: Estimate(0.5, 0.4, 0.6, 3, "seeds", components=(1, 2)), "VarianceComponents"),
        (lambda: variance_components([[1, 0, 1]]), "at least 2 seeds"),
        (lambda: seeds_images_ci([[1], [0]]), "use mean_ci"),
        (lambda: VarianceComponents(1, 5, 0.1), "n_seeds must be an int >= 2"),
        (lambda: VarianceComponents(2, 5, -0.1), "seed_ms must be a finite number >= 0"),
        (lambda: VarianceComponents(2, 1, 0.1, 0.2), "one value per seed"),
        (lambda: VarianceComponents(2, 5, 0.1).at(1), "n_seeds"),
        (lambda: VarianceComponents(2, 5, 0.1).half_width(1.5), "level"),
        (lambda: seeds_needed((0.1, 0.0, 0.2)), "Estimate"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_within_cuts_the_interval_to_the_values_the_quantity_can_take():
    """Three seeds near 100% with one weak seed: the t-interval reaches past 1; cut to
    [0, 1], its upper end is 1 and the mean and lower end stay as they were."""
    per_seed = [np.ones(50), np.ones(50), np.r_[np.ones(40), np.zeros(10)]]
    raw = estimate(per_seed)
    assert raw.hi > 1.0
    cut = raw.within(0.0, 1.0)
    assert (cut.mean, cut.lo, cut.hi, cut.n, cut.method) == (raw.mean, raw.lo, 1.0, 3, raw.method)
    assert cut.format() == f"{round(100 * raw.mean, 1):.1f} [{round(100 * raw.lo, 1):.1f}, 100.0]"
    single = estimate([[0.5]])
    assert single.within(0.0, 1.0) == single
    with pytest.raises(ValueError, match=r"the mean 0.5 lies outside \[0.6, 1.0\]"):
        single.within(0.6, 1.0)


def test_the_report_cuts_accuracy_intervals_to_0_100():
    from pipeline.stages.report.numbers import accuracy_estimate

    per_seed = [np.ones(50), np.ones(50), np.r_[np.zeros(40), np.ones(10)]]
    est = accuracy_estimate(per_seed)  # seed means 1, 1, 0.2: the t-interval spans ±115 pts
    assert (est.lo, est.hi) == (0.0, 1.0)
    assert est.mean == pytest.approx(2.2 / 3)
