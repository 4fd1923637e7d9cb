"""Proposition 2 (paper eq. 11): its right side (`proposition2`) and where it could fail
(`proposition2_violations`), the check split into what depends on the teacher alone
(`TeacherCheck`: its ascent with every point it evaluated, its PGD point) and what needs the
student too (`check_points`), so that Table 4 pays the teacher's part once per teacher."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdiga.attacks import init_delta, perturbation_norm, pgd
from kdiga.bounds.ascent import Evaluator, PointRecorder, PointsHook, Track, own_ascent
from kdiga.bounds.llm import DEFAULT
from kdiga.bounds.primitives import (
    check_batch,
    check_perturbations,
    frozen,
    input_gradient,
    plain,
    sample_ce,
)
from kdiga.bounds.settings import (
    DUAL,
    PGD_STEPS,
    RANDOM_POINTS,
    VIOLATION_KINDS,
    Ascent,
    AscentSettings,
    check_int,
    check_tol,
)


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


def phi(ce_s: Tensor, ce_t: Tensor, g_s: Tensor, g_t: Tensor, eps: float, norm: str) -> Tensor:
    """φ = CE_s + CE_t + eps·‖gs − gt‖_* [B], in the dual norm of the ball's."""
    return ce_s + ce_t + eps * perturbation_norm(g_s - g_t, DUAL[norm])


