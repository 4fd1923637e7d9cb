"""Local-linearity bounds on adversarial robustness (paper section 3.3, Definition 2,
Proposition 2, Table 4).

The local linearity measure (LLM, paper eq. 10, after Qin et al. 2019) of a classifier f at
(x, y) and radius eps is

    γ(x) = max_{‖e‖ ≤ eps} |r(e)|,   r(e) = CE(f(x+e), y) − CE(f(x), y) − eᵀ∇x CE(f(x), y).

We keep the absolute value of Definition 2 (the authors' code drops it, which measures only
how far the loss rises above its tangent plane). We also restrict e to the valid image box,
x + e ∈ [0, 1]: that only shrinks the set, so the γ we report is still a lower bound of
Definition 2's maximum over the whole ball, and every point we evaluate is a real image.

Proposition 2 (paper eq. 11): for a student fs and a teacher ft and every e in the ball,

    |CE(fs(x+e), y) − CE(ft(x+e), y)| ≤ γs + γt + φ,
    φ = CE(fs(x), y) + CE(ft(x), y) + eps·‖∇x CE(fs(x), y) − ∇x CE(ft(x), y)‖_*.

Proof: write each CE at x+e as its value at x, plus eᵀg, plus its residual r(e); then
|r_s(e)| ≤ γs, |r_t(e)| ≤ γt, |CE_s(x) − CE_t(x)| ≤ CE_s(x) + CE_t(x) since CE ≥ 0, and
eᵀ(gs − gt) ≤ ‖e‖·‖gs − gt‖_* (Hölder). ‖·‖_* must be the DUAL of the ball's norm: ‖·‖₁ for
an L∞ ball, ‖·‖₂ for an L2 ball. The paper only says "a norm"; with the L2 norm under an L∞
ball the inequality is false (see tests). Table 4 reports ‖gs − gt‖₂ as a column, which we
compute as well, under its own name.

The maximum in γ is not computable; we seek it by projected ascent and keep, per sample, the
largest |r| over EVERY perturbation evaluated. Any evaluated point gives a valid lower bound of
the true maximum, so on every perturbation we evaluated the bound is a theorem, not an
estimate (`proposition2` evaluates both models on the union of both ascents and any extra
perturbations supplied). Elsewhere the bound holds only as far as γ is not underestimated:
`proposition2_violations` tests it where it could fail, at points no ascent chose (PGD
adversarial examples, random points) and at each model's ascent points against the other
model's γ.

The ascent ("adaptive", the default) runs from the ball's corners ±eps·sign(∇x CE) (the
FGSM points, or their L2 analogue), then from random starts, plus any caller-given warm
starts; it climbs |r| (or r, `signs`) with the attacks' own step and projection (`kdiga.attacks`:
`init_delta`, `step_delta`, `project_delta`) and a step that starts at 2·eps (a jump to a
corner of the ball) and halves, from the best point so far, whenever a step gains nothing. A
sample's run stops when its best value gained at most `tol` (relative) over its last
`patience` steps: it has converged. `LLMResult` records per sample the steps used, whether
every run converged, and γ at half the step budget. Where the ascent falls short is not the
step size but the landscape: r has several local maxima (each run converges to one of them),
so the budget buys restarts.

All inputs are images in [0, 1] with shape [B, C, H, W]; radii are in that pixel space.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiga.attacks import init_delta, perturbation_norm, pgd, project_delta, step_delta
from kdiga.progress import ProgressFn, Tracker
from kdiga.utils import eval_mode

logger = logging.getLogger(__name__)

NORMS = ("linf", "l2")
ASCENTS = ("adaptive", "fixed")
SIGNS = ("abs", "positive", "both")
_DUAL = {"linf": "l1", "l2": "l2"}  # the dual norm of each ball's norm
VIOLATION_KINDS = ("ascent", "pgd_student", "pgd_teacher", "random")

# The converging defaults (bench/llm_convergence.py measures them against a long budget).
STEPS = 20
RESTARTS = 3
TOL = 3e-3
PATIENCE = 3

__all__ = [
    "ASCENTS",
    "NORMS",
    "SIGNS",
    "TABLE4_PARTS",
    "VIOLATION_KINDS",
    "LLMResult",
    "Prop2Check",
    "Prop2Result",
    "gap",
    "input_gradient",
    "llm_key",
    "local_linearity",
    "prop2_key",
    "proposition2",
    "proposition2_violations",
    "residual",
    "sample_indices",
    "table4",
]


# --------------------------------------------------------------------------- validation


def _check_eps(eps: float, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise ValueError(f"{name} must be a positive finite float, got {eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{name} must be a positive finite float, got {eps!r}")
    return float(eps)


def _check_int(value: int, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_batch(x: Tensor, y: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be a batch [B, C, H, W], got shape {tuple(x.shape)}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape [B]={tuple(x.shape[:1])}, got {tuple(y.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("x must be images in [0, 1]; normalisation lives inside the model")


def _check_perturbations(es: Sequence[Tensor], x: Tensor, eps: float, norm: str) -> None:
    for e in es:
        if e.shape != x.shape:
            raise ValueError(f"perturbation shape {tuple(e.shape)} != x shape {tuple(x.shape)}")
        tol = 1e-6 * eps + 1e-12
        if (perturbation_norm(e, norm) > eps + tol).any():
            raise ValueError(f"perturbation outside the {norm} ball of radius {eps}")
        if ((x + e) < -tol).any() or ((x + e) > 1 + tol).any():
            raise ValueError("perturbation leaves the image box: x + e must lie in [0, 1]")


@dataclass(frozen=True)
class _Ascent:
    """Validated settings of the maximisation of r (see `local_linearity`)."""

    eps: float
    steps: int
    restarts: int
    step_size: float
    norm: str
    ascent: str
    signs: str
    corners: bool
    tol: float
    patience: int

    @property
    def adaptive(self) -> bool:
        return self.ascent == "adaptive"


def _ascent(
    eps: float,
    steps: int = STEPS,
    restarts: int = RESTARTS,
    step_size: float | None = None,
    norm: str = "linf",
    ascent: str = "adaptive",
    signs: str = "abs",
    corners: bool = True,
    tol: float = TOL,
    patience: int = PATIENCE,
) -> _Ascent:
    eps = _check_eps(eps)
    _check_int(steps, "steps", 0)
    _check_int(restarts, "restarts", 0)
    if step_size is not None:
        _check_eps(step_size, "step_size")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if ascent not in ASCENTS:
        raise ValueError(f"ascent must be one of {ASCENTS}, got {ascent!r}")
    if signs not in SIGNS:
        raise ValueError(f"signs must be one of {SIGNS}, got {signs!r}")
    if not isinstance(corners, bool):
        raise ValueError(f"corners must be a bool, got {corners!r}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not (0 <= tol < math.inf):
        raise ValueError(f"tol must be a finite float >= 0, got {tol!r}")
    _check_int(patience, "patience", 0)
    if step_size is None:
        step_size = 2.0 * eps if ascent == "adaptive" else 2.5 * eps / max(steps, 1)
    return _Ascent(
        eps, steps, restarts, float(step_size), norm, ascent, signs, corners, float(tol), patience
    )


# --------------------------------------------------------------------------- small helpers


def _dot(e: Tensor, g: Tensor) -> Tensor:
    return (e * g).flatten(1).sum(dim=1)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@contextlib.contextmanager
def _frozen(*models: nn.Module) -> Iterator[None]:
    """Eval mode, parameters not requiring grad (no parameter gradients), both restored."""
    params = list({id(p): p for m in models for p in m.parameters()}.values())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        with eval_mode(*models), torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _plain(t: Tensor) -> Tensor:
    """A detached tensor autograd may save (an inference-mode tensor is cloned); call inside
    `_frozen`, where inference mode is off."""
    return t.detach().clone() if t.is_inference() else t.detach()


def _ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def _corner(x: Tensor, g: Tensor, eps: float, norm: str, sign: float) -> Tensor:
    """±eps·sign(g) (L∞) or ±eps·g/‖g‖₂ (L2), kept in the image box: PGD's step from e = 0."""
    return project_delta(x, step_delta(torch.zeros_like(x), sign * g, eps, norm), eps, norm)


