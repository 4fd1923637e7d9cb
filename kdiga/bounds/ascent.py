"""The ascent that seeks the LLM's maximum: per model a running maximum of |r(e)| over every
point evaluated (`Track`), the evaluation of every model at every point (`Evaluator`), and the
runs of projected ascent (`Run`): from the corners, random and warm starts, adaptive or fixed
steps, stopped per sample on a plateau (see `kdiga.bounds.local_linearity`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kdiga.attacks import init_delta, perturbation_norm, project_delta, step_delta
from kdiga.bounds.primitives import bcast, corner, dot, sample_ce
from kdiga.bounds.settings import Ascent


@dataclass
class Track:
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
        r = ce - self.ce0[rows] - dot(e, self.g0[rows])
        better = r.abs() > self.gamma[rows]
        idx = rows[better]
        self.gamma[idx] = r.abs()[better]
        self.signed[idx] = r[better]
        self.e_star[idx] = e[better]


# (rows [R], e [R, ...], CE [R] of the first model there) of each evaluation
PointsHook = Callable[[Tensor, Tensor, Tensor], None]


class Evaluator:
    """Evaluates every model on every perturbation tried, so that each γ is the max over the
    union of all points evaluated; also keeps the largest |CE gap| of the first and last
    models. `on_evaluate` gets a [B, ...] tensor per evaluation: the new points of the samples
    evaluated, and for the others the last point evaluated for them (e = 0 at first)."""

    def __init__(
        self,
        tracks: list[Track],
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
                ce = known[i] if i in known else sample_ce(track.model, x + e, y)
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
        s: Ascent,
        generator: torch.Generator | None,
        warm_starts: Sequence[Tensor] = (),
    ) -> None:
        """Maximise model i's residual from every start (see `local_linearity`), recording
        its steps, convergence and γ at half the step budget on its track."""
        track = self.tracks[i]
        runs = self._runs(track, s, generator, warm_starts)
        half = (len(runs) * s.cfg.steps + 1) // 2
        track.converged = torch.ones_like(track.converged)
        track.gamma_half = track.gamma.clone()
        for k, (start, sign) in enumerate(runs):

            def at_step(t: int, k: int = k) -> None:
                if k * s.cfg.steps + t + 1 == half:
                    track.gamma_half = track.gamma.clone()

            self._run(i, start, sign, s, at_step)
        if half == 0:
            track.gamma_half = track.gamma.clone()

    def _runs(
        self,
        track: Track,
        s: Ascent,
        generator: torch.Generator | None,
        warm_starts: Sequence[Tensor],
    ) -> list[tuple[Tensor, float | None]]:
        """(start, sign) of each run: the warm starts, then the corners ±eps·sign(g) (if
        `corners`), then random starts, `restarts` of the ball's own in all; sign +1 climbs r,
        -1 climbs −r, None climbs |r|."""
        x = self.x
        own = []
        if s.cfg.corners:
            own = [corner(x, track.g0, s.eps, s.norm, sign) for sign in (1.0, -1.0)]
        own = own[: s.cfg.restarts]
        randoms = range(s.cfg.restarts - len(own))
        own += [init_delta(x, s.eps, s.norm, True, generator) for _ in randoms]
        starts = [*warm_starts, *own]
        if not starts:
            raise ValueError("restarts=0 needs warm_starts: no run would start")
        if s.cfg.signs == "both":
            return [(e, sign) for e in starts for sign in (1.0, -1.0)]
        return [(e, None if s.cfg.signs == "abs" else 1.0) for e in starts]

    def _run(
        self,
        i: int,
        e: Tensor,
        sign: float | None,
        s: Ascent,
        at_step: Callable[[int], None],
    ) -> None:
        """One run of at most `s.cfg.steps` ascent steps on sign·r_i (|r_i| for None) from
        e [B, ...] (see `Run`); the last point of each sample still running is evaluated at
        the end (no gradient)."""
        track = self.tracks[i]
        run = Run.start(e, s.step_size, track.ce0.dtype)
        for t in range(s.cfg.steps):
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
        ce = sample_ce(track.model, self.x[rows] + e, self.y[rows])
        r = ce - track.ce0[rows] - dot(e, track.g0[rows])
        obj = r.abs() if sign is None else sign * r
        (grad,) = torch.autograd.grad(obj.sum(), e)
        self.evaluate(e.detach(), rows, {i: ce.detach()})
        return e.detach(), obj.detach(), grad


@dataclass
class Run:
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
    def start(cls, e: Tensor, step_size: float, dtype: torch.dtype) -> Run:
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
        self, x: Tensor, rows: Tensor, e: Tensor, obj: Tensor, grad: Tensor, s: Ascent
    ) -> None:
        """Fold in the objective obj [R] and gradient [R, ...] at the points e [R, ...] of
        samples `rows` (x: their images), set their next points, stop the converged."""
        gained = obj > self.best[rows]
        up = rows[gained]
        self.best[up], self.e_best[up], self.g_best[up] = obj[gained], e[gained], grad[gained]
        if s.cfg.adaptive:
            self.eta[rows] = torch.where(gained, self.eta[rows], self.eta[rows] / 2)
            unit = step_delta(torch.zeros_like(e), self.g_best[rows], 1.0, s.norm)
            step = self.e_best[rows] + bcast(self.eta[rows], e) * unit
            new = project_delta(x, step, s.eps, s.norm)
            moved = perturbation_norm(new - self.e_best[rows], "linf") > 1e-6 * s.eps
            if s.cfg.patience:  # a fixed point: no step size moves it
                self.plateau[rows[~moved]] = True
        else:
            new = project_delta(x, step_delta(e, grad, s.step_size, s.norm), s.eps, s.norm)
        self.e[rows] = new
        self.history.append(self.best.clone())
        if s.cfg.patience:
            if len(self.history) > s.cfg.patience:
                gain = self.best - self.history[-1 - s.cfg.patience]
                self.plateau |= gain <= s.cfg.tol * self.best.abs()
            self.active &= ~self.plateau


def own_ascent(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    s: Ascent,
    generator: torch.Generator | None,
    ce0: Tensor,
    g0: Tensor,
    *,
    warm_starts: Sequence[Tensor] = (),
    extra: Sequence[Tensor] = (),
    on_evaluate: Callable[[Tensor], None] | None = None,
    on_points: PointsHook | None = None,
) -> tuple[Track, int]:
    """One model's ascent from its CE ce0 [B] and input gradient g0 [B, ...] at x (inside
    `frozen`): its track (γ over the `extra` points and its own) and the number of
    evaluations."""
    ev = Evaluator([Track(model, ce0, g0)], x, y, on_evaluate, on_points)
    for e in extra:
        ev.evaluate(e)
    ev.ascend(0, s, generator, warm_starts)
    return ev.tracks[0], ev.count


class PointRecorder:
    """A points hook that keeps every point evaluated: (rows [P], e [P, ...], CE [P] of the
    model there), concatenated by `points()`."""

    def __init__(self) -> None:
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []

    def __call__(self, rows: Tensor, e: Tensor, ce: Tensor) -> None:
        self.parts.append((rows.clone(), e.detach().clone(), ce.detach().clone()))

    def points(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, e, CE) of every point in the order evaluated; `like` [B, ...] gives the
        shape and dtype when there is none."""
        if not self.parts:
            rows = torch.zeros(0, dtype=torch.long, device=like.device)
            return rows, like[:0].clone(), like.new_zeros(0)
        return tuple(torch.cat(part) for part in zip(*self.parts, strict=True))  # type: ignore[return-value]