def proposition2(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    settings: AscentSettings = DEFAULT,
    generator: torch.Generator | None = None,
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
    check_batch(x, y)
    s = settings.at(eps)
    check_perturbations([*warm_starts, *extra_perturbations], x, s.eps, s.norm)
    with frozen(student, teacher):
        x, y = plain(x), plain(y)
        ce_s, g_s = input_gradient(student, x, y)
        ce_t, g_t = input_gradient(teacher, x, y)
        ev = Evaluator([Track(student, ce_s, g_s), Track(teacher, ce_t, g_t)], x, y, on_evaluate)
        for e in extra_perturbations:
            ev.evaluate(plain(e))
        for i in (0, 1):
            ev.ascend(i, s, generator, [plain(e) for e in warm_starts])
    st, te = ev.tracks
    terms = phi(ce_s, ce_t, g_s, g_t, s.eps, s.norm)
    return Prop2Result(
        gamma_s=st.gamma,
        gamma_t=te.gamma,
        ce_s=ce_s,
        ce_t=ce_t,
        grad_gap_l2=perturbation_norm(g_s - g_t, "l2"),
        grad_gap_dual=perturbation_norm(g_s - g_t, DUAL[s.norm]),
        phi=terms,
        bound=st.gamma + te.gamma + terms,
        gap_max=ev.gap_max,
        e_star_s=st.e_star,
        e_star_t=te.e_star,
        eps=s.eps,
        norm=s.norm,
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


@dataclass
class TeacherCheck:
    """The teacher's share of the Proposition 2 check on K samples at one radius, the same
    for every student: gamma [K], its LLM from its own ascent; rows [P], e [P, C, H, W] and
    ce [P]: every point its ascent evaluated (sample, perturbation, the teacher's CE there);
    x_adv [K, C, H, W] or None: its PGD adversarial example."""

    gamma: Tensor
    rows: Tensor
    e: Tensor
    ce: Tensor
    x_adv: Tensor | None

    def rows_in(self, start: int, stop: int) -> TeacherCheck:
        """The part of samples start..stop-1, with rows counted from start."""
        keep = (self.rows >= start) & (self.rows < stop)
        x_adv = None if self.x_adv is None else self.x_adv[start:stop]
        rows = self.rows[keep] - start
        return TeacherCheck(self.gamma[start:stop], rows, self.e[keep], self.ce[keep], x_adv)


def teacher_check(
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    s: Ascent,
    generator: torch.Generator | None,
    ce_t: Tensor,
    g_t: Tensor,
    pgd_steps: int,
    x_adv: Tensor | None = None,
) -> TeacherCheck:
    """The teacher's own ascent on x [K, ...] from its CE ce_t [K] and gradient g_t (every
    point kept), then its PGD point (`x_adv` if given, else `pgd_steps` steps from one random
    start, or None for 0), in that order from `generator`. Inside `frozen`."""
    seen = PointRecorder()
    te, _ = own_ascent(teacher, x, y, s, generator, ce_t, g_t, on_points=seen)
    if x_adv is None and pgd_steps:
        x_adv = pgd(teacher, x, y, eps=s.eps, steps=pgd_steps, norm=s.norm, generator=generator)
    return TeacherCheck(te.gamma, *seen.points(x), x_adv)


class GapMax:
    """The largest |CE_s − CE_t| per sample over the points of the ascents, on the first
    `limit` samples of x [B, ...]: `hook(other)` is an `Evaluator` points hook that evaluates
    the other model where one model's ascent evaluated itself (so no point is stored);
    `fold(model, share, chunk)` evaluates `model` at a `TeacherCheck`'s points."""

    def __init__(self, x: Tensor, y: Tensor, limit: int) -> None:
        self.x, self.y, self.limit = x, y, limit
        self.gap = torch.zeros(limit, dtype=x.dtype, device=x.device)
        self.points = 0

    def hook(self, other: nn.Module) -> PointsHook:
        def on_points(rows: Tensor, e: Tensor, ce: Tensor) -> None:
            keep = rows < self.limit
            self.add(other, rows[keep], e[keep], ce[keep])

        return on_points

    def add(self, other: nn.Module, rows: Tensor, e: Tensor, ce: Tensor) -> None:
        """Fold in |ce − CE of `other`| at the points e [R, ...] of samples `rows` [R]."""
        if not len(rows):
            return
        with torch.no_grad():
            gap = (ce - sample_ce(other, self.x[rows] + e, self.y[rows])).abs().to(self.gap.dtype)
        self.gap[rows] = torch.maximum(self.gap[rows], gap)
        self.points += len(rows)

    def fold(self, model: nn.Module, share: TeacherCheck, chunk: int) -> None:
        """`model` evaluated at the teacher's ascent points, `chunk` points at a time."""
        device = self.x.device
        for i in range(0, len(share.rows), chunk):
            rows, e, ce = (t[i : i + chunk].to(device) for t in (share.rows, share.e, share.ce))
            self.add(model, rows, e.to(self.x.dtype), ce)


def proposition2_violations(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    settings: AscentSettings = DEFAULT,
    generator: torch.Generator | None = None,
    x_adv_student: Tensor | None = None,
    x_adv_teacher: Tensor | None = None,
    pgd_steps: int = PGD_STEPS,
    random_points: int = RANDOM_POINTS,
    rtol: float = 1e-5,
) -> Prop2Check:
    """Does Proposition 2's bound γs + γt + φ hold where nobody maximised over?

    γs and γt come from each model's own ascent (`local_linearity` with `settings`), as
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
    check_batch(x, y)
    s = settings.at(eps)
    check_int(pgd_steps, "pgd_steps", 0)
    check_int(random_points, "random_points", 0)
    check_tol(rtol, "rtol")
    given = [a - x for a in (x_adv_student, x_adv_teacher) if a is not None]
    check_perturbations(given, x, s.eps, s.norm)
    with frozen(student, teacher):
        x, y = plain(x), plain(y)
        adv_s, adv_t = (None if a is None else plain(a) for a in (x_adv_student, x_adv_teacher))
        ce_s, g_s = input_gradient(student, x, y)
        ce_t, g_t = input_gradient(teacher, x, y)
        seen = GapMax(x, y, len(x))
        st, _ = own_ascent(student, x, y, s, generator, ce_s, g_s, on_points=seen.hook(teacher))
        share = teacher_check(teacher, x, y, s, generator, ce_t, g_t, pgd_steps, adv_t)
        terms = phi(ce_s, ce_t, g_s, g_t, s.eps, s.norm)
        return check_points(
            (student, teacher),
            x,
            y,
            s,
            generator,
            st.gamma,
            share,
            terms,
            seen,
            adv_s,
            pgd_steps,
            random_points,
            rtol,
            len(x),
        )


def check_points(
    models: tuple[nn.Module, nn.Module],
    x: Tensor,
    y: Tensor,
    s: Ascent,
    generator: torch.Generator | None,
    gamma_s: Tensor,
    share: TeacherCheck,
    phi: Tensor,
    ascent: GapMax,
    x_adv_student: Tensor | None,
    pgd_steps: int,
    random_points: int,
    rtol: float,
    chunk: int,
) -> Prop2Check:
    """The bound γs + γt + φ [B] of the samples x, y (γt and the teacher's points from its
    `share`) tested at the ascents' points (their largest gap, `ascent`, which gets the
    student at the teacher's points, `chunk` at a time), at each model's PGD point (the
    student's given or computed here) and at random points of the ball (in that order from
    `generator`). Inside `frozen`."""
    student, teacher = models
    ascent.fold(student, share, chunk)
    zero = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    gap_max, counts = {"ascent": ascent.gap}, {"ascent": ascent.points}

    def gap(e: Tensor) -> Tensor:
        with torch.no_grad():
            return (sample_ce(student, x + e, y) - sample_ce(teacher, x + e, y)).abs().to(x.dtype)

    if x_adv_student is None and pgd_steps:
        x_adv_student = pgd(
            student, x, y, eps=s.eps, steps=pgd_steps, norm=s.norm, generator=generator
        )
    x_adv_teacher = None if share.x_adv is None else share.x_adv.to(x.device, x.dtype)
    for kind, x_adv in (("pgd_student", x_adv_student), ("pgd_teacher", x_adv_teacher)):
        gap_max[kind] = zero if x_adv is None else gap(x_adv - x)
        counts[kind] = 0 if x_adv is None else len(x)
    gap_max["random"], counts["random"] = zero, random_points * len(x)
    for _ in range(random_points):
        e = init_delta(x, s.eps, s.norm, True, generator)
        gap_max["random"] = torch.maximum(gap_max["random"], gap(e))
    return _verdict(gamma_s, share.gamma.to(x.device), phi, gap_max, counts, rtol, s)


def _verdict(
    gamma_s: Tensor,
    gamma_t: Tensor,
    phi: Tensor,
    gap_max: dict[str, Tensor],
    counts: dict[str, int],
    rtol: float,
    s: Ascent,
) -> Prop2Check:
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