# --------------------------------------------------------------------------- public helpers


def input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample CE [B] and input gradient ∇x CE [B, C, H, W] of `model` at (x, y).

    The gradient is that of the SUMMED CE, i.e. each sample's own gradient. The model runs in
    eval mode (its mode is restored) and no parameter gradient is computed or stored. Both
    outputs are detached.
    """
    _check_batch(x, y)
    with _frozen(model):
        x = x.detach().clone().requires_grad_(True)
        ce = _ce(model, x, _plain(y))
        (g,) = torch.autograd.grad(ce.sum(), x)
    return ce.detach(), g.detach()


def residual(model: nn.Module, x: Tensor, y: Tensor, e: Tensor, ce0: Tensor, g0: Tensor) -> Tensor:
    """Signed first-order Taylor residual r(e) [B] (the quantity inside paper eq. 10).

    r(e) = CE(f(x+e), y) − ce0 − eᵀ g0, with ce0 [B] and g0 [B, C, H, W] from
    `input_gradient(model, x, y)`. Differentiable in `e` when `e` requires grad (the ascent
    uses that); the caller chooses the model's mode (the public functions use eval mode).
    """
    return _ce(model, x + e, y) - ce0 - _dot(e, g0)


def gap(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, e: Tensor) -> Tensor:
    """Left side of Proposition 2 (eq. 11): |CE(fs(x+e), y) − CE(ft(x+e), y)| [B].

    Both models in eval mode (modes restored); no gradients.
    """
    _check_batch(x, y)
    if e.shape != x.shape:
        raise ValueError(f"e shape {tuple(e.shape)} != x shape {tuple(x.shape)}")
    with eval_mode(student, teacher), torch.no_grad():
        return (_ce(student, x + e, y) - _ce(teacher, x + e, y)).abs()


# --------------------------------------------------------------------------- the ascent


@dataclass
class _Track:
    """Running per-sample maximum of |r(e)| of one model over every e evaluated, and what the
    model's own ascent spent: steps [B], converged [B], γ at half its step budget [B]."""

    model: nn.Module
    ce0: Tensor
    g0: Tensor
    gamma: Tensor = field(init=False)
    signed: Tensor = field(init=False)
    e_star: Tensor = field(init=False)
    gamma_half: Tensor = field(init=False)
    steps_used: Tensor = field(init=False)
    converged: Tensor = field(init=False)

    def __post_init__(self) -> None:
        # e = 0 is a valid point with r(0) = 0 exactly: γ starts there, so γ >= 0.
        self.gamma = torch.zeros_like(self.ce0)
        self.signed = torch.zeros_like(self.ce0)
        self.e_star = torch.zeros_like(self.g0)
        self.gamma_half = torch.zeros_like(self.ce0)
        self.steps_used = torch.zeros(self.ce0.shape, dtype=torch.long, device=self.ce0.device)
        self.converged = torch.zeros(self.ce0.shape, dtype=torch.bool, device=self.ce0.device)

    def update(self, rows: Tensor, e: Tensor, ce: Tensor) -> None:
        """Fold the points e [R, ...] of samples `rows` [R], with their CE [R], into the max."""
        r = ce - self.ce0[rows] - _dot(e, self.g0[rows])
        better = r.abs() > self.gamma[rows]
        idx = rows[better]
        self.gamma[idx] = r.abs()[better]
        self.signed[idx] = r[better]
        self.e_star[idx] = e[better]


