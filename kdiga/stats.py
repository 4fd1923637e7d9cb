"""Uncertainty for the study's numbers: mean ± 95% CI, and paired differences with a verdict.

Each accuracy or bound comes from a few hundred test images, over one or several training
seeds, and both vary: another training run gives another model, other test images another
mean. The rule (``estimate``, ``paired_difference``):

- several seeds, per-sample values: an interval over seeds AND images (method
  "seeds+images", ``seeds_images_ci``). The S x N values x_si (seed s, image i) are a
  two-way crossed layout, x_si = μ + seed_s + image_i + resid_si, whose mean has variance
  σ²_seed / S + σ²_image / N + σ²_resid / (S N). Its mean squares (``VarianceComponents``,
  variances with ddof 1) are ``MS_seed`` = N · var_s(per-seed means),
  ``MS_image`` = S · var_i(per-image means over seeds) and ``MS_resid``, the seed × image
  interaction. They give the two components of the variance of the mean::

      seed component   s_seed² / S,   s_seed² = MS_seed / N          (S − 1 df)
      image component  s_image² / N,  s_image² = max(0, (MS_image − MS_resid) / S)  (N − 1 df)

  s_seed is the spread of the per-seed means: the training run's variation, together with
  the image noise each run adds (the σ²_resid term). s_image² is the variance of the image
  effect every seed shares (images one model finds easier than the other in every run):
  what a Student-t interval over the per-seed means misses. The interval combines the two
  as Banerjee's conservative solution of the Behrens-Fisher problem does, each component
  with its own t quantile::

      mean ± sqrt(t²_{S−1} · s_seed² / S + t²_{N−1} · s_image² / N),   t at (1 + level) / 2.

  The usual alternative, one t quantile at Satterthwaite's pooled degrees of freedom, is
  liberal at 2 and 3 seeds (false verdicts up to 7% in the same kind of simulation): the
  pooled df is itself estimated, and rises exactly when the seed variance comes out too
  small. The combination above pools nothing, is the plain t-interval when either
  component is 0, and keeps false verdicts near or below 5% at 2, 3 and 5 seeds
  (``tests/test_stats.py`` simulates it). With 2 or 3 seeds it is wide (t_0.975 = 12.7 at
  1 degree of freedom), and that is the honest answer.
- several seeds, one value each (no per-sample values): the Student-t interval over the
  per-seed values, df = S − 1 (method "seeds", ``mean_ci``): the image component is unknown.
- one seed with per-sample values: a percentile bootstrap over the test images (method
  "bootstrap", ``bootstrap_ci``): images only, one seed. It says how much the number moves
  with the choice of images, not with the training run.
- one value and nothing per sample: no interval (method "single", ``lo`` = ``hi`` = None).

A claim ("method A beats method B") is checked on the PAIRED difference A − B: the same
test images and the same seeds (``paired_difference``), which removes the variation the two
models share (hard images, a lucky seed) and so gives a narrower and correct interval.
``verdict`` turns its interval into a word by the rule ``VERDICT_RULE``; with one seed the
training run's variation cannot be estimated, and the verdict is "needs ≥ 2 seeds".
``seeds_needed`` says how many seeds would make a difference of the observed size
conclusive under the same rule (``SEEDS_NEEDED_RULE``).

Everything is deterministic: the bootstrap uses its own ``numpy.random.default_rng(seed)``,
never the global RNGs, so a fixed seed gives the same numbers on every run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

METHODS = ("seeds+images", "seeds", "bootstrap", "single")
#: what each method's interval is over, as the report labels it
INTERVAL_OVER = {
    "seeds+images": "seeds and images",
    "seeds": "seeds only",
    "bootstrap": "images only, one seed",
    "single": "no interval",
}
DIRECTIONS = ("greater", "less")
NEEDS_SEEDS = "needs ≥ 2 seeds"
VERDICTS = ("supported", "not supported", "inconclusive", NEEDS_SEEDS)
INTERVAL_RULE = (
    "With S training seeds and N test images the interval is mean ± √(t²_{S−1} · s_seed²/S + "
    "t²_{N−1} · s_image²/N), each component with its own Student-t quantile (Banerjee's "
    "conservative rule): s_seed is the standard deviation across seeds of the per-seed means "
    "(the training run's variation), and s_image² = max(0, (MS_image − MS_resid)/S) the "
    "variance of the image effect every seed shares (MS_image: S times the variance across "
    "images of the per-image means over seeds; MS_resid: the seed × image interaction mean "
    "square)."
)
ONE_SEED_RULE = (
    "With one training seed the interval is a percentile bootstrap over the test images "
    "(images only, one seed): it says how much the number moves with the choice of images, "
    "not with the training run, which one seed cannot measure."
)
VERDICT_RULE = (
    "A claim is supported when the 95% confidence interval of the paired difference lies "
    "entirely on the claimed side of zero, not supported when it lies entirely on the other "
    f"side, inconclusive when it contains zero, and {NEEDS_SEEDS} when the study has one "
    "training seed (its interval covers the test images only, and the next training run may "
    "take the verdict back)."
)
SEEDS_NEEDED_RULE = (
    "Seeds for a verdict is the smallest number of seeds at which the interval's half-width, "
    "with the seed and image spread observed here, falls below the observed difference (a "
    "true difference of that size is then conclusive about half the time); — with one seed, "
    "a difference of zero, or when the images' own spread is too wide for any number of "
    "seeds."
)

_BOOT_CHUNK = 1 << 20  # resampled values held in memory at once
_MAX_SEEDS = 1 << 20  # seeds_needed searches no further


@dataclass(frozen=True)
class VarianceComponents:
    """The spread of one quantity measured on S seeds x N test images (a correctness, or the
    paired difference of two), as the mean squares of the two-way crossed layout with one
    value x_si per (seed, image) cell, variances with ddof 1:

    - ``seed_ms`` = N · var_s(mean_i x_si); expectation σ²_resid + N σ²_seed;
    - ``image_ms`` = S · var_i(mean_s x_si); expectation σ²_resid + S σ²_image;
    - ``resid_ms`` = Σ (x_si − x̄_s. − x̄_.i + x̄..)² / ((S − 1)(N − 1)); expectation σ²_resid.

    ``n_images`` = 1 means one value per seed: the image terms are then 0 (not estimable).
    """

    n_seeds: int
    n_images: int
    seed_ms: float
    image_ms: float = 0.0
    resid_ms: float = 0.0

    def __post_init__(self) -> None:
        _check_int(self.n_seeds, "n_seeds", 2)
        _check_int(self.n_images, "n_images", 1)
        for name in ("seed_ms", "image_ms", "resid_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.n_images == 1 and (self.image_ms or self.resid_ms):
            raise ValueError(
                "with n_images = 1 (one value per seed) image_ms and resid_ms must be 0, got "
                f"{self.image_ms!r} and {self.resid_ms!r}"
            )

    @property
    def seed_sd(self) -> float:
        """The standard deviation across seeds of the per-seed means (s_seed)."""
        return math.sqrt(self.seed_ms / self.n_images)

    @property
    def image_var(self) -> float:
        """The variance of the image effect shared by every seed (s_image², >= 0)."""
        return max(0.0, (self.image_ms - self.resid_ms) / self.n_seeds)

    def half_width(self, level: float = 0.95) -> float:
        """sqrt(t²_{S−1} · s_seed² / S + t²_{N−1} · s_image² / N), t at (1 + level) / 2: the
        half-width of the interval around the mean (the image term is left out when
        s_image² is 0)."""
        q = (1 + _check_level(level)) / 2
        s, n = self.n_seeds, self.n_images
        v = t_quantile(q, s - 1) ** 2 * self.seed_ms / (s * n)
        if self.image_var > 0:
            v += t_quantile(q, n - 1) ** 2 * self.image_var / n
        return math.sqrt(v)

    def at(self, n_seeds: int) -> VarianceComponents:
        """The mean squares expected with ``n_seeds`` seeds on the same N images, if the
        variance components were those estimated here (s_seed and s_image stay, the image
        mean square grows as resid + n_seeds · s_image²)."""
        n_seeds = _check_int(n_seeds, "n_seeds", 2)
        if n_seeds == self.n_seeds:
            return self
        if self.n_images == 1:
            return VarianceComponents(n_seeds, 1, self.seed_ms)
        image_ms = self.resid_ms + n_seeds * self.image_var
        return VarianceComponents(n_seeds, self.n_images, self.seed_ms, image_ms, self.resid_ms)


@dataclass(frozen=True)
class Estimate:
    """A mean with its confidence interval.

    ``lo``, ``hi``: the interval at ``level`` (None for method "single": no interval).
    ``n``: the units the interval is over (seeds for "seeds+images" and "seeds", test images
    for "bootstrap", 1 for "single"). ``method``: one of ``METHODS``. ``components``: the
    seed and image spread the interval was made from (methods "seeds+images" and "seeds";
    None otherwise or where not known).
    """

    mean: float
    lo: float | None
    hi: float | None
    n: int
    method: str
    level: float = 0.95
    components: VarianceComponents | None = None

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
        c = self.components
        if c is None:
            return
        if not isinstance(c, VarianceComponents):
            raise ValueError(f"components must be VarianceComponents or None, got {c!r}")
        if self.method not in ("seeds+images", "seeds"):
            raise ValueError(
                f"components belong to methods 'seeds+images' and 'seeds' (several seeds), "
                f"got method {self.method!r}"
            )
        if c.n_seeds != self.n:
            raise ValueError(f"components are over {c.n_seeds} seeds but n is {self.n}")

    def within(self, low: float, high: float) -> Estimate:
        """The same estimate with its interval cut to [``low``, ``high``], the values the
        quantity can take: an accuracy lies in [0, 1], while a t-interval over few seeds can
        reach past either end. The mean must lie in that range (``ValueError`` otherwise)."""
        if not low <= self.mean <= high:
            raise ValueError(f"the mean {self.mean} lies outside [{low}, {high}]")
        if self.lo is None:
            return self
        return dataclasses.replace(self, lo=max(self.lo, low), hi=min(self.hi, high))

    @property
    def seed_sd(self) -> float | None:
        """The standard deviation across seeds of the per-seed means; None with one seed."""
        return None if self.components is None else self.components.seed_sd

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


def variance_components(per_seed_per_sample: Sequence[Any]) -> VarianceComponents:
    """The mean squares of S >= 2 seeds x N images (``VarianceComponents``).

    ``per_seed_per_sample``: one per-sample vector [N] per seed, the same N images in the
    same order for every seed; N = 1 (one value per seed) leaves the image terms at 0.
    """
    return _components(_seeds_by_images(per_seed_per_sample))


def _seeds_by_images(per_seed_per_sample: Sequence[Any]) -> np.ndarray:
    """The per-sample vectors as one array [S, N], S >= 2."""
    vectors = _per_seed(per_seed_per_sample, "per_seed_per_sample")
    if len(vectors) < 2:
        raise ValueError(
            "variance components need at least 2 seeds, got 1: with one seed the training "
            "run's variation cannot be estimated"
        )
    return np.stack(vectors)


def _components(x: np.ndarray) -> VarianceComponents:
    s, n = x.shape
    seed_means, image_means = x.mean(axis=1), x.mean(axis=0)
    seed_ms = n * float(seed_means.var(ddof=1))
    if n == 1:
        return VarianceComponents(s, 1, seed_ms)
    image_ms = s * float(image_means.var(ddof=1))
    resid = x - seed_means[:, None] - image_means[None, :] + x.mean()
    resid_ms = float((resid * resid).sum()) / ((s - 1) * (n - 1))
    return VarianceComponents(s, n, seed_ms, image_ms, resid_ms)


def _interval(mean: float, comp: VarianceComponents, method: str, level: float) -> Estimate:
    half = comp.half_width(level)
    return Estimate(mean, mean - half, mean + half, comp.n_seeds, method, level, comp)


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
    var = math.fsum(((v - mean) ** 2).tolist()) / (len(v) - 1)
    return _interval(mean, VarianceComponents(len(v), 1, var), "seeds", level)


def seeds_images_ci(per_seed_per_sample: Sequence[Any], level: float = 0.95) -> Estimate:
    """Mean over S >= 2 seeds x N >= 2 images with the interval over both (method
    "seeds+images", n = S): mean ± ``VarianceComponents.half_width``, the components from
    ``variance_components`` (the rule in the module docstring).

    ``per_seed_per_sample``: one per-sample vector [N] per seed, the same N images in the
    same order for every seed.
    """
    level = _check_level(level)
    x = _seeds_by_images(per_seed_per_sample)
    if x.shape[1] < 2:
        raise ValueError(
            "seeds_images_ci needs at least 2 images per seed, got 1; for one value per seed "
            "use mean_ci"
        )
    mean = math.fsum(x.ravel().tolist()) / x.size
    return _interval(mean, _components(x), "seeds+images", level)


def bootstrap_ci(
    per_sample: Sequence[float] | Any, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> Estimate:
    """Mean over test images with a percentile bootstrap interval (method "bootstrap",
    n = number of images): ``n_boot`` resamples of the images with replacement, and the
    (1 − level)/2 and (1 + level)/2 quantiles (numpy's linear interpolation) of their means.

    ``per_sample``: one value per image [N] (0/1 correctness, or a per-image bound) from one
    training seed: the interval covers the images only. The reported mean is the plain
    sample mean. One image gives method "single".
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


def _by_rule(vectors: list[np.ndarray], level: float, n_boot: int, seed: int) -> Estimate:
    if len(vectors) == 1:
        return bootstrap_ci(vectors[0], level, n_boot, seed)
    if len(vectors[0]) == 1:
        return mean_ci([float(v[0]) for v in vectors], level)
    return seeds_images_ci(vectors, level)


def estimate(
    per_seed_per_sample: Sequence[Any], level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> Estimate:
    """The study's estimate of a mean, by the rule of this module: several seeds ->
    ``seeds_images_ci`` (``mean_ci`` when each seed has one value); one seed ->
    ``bootstrap_ci`` over its images.

    ``per_seed_per_sample``: one per-sample vector [N] per seed, all over the same N images
    (a number with no per-sample values is a vector of one: ``[[value]]`` gives "single").
    """
    return _by_rule(_per_seed(per_seed_per_sample, "per_seed_per_sample"), level, n_boot, seed)


def paired_difference(
    a: Sequence[Any], b: Sequence[Any], level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> Estimate:
    """The mean of a − b with its interval, paired image by image and seed by seed.

    ``a``, ``b``: one per-sample vector [N] per seed, ``a[i]`` and ``b[i]`` from the same
    seed and over the same N images in the same order. The per-sample differences go
    through ``estimate``'s rule: several seeds, the interval over seeds and images of the
    differences; one seed, the bootstrap of the per-image differences, i.e. the image
    indices are resampled once for both models.
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
    return _by_rule([x - y for x, y in zip(va, vb, strict=True)], level, n_boot, seed)


def verdict(diff: Estimate, direction: str) -> str:
    """One of ``VERDICTS`` for the claim that the true difference is ``direction``
    ("greater" or "less") than zero, by ``VERDICT_RULE``: the interval must exclude zero
    strictly; an interval from one seed (method "bootstrap" or "single") gives
    ``NEEDS_SEEDS`` whatever it says."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not isinstance(diff, Estimate):
        raise ValueError(f"diff must be an Estimate, got {type(diff).__name__}")
    if diff.method in ("bootstrap", "single"):
        return NEEDS_SEEDS
    above, below = diff.lo > 0, diff.hi < 0
    if direction == "less":
        above, below = below, above
    if above:
        return "supported"
    if below:
        return "not supported"
    return "inconclusive"


def seeds_needed(diff: Estimate) -> int | None:
    """The smallest number of seeds n >= 2 at which the interval's half-width, with the
    spread of ``diff.components`` carried to n seeds (``VarianceComponents.at``), falls
    below |diff.mean| (``SEEDS_NEEDED_RULE``): a true difference of the observed size is
    then conclusive about half the time. At most ``diff.n`` exactly when ``verdict`` is
    conclusive now.

    None when it cannot be said: one seed (no components), a difference of 0, or an image
    spread so wide that no number of seeds would do (the half-width's limit with infinitely
    many seeds, t_{N−1} · s_image / √N, is not below |mean|).
    """
    if not isinstance(diff, Estimate):
        raise ValueError(f"diff must be an Estimate, got {type(diff).__name__}")
    comp, target = diff.components, abs(diff.mean)
    if comp is None or target == 0.0:
        return None
    q = (1 + diff.level) / 2
    if comp.image_var > 0 and (
        t_quantile(q, comp.n_images - 1) * math.sqrt(comp.image_var / comp.n_images) >= target
    ):
        return None

    def conclusive(n: int) -> bool:
        return comp.at(n).half_width(diff.level) < target

    lo, hi = 1, 2  # conclusive(lo) is false by convention, hi is the candidate
    while not conclusive(hi):
        if hi >= _MAX_SEEDS:
            return None
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # the half-width falls with n: bisect to the first conclusive n
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if conclusive(mid) else (mid, hi)
    return hi
