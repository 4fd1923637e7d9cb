"""Uncertainty for the study's numbers: mean ± 95% CI, and paired differences with a verdict.

Each accuracy or bound comes from a few hundred test images, sometimes over several
training seeds. The rule (``estimate``):

- several seeds: a Student-t interval over the per-seed means (method "seeds"). It answers
  how much the number moves with the training seed on these test images; with 2 or 3
  seeds it is wide (t_0.975 = 12.7 at 1 degree of freedom), and that is the honest answer.
- one seed with per-sample values: a percentile bootstrap over the test images (method
  "bootstrap"). It answers how much the number moves with the choice of test images.
- one value and nothing per sample: no interval (method "single", ``lo`` = ``hi`` = None).

A claim ("method A beats method B") is checked on the PAIRED difference A − B: the same
test images and, with several seeds, the same seeds (``paired_difference``), which removes
the variation the two models share (hard images, a lucky seed) and so gives a narrower and
correct interval. ``verdict`` turns its interval into a word by the rule ``VERDICT_RULE``.

Everything is deterministic: the bootstrap uses its own ``numpy.random.default_rng(seed)``,
never the global RNGs, so a fixed seed gives the same numbers on every run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

METHODS = ("seeds", "bootstrap", "single")
DIRECTIONS = ("greater", "less")
VERDICTS = ("supported", "not supported", "inconclusive")
VERDICT_RULE = (
    "A claim is supported when the 95% confidence interval of the paired difference lies "
    "entirely on the claimed side of zero, not supported when it lies entirely on the other "
    "side, and inconclusive when it contains zero or there is no interval (a single run "
    "without per-sample values)."
)

_BOOT_CHUNK = 1 << 20  # resampled values held in memory at once


@dataclass(frozen=True)
class Estimate:
    """A mean with its confidence interval.

    ``lo``, ``hi``: the interval at ``level`` (None for method "single": no interval).
    ``n``: the units the interval is over (seeds for "seeds", test images for "bootstrap",
    1 for "single"). ``method``: one of ``METHODS``.
    """

    mean: float
    lo: float | None
    hi: float | None
    n: int
    method: str
    level: float = 0.95

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        no_ci = self.lo is None
        if no_ci != (self.hi is None) or no_ci != (self.method == "single"):
            raise ValueError(
                f"lo and hi must both be None exactly when method is 'single', got "
                f"lo={self.lo!r}, hi={self.hi!r}, method={self.method!r}"
            )
        if self.lo is not None and self.lo > self.hi:
            raise ValueError(f"lo must not exceed hi, got [{self.lo}, {self.hi}]")

    def format(self, scale: float = 100, digits: int = 1, signed: bool = False) -> str:
        """A compact table cell: ``"61.0 [55.3, 66.7]"`` (mean [lo, hi], times ``scale``,
        ``digits`` decimals), or ``"61.0 (no CI)"`` for method "single". ``signed`` writes
        a sign on every number, for differences: ``"+3.2 [-0.4, +6.8]"``.
        """

        def num(v: float) -> str:
            v = round(v * scale, digits) + 0.0  # + 0.0 turns -0.0 into 0.0
            return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"

        if self.lo is None:
            return f"{num(self.mean)} (no CI)"
        return f"{num(self.mean)} [{num(self.lo)}, {num(self.hi)}]"


# ----------------------------------------------------------------------------- t quantiles


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for aa in (
            m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m)),
            -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _beta_inc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def _t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0 under Student's t with ``df`` degrees of freedom."""
    return 0.5 * _beta_inc(df / 2.0, 0.5, df / (df + t * t))


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` > 0 degrees of freedom (pure Python,
    accurate to about 1e-10 relative): ``t_quantile(0.975, 1)`` = 12.706."""
    if not (isinstance(p, int | float) and 0.0 < p < 1.0):
        raise ValueError(f"p must be a probability in (0, 1), got {p!r}")
    if not (isinstance(df, int | float) and not isinstance(df, bool) and 0 < df < math.inf):
        raise ValueError(f"df must be a finite number > 0, got {df!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while _t_upper_tail(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):  # bisection: the tail is decreasing in t
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _t_upper_tail(mid, df) > tail else (lo, mid)
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- inputs


def _check_level(level: float) -> float:
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0 < level < 1:
        raise ValueError(f"level must be a number in (0, 1), e.g. 0.95, got {level!r}")
    return float(level)


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _vector(values: Any, name: str) -> np.ndarray:
    """``values`` (a sequence of numbers or bools, a numpy array or a tensor) as a finite,
    non-empty float64 vector [N]."""
    if isinstance(values, str | bytes):
        raise ValueError(f"{name} must be a sequence of numbers, got a string")
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a sequence of numbers ({err})") from None
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D sequence of numbers, got shape {arr.shape}; "
            "pass one vector per seed, e.g. [values] for a single seed"
        )
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has non-finite values (nan or inf)")
    return arr


def _per_seed(per_seed: Any, name: str) -> list[np.ndarray]:
    """One per-sample vector per seed, all over the same N images."""
    if isinstance(per_seed, str | bytes) or not isinstance(
        per_seed, Sequence | np.ndarray | torch.Tensor
    ):
        raise ValueError(f"{name} must be a list of per-sample vectors, one per seed")
    vectors = [_vector(v, f"{name}[{i}]") for i, v in enumerate(per_seed)]
    if not vectors:
        raise ValueError(f"{name} has no seeds; pass one per-sample vector per seed")
    sizes = {len(v) for v in vectors}
    if len(sizes) > 1:
        raise ValueError(
            f"{name}: the seeds have different numbers of samples {[len(v) for v in vectors]}; "
            "every seed must be evaluated on the same images"
        )
    return vectors


# ----------------------------------------------------------------------------- intervals


def mean_ci(values: Sequence[float] | Any, level: float = 0.95) -> Estimate:
    """Mean of per-seed values (one number per seed) with a Student-t interval
    mean ± t_{(1+level)/2, n-1} · sd / sqrt(n) (method "seeds", n = number of seeds).

    One value gives method "single" (no interval): a single run says nothing about the
    seed-to-seed spread. The interval is not shrunk for few seeds.
    """
    level = _check_level(level)
    v = _vector(values, "values")
    mean = math.fsum(v.tolist()) / len(v)
    if len(v) == 1:
        return Estimate(mean, None, None, 1, "single", level)
    sd = math.sqrt(math.fsum(((v - mean) ** 2).tolist()) / (len(v) - 1))
    half = t_quantile((1 + level) / 2, len(v) - 1) * sd / math.sqrt(len(v))
    return Estimate(mean, mean - half, mean + half, len(v), "seeds", level)


def bootstrap_ci(
    per_sample: Sequence[float] | Any, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> Estimate:
    """Mean over test images with a percentile bootstrap interval (method "bootstrap",
    n = number of images): ``n_boot`` resamples of the images with replacement, and the
    (1 − level)/2 and (1 + level)/2 quantiles (numpy's linear interpolation) of their means.

    ``per_sample``: one value per image [N] (0/1 correctness, or a per-image bound). The
    reported mean is the plain sample mean. One image gives method "single".
    """
    level = _check_level(level)
    n_boot = _check_int(n_boot, "n_boot", 1)
    seed = _check_int(seed, "seed", 0)
    x = _vector(per_sample, "per_sample")
    n = len(x)
    mean = math.fsum(x.tolist()) / n
    if n == 1:
        return Estimate(mean, None, None, 1, "single", level)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, _BOOT_CHUNK // n)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        means[start : start + k] = x[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = 1 - level
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Estimate(mean, float(lo), float(hi), n, "bootstrap", level)


def estimate(
    per_seed_per_sample: Sequence[Any], level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> Estimate:
    """The study's estimate of a mean, by the rule of this module: several seeds ->
    ``mean_ci`` of the per-seed means; one seed -> ``bootstrap_ci`` over its images.

    ``per_seed_per_sample``: one per-sample vector [N] per seed, all over the same N images
    (a number with no per-sample values is a vector of one: ``[[value]]`` gives "single").
    """
    vectors = _per_seed(per_seed_per_sample, "per_seed_per_sample")
    if len(vectors) > 1:
        return mean_ci([float(v.mean()) for v in vectors], level)
    return bootstrap_ci(vectors[0], level, n_boot, seed)


def paired_difference(
    a: Sequence[Any], b: Sequence[Any], level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> Estimate:
    """The mean of a − b with its interval, paired image by image and seed by seed.

    ``a``, ``b``: one per-sample vector [N] per seed, ``a[i]`` and ``b[i]`` from the same
    seed and over the same N images in the same order. Several seeds: t-interval of the
    per-seed differences of means (``mean_ci``). One seed: bootstrap of the per-image
    differences, i.e. the image indices are resampled once for both models.
    """
    va, vb = _per_seed(a, "a"), _per_seed(b, "b")
    if len(va) != len(vb):
        raise ValueError(
            f"a has {len(va)} seeds and b has {len(vb)}; a paired difference needs the same "
            "seeds for both"
        )
    if len(va[0]) != len(vb[0]):
        raise ValueError(
            f"a has {len(va[0])} samples per seed and b has {len(vb[0])}; a paired difference "
            "needs the same images for both"
        )
    if len(va) > 1:
        return mean_ci([float(x.mean() - y.mean()) for x, y in zip(va, vb, strict=True)], level)
    return bootstrap_ci(va[0] - vb[0], level, n_boot, seed)


def verdict(diff: Estimate, direction: str) -> str:
    """One of ``VERDICTS`` for the claim that the true difference is ``direction``
    ("greater" or "less") than zero, by ``VERDICT_RULE``: the interval must exclude zero
    strictly; no interval is inconclusive."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not isinstance(diff, Estimate):
        raise ValueError(f"diff must be an Estimate, got {type(diff).__name__}")
    if diff.lo is None:
        return "inconclusive"
    above, below = diff.lo > 0, diff.hi < 0
    if direction == "less":
        above, below = below, above
    if above:
        return "supported"
    if below:
        return "not supported"
    return "inconclusive"