# (rows [R], e [R, ...], CE [R] of the first model there) of each evaluation
PointsHook = Callable[[Tensor, Tensor, Tensor], None]


class _Evaluator:
    """Evaluates every model on every perturbation tried, so that each γ is the max over the
    union of all points evaluated; also keeps the largest |CE gap| of the first and last
    models. `on_evaluate` gets a [B, ...] tensor per evaluation: the new points of the samples
    evaluated, and for the others the last point evaluated for them (e = 0 at first)."""

    def __init__(
        self,
        tracks: list[_Track],
        x: Tensor,
        y: Tensor,
        on_evaluate: Callable[[Tensor], None] | None,
        on_points: PointsHook | None = None,
    ) -> None:
        self.tracks, self.x, self.y = tracks, x, y
        self.on_evaluate, self.on_points = on_evaluate, on_points
        self.count = 0
        self.all = torch.arange(len(x), device=x.device)
        self.seen = torch.zeros_like(x)
        self.gap_max = (tracks[0].ce0 - tracks[-1].ce0).abs()  # at e = 0

    def evaluate(
        self, e: Tensor, rows: Tensor | None = None, known: dict[int, Tensor] | None = None
    ) -> None:
        """Evaluate every model at x[rows] + e, e [R, ...] (rows: all samples by default);
        `known` maps a model's index to its CE [R] there, already computed."""
        rows = self.all if rows is None else rows
        whole = len(rows) == len(self.x)
        x, y = (self.x, self.y) if whole else (self.x[rows], self.y[rows])
        e, known = e.detach(), known or {}
        ces = []
        with torch.no_grad():
            for i, track in enumerate(self.tracks):
                ce = known[i] if i in known else _ce(track.model, x + e, y)
                track.update(rows, e, ce)
                ces.append(ce)
            self.gap_max[rows] = torch.maximum(self.gap_max[rows], (ces[0] - ces[-1]).abs())
        self.seen[rows] = e
        self.count += 1
        if self.on_points is not None:
            self.on_points(rows, e, ces[0])
        if self.on_evaluate is not None:
            self.on_evaluate(self.seen.clone())

    def ascend(
        self,
        i: int,
        s: _Ascent,
        generator: torch.Generator | None,
        warm_starts: Sequence[Tensor] = (),
    ) -> None:
        """Maximise model i's residual from every start (see `local_linearity`), recording
        its steps, convergence and γ at half the step budget on its track."""
        track = self.tracks[i]
        runs = self._runs(track, s, generator, warm_starts)
        half = (len(runs) * s.steps + 1) // 2
        track.converged = torch.ones_like(track.converged)
        track.gamma_half = track.gamma.clone()
        for k, (start, sign) in enumerate(runs):

            def at_step(t: int, k: int = k) -> None:
                if k * s.steps + t + 1 == half:
                    track.gamma_half = track.gamma.clone()

            self._run(i, start, sign, s, at_step)
        if half == 0:
            track.gamma_half = track.gamma.clone()

    def _runs(
        self,
        track: _Track,
        s: _Ascent,
        generator: torch.Generator | None,
        warm_starts: Sequence[Tensor],
    ) -> list[tuple[Tensor, float | None]]:
        """(start, sign) of each run: the warm starts, then the corners ±eps·sign(g) (if
        `corners`), then random starts, `restarts` of the ball's own in all; sign +1 climbs r,
        -1 climbs −r, None climbs |r|."""
        x = self.x
        own = []
        if s.corners:
            own = [_corner(x, track.g0, s.eps, s.norm, sign) for sign in (1.0, -1.0)]
        own = own[: s.restarts]
        own += [init_delta(x, s.eps, s.norm, True, generator) for _ in range(s.restarts - len(own))]
        starts = [*warm_starts, *own]
        if not starts:
            raise ValueError("restarts=0 needs warm_starts: no run would start")
        if s.signs == "both":
            return [(e, sign) for e in starts for sign in (1.0, -1.0)]
        return [(e, None if s.signs == "abs" else 1.0) for e in starts]

    def _run(
        self,
        i: int,
        e: Tensor,
        sign: float | None,
        s: _Ascent,
        at_step: Callable[[int], None],
    ) -> None:
        """One run of at most `s.steps` ascent steps on sign·r_i (|r_i| for None) from
        e [B, ...] (see `_Run`); the last point of each sample still running is evaluated at
        the end (no gradient)."""
        track = self.tracks[i]
        run = _Run.start(e, s.step_size, track.ce0.dtype)
        for t in range(s.steps):
            rows = run.active.nonzero().squeeze(1)
            if rows.numel():
                er, obj, grad = self._climb(i, rows, run.e[rows], sign)
                track.steps_used[rows] += 1
                run.step(self.x[rows], rows, er, obj, grad, s)
            at_step(t)
        rows = run.active.nonzero().squeeze(1)
        if rows.numel():
            self.evaluate(run.e[rows], rows)
        track.converged &= run.plateau

    def _climb(
        self, i: int, rows: Tensor, e: Tensor, sign: float | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Evaluate the points e [R, ...] of samples `rows`; return them with the objective
        sign·r_i (|r_i| for None) [R] there and its gradient [R, ...]."""
        track = self.tracks[i]
        e = e.detach().requires_grad_(True)
        ce = _ce(track.model, self.x[rows] + e, self.y[rows])
        r = ce - track.ce0[rows] - _dot(e, track.g0[rows])
        obj = r.abs() if sign is None else sign * r
        (grad,) = torch.autograd.grad(obj.sum(), e)
        self.evaluate(e.detach(), rows, {i: ce.detach()})
        return e.detach(), obj.detach(), grad


@dataclass
class _Run:
    """Per-sample state of one ascent run, all [B] or [B, ...]: the next points `e`, the run's
    best objective, its point and gradient, the step `eta`, the best after each step, which
    samples reached a plateau and which still run.

    Adaptive: each step is taken from the run's best point along its gradient (PGD's step
    direction), of size eta; a step that gains nothing halves the sample's eta. Fixed: PGD's
    plain step from the last point. A sample stops when its best gained at most tol·|best|
    over its last `patience` steps, or (adaptive) when no step size moves it any more."""

    e: Tensor
    best: Tensor
    e_best: Tensor
    g_best: Tensor
    eta: Tensor
    plateau: Tensor
    active: Tensor
    history: list[Tensor]

    @classmethod
    def start(cls, e: Tensor, step_size: float, dtype: torch.dtype) -> _Run:
        n, device = len(e), e.device
        return cls(
            e=e.detach().clone(),
            best=torch.full((n,), -math.inf, dtype=dtype, device=device),
            e_best=e.detach().clone(),
            g_best=torch.zeros_like(e),
            eta=torch.full((n,), step_size, dtype=e.dtype, device=device),
            plateau=torch.zeros(n, dtype=torch.bool, device=device),
            active=torch.ones(n, dtype=torch.bool, device=device),
            history=[],
        )

    def step(
        self, x: Tensor, rows: Tensor, e: Tensor, obj: Tensor, grad: Tensor, s: _Ascent
    ) -> None:
        """Fold in the objective obj [R] and gradient [R, ...] at the points e [R, ...] of
        samples `rows` (x: their images), set their next points, stop the converged."""
        gained = obj > self.best[rows]
        up = rows[gained]
        self.best[up], self.e_best[up], self.g_best[up] = obj[gained], e[gained], grad[gained]
        if s.adaptive:
            self.eta[rows] = torch.where(gained, self.eta[rows], self.eta[rows] / 2)
            unit = step_delta(torch.zeros_like(e), self.g_best[rows], 1.0, s.norm)
            step = self.e_best[rows] + _bcast(self.eta[rows], e) * unit
            new = project_delta(x, step, s.eps, s.norm)
            moved = perturbation_norm(new - self.e_best[rows], "linf") > 1e-6 * s.eps
            if s.patience:  # a fixed point: no step size moves it
                self.plateau[rows[~moved]] = True
        else:
            new = project_delta(x, step_delta(e, grad, s.step_size, s.norm), s.eps, s.norm)
        self.e[rows] = new
        self.history.append(self.best.clone())
        if s.patience:
            if len(self.history) > s.patience:
                gain = self.best - self.history[-1 - s.patience]
                self.plateau |= gain <= s.tol * self.best.abs()
            self.active &= ~self.plateau


def _own_ascent(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    s: _Ascent,
    generator: torch.Generator | None,
    ce0: Tensor,
    g0: Tensor,
    *,
    warm_starts: Sequence[Tensor] = (),
    extra: Sequence[Tensor] = (),
    on_evaluate: Callable[[Tensor], None] | None = None,
    on_points: PointsHook | None = None,
) -> tuple[_Track, int]:
    """One model's ascent from its CE ce0 [B] and input gradient g0 [B, ...] at x (inside
    `_frozen`): its track (γ over the `extra` points and its own) and the number of
    evaluations."""
    ev = _Evaluator([_Track(model, ce0, g0)], x, y, on_evaluate, on_points)
    for e in extra:
        ev.evaluate(e)
    ev.ascend(0, s, generator, warm_starts)
    return ev.tracks[0], ev.count


# --------------------------------------------------------------------------- LLM


@dataclass
class LLMResult:
    """Local linearity (Definition 2) of one model on a batch.

    gamma [B]: max |r(e)| found; e_star [B, C, H, W]: the perturbation attaining it (zero
    where no point beat e = 0); residual [B]: the signed r(e_star); ce [B] and grad
    [B, C, H, W]: CE and its input gradient at x; eps, norm; evaluations: number of
    evaluation calls (each evaluates some or all samples once, besides e = 0);
    steps_used [B] (int64): gradient steps the ascent took per sample; converged [B] (bool):
    every run of the sample stopped on a plateau (see `local_linearity`); gamma_half [B]: γ
    when half of the step budget (runs × steps) was spent, the extra perturbations included.
    """

    gamma: Tensor
    e_star: Tensor
    residual: Tensor
    ce: Tensor
    grad: Tensor
    eps: float
    norm: str
    evaluations: int
    steps_used: Tensor
    converged: Tensor
    gamma_half: Tensor


def local_linearity(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = STEPS,
    restarts: int = RESTARTS,
    step_size: float | None = None,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    ascent: str = "adaptive",
    signs: str = "abs",
    corners: bool = True,
    tol: float = TOL,
    patience: int = PATIENCE,
    warm_starts: Sequence[Tensor] = (),
    extra_perturbations: Sequence[Tensor] = (),
    on_evaluate: Callable[[Tensor], None] | None = None,
) -> LLMResult:
    """LLM(f, x, eps) of paper eq. 10 per sample, WITH the absolute value.

    γ(x) = max over ‖e‖ ≤ eps and x + e ∈ [0, 1] of |CE(f(x+e), y) − CE(f(x), y) − eᵀ∇x CE|.
    Restricting to the valid image box only shrinks Definition 2's set. The result is, per
    sample, the max |r| over EVERY point evaluated: `extra_perturbations` (each
    [B, C, H, W], inside the ball and the box, else ValueError), every iterate of every run
    and e = 0 (r = 0), so γ >= 0 and γ is a lower bound of the true maximum.

    Runs: one from each of `warm_starts` (perturbations [B, C, H, W] in the ball and the box,
    e.g. adversarial examples minus x), then `restarts` from the ball's own starts (0: the
    warm starts only, of which there must be one): with
    `corners` first +eps·sign(g) and −eps·sign(g) (g = ∇x CE at x; for L2 ±eps·g/‖g‖₂), then
    uniform random ones (`generator`). Each run takes at most `steps` gradient steps and
    evaluates at most steps + 1 points. `signs`: "abs" climbs |r| (Definition 2's own
    objective), "positive" climbs r (the loss above its tangent plane, where the maximum of
    |r| lies for nearly every sample), "both" climbs r and then −r from every start (twice
    the runs). From the corners the first two agree on nearly every sample; from random
    starts, where r is near 0, "positive" reached larger values.

    `ascent`: "adaptive" steps from the run's best point along its gradient (sign steps for
    L∞, normalised for L2) with a per-sample step that starts at `step_size` (default
    2·eps: a jump to a corner of the ball) and halves whenever a step gains nothing;
    "fixed" takes PGD's plain step from the last point (default 2.5·eps/steps). A sample's
    run stops when its best value gained at most `tol`·|best| over its last `patience`
    steps (or, adaptive, when no step size moves it any more): it converged. `patience=0`
    never stops a run (and none counts as converged). The earlier study settings are
    steps=10, restarts=1, ascent="fixed", signs="abs", corners=False, patience=0.

    `on_evaluate(e)` is called once per evaluation with a [B, C, H, W] tensor: the new point
    of each sample evaluated, the last point evaluated for the others. The model runs in
    eval mode (restored after); no parameter gradients. x [B, C, H, W] in [0, 1], y [B];
    eps > 0; norm in NORMS ("linf", "l2").
    """
    _check_batch(x, y)
    s = _ascent(eps, steps, restarts, step_size, norm, ascent, signs, corners, tol, patience)
    _check_perturbations([*warm_starts, *extra_perturbations], x, s.eps, norm)
    with _frozen(model):
        x, y = _plain(x), _plain(y)
        ce0, g0 = input_gradient(model, x, y)
        t, count = _own_ascent(
            model, x, y, s, generator, ce0, g0,
            warm_starts=[_plain(e) for e in warm_starts],
            extra=[_plain(e) for e in extra_perturbations],
            on_evaluate=on_evaluate,
        )  # fmt: skip
    return LLMResult(
        gamma=t.gamma,
        e_star=t.e_star,
        residual=t.signed,
        ce=ce0,
        grad=g0,
        eps=s.eps,
        norm=norm,
        evaluations=count,
        steps_used=t.steps_used,
        converged=t.converged,
        gamma_half=t.gamma_half,
    )


# --------------------------------------------------------------------------- Proposition 2


@dataclass
class Prop2Result:
    """Terms of Proposition 2 (eq. 11) per sample, all [B].

    gamma_s, gamma_t: LLM of student and teacher (max over every perturbation evaluated);
    ce_s, ce_t: clean CE; grad_gap_l2: ‖gs − gt‖₂ (Table 4's column); grad_gap_dual:
    ‖gs − gt‖_* in the dual norm of the ball (‖·‖₁ for L∞); phi = ce_s + ce_t +
    eps·grad_gap_dual; bound = gamma_s + gamma_t + phi; gap_max: the largest observed left
    side |CE_s(x+e) − CE_t(x+e)| over the same perturbations (and e = 0), never above bound;
    e_star_s, e_star_t [B, C, H, W]: arg-max perturbations; eps, norm; evaluations: number of
    evaluation calls (each evaluates some or all samples once, besides e = 0).
    """

    gamma_s: Tensor
    gamma_t: Tensor
    ce_s: Tensor
    ce_t: Tensor
    grad_gap_l2: Tensor
    grad_gap_dual: Tensor
    phi: Tensor
    bound: Tensor
    gap_max: Tensor
    e_star_s: Tensor
    e_star_t: Tensor
    eps: float
    norm: str
    evaluations: int


def _phi(ce_s: Tensor, ce_t: Tensor, g_s: Tensor, g_t: Tensor, eps: float, norm: str) -> Tensor:
    return ce_s + ce_t + eps * perturbation_norm(g_s - g_t, _DUAL[norm])


def proposition2(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = STEPS,
    restarts: int = RESTARTS,
    step_size: float | None = None,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    ascent: str = "adaptive",
    signs: str = "abs",
    corners: bool = True,
    tol: float = TOL,
    patience: int = PATIENCE,
    warm_starts: Sequence[Tensor] = (),
    extra_perturbations: Sequence[Tensor] = (),
    on_evaluate: Callable[[Tensor], None] | None = None,
) -> Prop2Result:
    """Right side of Proposition 2 (paper eq. 11) per sample: γs + γt + φ.

    φ = CE(fs(x)) + CE(ft(x)) + eps·‖gs − gt‖_*, where ‖·‖_* is the dual norm of the ball's
    norm (‖·‖₁ for L∞, ‖·‖₂ for L2): the proof needs eᵀ(gs − gt) ≤ eps·‖gs − gt‖_* (Hölder),
    which the paper's "a norm" does not give for, e.g., ‖·‖₂ under an L∞ ball. γs and γt are
    each the max |r| over the UNION of `extra_perturbations` (each [B, C, H, W] in the ball
    and the box), the student's ascent, the teacher's ascent (each with the settings and
    warm starts of `local_linearity`) and e = 0: both models are evaluated on every point,
    so on every perturbation evaluated the inequality is a theorem. `on_evaluate(e)` is
    called once per evaluation (as in `local_linearity`). Models in eval mode (restored
    after); no parameter gradients.
    """
    _check_batch(x, y)
    s = _ascent(eps, steps, restarts, step_size, norm, ascent, signs, corners, tol, patience)
    _check_perturbations([*warm_starts, *extra_perturbations], x, s.eps, norm)
    with _frozen(student, teacher):
        x, y = _plain(x), _plain(y)
        ce_s, g_s = input_gradient(student, x, y)
        ce_t, g_t = input_gradient(teacher, x, y)
        ev = _Evaluator([_Track(student, ce_s, g_s), _Track(teacher, ce_t, g_t)], x, y, on_evaluate)
        for e in extra_perturbations:
            ev.evaluate(_plain(e))
        for i in (0, 1):
            ev.ascend(i, s, generator, [_plain(e) for e in warm_starts])
    st, te = ev.tracks
    phi = _phi(ce_s, ce_t, g_s, g_t, s.eps, norm)
    return Prop2Result(
        gamma_s=st.gamma,
        gamma_t=te.gamma,
        ce_s=ce_s,
        ce_t=ce_t,
        grad_gap_l2=perturbation_norm(g_s - g_t, "l2"),
        grad_gap_dual=perturbation_norm(g_s - g_t, _DUAL[norm]),
        phi=phi,
        bound=st.gamma + te.gamma + phi,
        gap_max=ev.gap_max,
        e_star_s=st.e_star,
        e_star_t=te.e_star,
        eps=s.eps,
        norm=norm,
        evaluations=ev.count,
    )


# --------------------------------------------------------------------------- where it could fail


@dataclass
class Prop2Check:
    """Proposition 2 tested at points no γ was taken over (`proposition2_violations`).

    gamma_s, gamma_t [B]: each model's LLM from ITS OWN ascent only (as Table 4 reports it);
    phi, bound [B]: as in `Prop2Result`. Per kind of point (VIOLATION_KINDS, and "all" for
    their union): violated[kind] [B] bool: the sample has a point of that kind where
    |CE_s(x+e) − CE_t(x+e)| > bound + rtol·(1 + bound); rate[kind]: the fraction of samples
    violated (nan where no point of that kind was tested); points[kind]: the number of
    (sample, point) pairs tested; gap_max[kind] [B]: the largest |CE_s − CE_t| seen at
    points of that kind (0 where none). eps, norm.
    """

    gamma_s: Tensor
    gamma_t: Tensor
    phi: Tensor
    bound: Tensor
    violated: dict[str, Tensor]
    rate: dict[str, float]
    points: dict[str, int]
    gap_max: dict[str, Tensor]
    eps: float
    norm: str


def proposition2_violations(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = STEPS,
    restarts: int = RESTARTS,
    step_size: float | None = None,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    ascent: str = "adaptive",
    signs: str = "abs",
    corners: bool = True,
    tol: float = TOL,
    patience: int = PATIENCE,
    x_adv_student: Tensor | None = None,
    x_adv_teacher: Tensor | None = None,
    pgd_steps: int = 20,
    random_points: int = 8,
    rtol: float = 1e-5,
) -> Prop2Check:
    """Does Proposition 2's bound γs + γt + φ hold where nobody maximised over?

    γs and γt come from each model's own ascent (`local_linearity` with these settings), as
    Table 4 reports them. A γ below the true maximum can make the bound fail; this tests it
    at four kinds of points e, per sample: "ascent", every point either ascent evaluated
    (the student's against γt, the teacher's against γs); "pgd_student" and "pgd_teacher",
    each model's PGD adversarial example at radius eps (`x_adv_student` / `x_adv_teacher`
    [B, C, H, W], images in the ball around x, else `kdiga.attacks.pgd` with `pgd_steps`
    steps, its default step and one random start; pgd_steps=0 and no x_adv: not tested);
    "random", `random_points` uniform points of the ball (`generator`). With a γ that is a
    true maximum no point violates the bound.

    x [B, C, H, W] in [0, 1], y [B]; models in eval mode (restored after), no parameter
    gradients. Returns a `Prop2Check`.
    """
    _check_batch(x, y)
    s = _ascent(eps, steps, restarts, step_size, norm, ascent, signs, corners, tol, patience)
    _check_int(pgd_steps, "pgd_steps", 0)
    _check_int(random_points, "random_points", 0)
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not (0 <= rtol < math.inf):
        raise ValueError(f"rtol must be a finite float >= 0, got {rtol!r}")
    given = {"pgd_student": x_adv_student, "pgd_teacher": x_adv_teacher}
    _check_perturbations([a - x for a in given.values() if a is not None], x, s.eps, norm)
    with _frozen(student, teacher):
        x, y = _plain(x), _plain(y)
        given = {k: None if a is None else _plain(a) for k, a in given.items()}
        ce_s, g_s = input_gradient(student, x, y)
        ce_t, g_t = input_gradient(teacher, x, y)
        seen = _GapMax(x, y, len(x))
        st, _ = _own_ascent(student, x, y, s, generator, ce_s, g_s, on_points=seen.hook(teacher))
        te, _ = _own_ascent(teacher, x, y, s, generator, ce_t, g_t, on_points=seen.hook(student))
        phi = _phi(ce_s, ce_t, g_s, g_t, s.eps, norm)
        return _check_points(
            (student, teacher), x, y, s, generator, st.gamma, te.gamma, phi, seen, given,
            pgd_steps, random_points, rtol,
        )  # fmt: skip


class _GapMax:
    """The largest |CE_s − CE_t| per sample over the points of the ascents, on the first
    `limit` samples of x [B, ...]: `hook(other)` is an `_Evaluator` points hook that evaluates
    the other model where one model's ascent evaluated itself (so no point is stored)."""

    def __init__(self, x: Tensor, y: Tensor, limit: int) -> None:
        self.x, self.y, self.limit = x, y, limit
        self.gap = torch.zeros(limit, dtype=x.dtype, device=x.device)
        self.points = 0

    def hook(self, other: nn.Module) -> PointsHook:
        def on_points(rows: Tensor, e: Tensor, ce: Tensor) -> None:
            keep = rows < self.limit
            rows, e, ce = rows[keep], e[keep], ce[keep]
            if not len(rows):
                return
            with torch.no_grad():
                gap = (ce - _ce(other, self.x[rows] + e, self.y[rows])).abs().to(self.gap.dtype)
            self.gap[rows] = torch.maximum(self.gap[rows], gap)
            self.points += len(rows)

        return on_points


def _check_points(
    models: tuple[nn.Module, nn.Module],
    x: Tensor,
    y: Tensor,
    s: _Ascent,
    generator: torch.Generator | None,
    gamma_s: Tensor,
    gamma_t: Tensor,
    phi: Tensor,
    ascent: _GapMax,
    given: dict[str, Tensor | None],
    pgd_steps: int,
    random_points: int,
    rtol: float,
) -> Prop2Check:
    """The bound γs + γt + φ [B] of the samples x, y tested at the ascents' points (their
    largest gap, `ascent`), at each model's given or computed PGD point and at random points
    of the ball (in that order from `generator`). Inside `_frozen`."""
    student, teacher = models
    zero = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    gap_max, counts = {"ascent": ascent.gap}, {"ascent": ascent.points}

    def gap(e: Tensor) -> Tensor:
        with torch.no_grad():
            return (_ce(student, x + e, y) - _ce(teacher, x + e, y)).abs().to(x.dtype)

    for kind, model in zip(("pgd_student", "pgd_teacher"), models, strict=True):
        x_adv = given[kind]
        if x_adv is None and pgd_steps:
            x_adv = pgd(model, x, y, eps=s.eps, steps=pgd_steps, norm=s.norm, generator=generator)
        gap_max[kind] = zero if x_adv is None else gap(x_adv - x)
        counts[kind] = 0 if x_adv is None else len(x)
    gap_max["random"], counts["random"] = zero, random_points * len(x)
    for _ in range(random_points):
        e = init_delta(x, s.eps, s.norm, True, generator)
        gap_max["random"] = torch.maximum(gap_max["random"], gap(e))
    bound = gamma_s + gamma_t + phi
    counts["all"] = sum(counts.values())
    violated = {k: gap_max[k] > bound + rtol * (1 + bound) for k in VIOLATION_KINDS}
    violated["all"] = torch.stack(list(violated.values())).any(dim=0)
    rate = {k: v.double().mean().item() if counts[k] else math.nan for k, v in violated.items()}
    gap_max["all"] = torch.stack([gap_max[k] for k in VIOLATION_KINDS]).amax(dim=0)
    return Prop2Check(
        gamma_s=gamma_s,
        gamma_t=gamma_t,
        phi=phi,
        bound=bound,
        violated=violated,
        rate=rate,
        points=counts,
        gap_max=gap_max,
        eps=s.eps,
        norm=s.norm,
    )


# --------------------------------------------------------------------------- Table 4

TABLE4_PARTS = (
    "samples", "half", "half_ratio", "converged", "steps", "samples_converged", "samples_steps",
)  # fmt: skip


def llm_key(radius: float, part: str | None = None) -> str:
    """Key of the LLM column at `radius` in `table4`'s dict: f"llm@{radius:g}"; with `part`
    (one of TABLE4_PARTS) the key of that detail: f"llm@{radius:g}/{part}"."""
    if part is None:
        return f"llm@{radius:g}"
    if part not in TABLE4_PARTS:
        raise ValueError(f"part must be one of {TABLE4_PARTS} or None, got {part!r}")
    return f"llm@{radius:g}/{part}"


def sample_indices(n_total: int, n: int, seed: int) -> Tensor:
    """`n` distinct random indices into range(n_total), sorted, int64 [n], fixed by `seed`
    (Table 4 uses 1000 random test samples)."""
    if not (isinstance(n_total, int) and isinstance(n, int) and 1 <= n <= n_total):
        raise ValueError(f"need ints 1 <= n <= n_total, got n={n!r}, n_total={n_total!r}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=gen)[:n].sort().values


def prop2_key(radius: float) -> str:
    """Key of the Proposition 2 check at `radius` in `table4`'s dict: f"prop2@{radius:g}"."""
    return f"prop2@{radius:g}"


def table4(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    radii: Sequence[float] = (4 / 255, 8 / 255),
    steps: int = STEPS,
    restarts: int = RESTARTS,
    batch_size: int = 250,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    ascent: str = "adaptive",
    signs: str = "abs",
    corners: bool = True,
    tol: float = TOL,
    patience: int = PATIENCE,
    check_samples: int = 0,
    pgd_steps: int = 20,
    random_points: int = 8,
    rtol: float = 1e-5,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Table 4's columns for `student` on the samples x [N, C, H, W], y [N], per sample and
    averaged, with what shows whether the LLM's ascent converged, and Proposition 2 tested
    on the first `check_samples` samples.

    Keys (L∞ ball, eq. 10; the ascent settings are those of `local_linearity`):
      - `llm_key(r)`: mean LLM γ of the student at radius r;
      - `llm_key(r, "samples")`: the N per-sample γ (for confidence intervals, or to pair
        models image by image);
      - `llm_key(r, "half")`: mean γ at half the step budget; `llm_key(r, "half_ratio")`:
        that over the mean γ (1 where both are 0): near 1, the second half gained little;
      - `llm_key(r, "converged")`: the fraction of samples whose every run converged;
      - `llm_key(r, "steps")`: the mean number of gradient steps per sample;
      - `llm_key(r, "samples_converged")` and `llm_key(r, "samples_steps")`: per sample,
        whether every run converged (bools) and the gradient steps it took (ints);
      - "ce" and "ce/samples": the student's clean CE, mean and per sample;
      - "grad_gap_l2" and "grad_gap_l2/samples": ‖gs − gt‖₂ with `teacher`, mean and per
        sample;
      - with `check_samples` > 0, "prop2/n" (the samples tested) and `prop2_key(r)`: for each
        kind of point of `proposition2_violations` (VIOLATION_KINDS and "all"),
        {"rate": the fraction of tested samples where the bound fails at a point of that
        kind (None where none was tested), "points": the (sample, point) pairs tested}.
    The check is `proposition2_violations`'s with the student's γ taken from this very
    ascent (the γ reported): the teacher's own ascent runs on the tested samples only, the
    teacher is evaluated at the student's ascent points and the student at the teacher's,
    then each model's PGD point (`pgd_steps`) and `random_points` random points.

    Means are floats, per-sample values lists of N floats in the order of x. The caller
    picks the samples (`sample_indices`). Batches of `batch_size` are moved to `device`
    (default: the student's parameters' device); the models must already be there.
    `progress` is called with a `kdiga.progress.Progress` of the task "bounds", counting
    ascents (batches x radii, each with its Proposition 2 check), at the start and after each.
    """
    for r in radii:
        _check_eps(r, "radius")
    settings = dict(ascent=ascent, signs=signs, corners=corners, tol=tol, patience=patience)
    _ascent(1.0, steps, restarts, None, "linf", **settings)
    keys = [llm_key(r) for r in radii]
    if len(set(keys)) != len(keys) or not keys:
        raise ValueError(f"radii must be non-empty and distinct at 6 significant digits: {radii}")
    _check_int(batch_size, "batch_size", 1)
    _check_int(check_samples, "check_samples", 0)
    _check_int(pgd_steps, "pgd_steps", 0)
    _check_int(random_points, "random_points", 0)
    _check_batch(x, y)
    if len(x) == 0:
        raise ValueError("table4 needs at least one sample")
    if device is None:
        device = next((p.device for p in student.parameters()), x.device)
    n_check = min(check_samples, len(x))
    parts: dict[str, list[Tensor]] = {}
    kinds = (*VIOLATION_KINDS, "all")
    failed = {r: dict.fromkeys(kinds, 0) for r in radii}
    tested = {r: dict.fromkeys(kinds, 0) for r in radii}

    def add(key: str, value: Tensor) -> None:
        parts.setdefault(key, []).append(value.detach().double().cpu())

    n_batches = math.ceil(len(x) / batch_size)
    track = Tracker(progress, "bounds", n_batches * len(radii), "ascents")
    track.at(0, f"batch 0/{n_batches}")
    with _frozen(student, teacher):
        for start in range(0, len(x), batch_size):
            xb = _plain(x[start : start + batch_size].to(device))
            yb = _plain(y[start : start + batch_size].to(device))
            ce_s, g_s = input_gradient(student, xb, yb)
            ce_t, g_t = input_gradient(teacher, xb, yb)
            add("ce", ce_s)
            add("grad_gap_l2", perturbation_norm(g_s - g_t, "l2"))
            k = min(max(n_check - start, 0), len(xb))  # the tested samples of this batch
            for r in radii:
                s = _ascent(r, steps, restarts, None, "linf", **settings)
                seen = _GapMax(xb, yb, k)
                hook = seen.hook(teacher) if k else None
                st, _ = _own_ascent(student, xb, yb, s, generator, ce_s, g_s, on_points=hook)
                add(llm_key(r), st.gamma)
                add(llm_key(r, "half"), st.gamma_half)
                add(llm_key(r, "converged"), st.converged)
                add(llm_key(r, "steps"), st.steps_used)
                where = f"batch {start // batch_size + 1}/{n_batches}, radius {r:g}"
                if not k:
                    track.advance(1, where)
                    continue
                xk, yk = xb[:k], yb[:k]
                te, _ = _own_ascent(
                    teacher, xk, yk, s, generator, ce_t[:k], g_t[:k], on_points=seen.hook(student)
                )
                phi = _phi(ce_s[:k], ce_t[:k], g_s[:k], g_t[:k], r, "linf")
                given = dict.fromkeys(("pgd_student", "pgd_teacher"))
                check = _check_points(
                    (student, teacher), xk, yk, s, generator, st.gamma[:k], te.gamma, phi, seen,
                    given, pgd_steps, random_points, rtol,
                )  # fmt: skip
                for kind in kinds:
                    failed[r][kind] += int(check.violated[kind].sum())
                    tested[r][kind] += check.points[kind]
                track.advance(1, where)
            logger.debug("table4: %d/%d samples", min(start + batch_size, len(x)), len(x))
    per = {k: torch.cat(v) for k, v in parts.items()}
    out: dict[str, Any] = {}
    for r in radii:
        gamma, half = per[llm_key(r)], per[llm_key(r, "half")]
        mean, half_mean = gamma.mean().item(), half.mean().item()
        out[llm_key(r)] = mean
        out[llm_key(r, "samples")] = gamma.tolist()
        out[llm_key(r, "half")] = half_mean
        out[llm_key(r, "half_ratio")] = half_mean / mean if mean > 0 else 1.0
        out[llm_key(r, "converged")] = per[llm_key(r, "converged")].mean().item()
        out[llm_key(r, "steps")] = per[llm_key(r, "steps")].mean().item()
        out[llm_key(r, "samples_converged")] = per[llm_key(r, "converged")].bool().tolist()
        out[llm_key(r, "samples_steps")] = per[llm_key(r, "steps")].long().tolist()
        if n_check:
            out[prop2_key(r)] = {
                kind: {
                    "rate": failed[r][kind] / n_check if tested[r][kind] else None,
                    "points": tested[r][kind],
                }
                for kind in kinds
            }
    if n_check:
        out["prop2/n"] = n_check
    for key in ("ce", "grad_gap_l2"):
        out[key] = per[key].mean().item()
        out[f"{key}/samples"] = per[key].tolist()
    return out
