"""Local linearity (paper Definition 2, eq. 10) of one model: `local_linearity`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdiga.bounds.ascent import own_ascent
from kdiga.bounds.primitives import check_batch, check_perturbations, frozen, input_gradient, plain
from kdiga.bounds.settings import AscentSettings

#: the converging defaults (bench/llm_convergence.py measures them against a long budget)
DEFAULT = AscentSettings()


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
    settings: AscentSettings = DEFAULT,
    generator: torch.Generator | None = None,
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

    The ascent follows `settings` (`AscentSettings`: its fields are named in backquotes
    below). Runs: one from each of `warm_starts` (perturbations [B, C, H, W] in the ball and
    the box, e.g. adversarial examples minus x), then `restarts` from the ball's own starts
    (0: the warm starts only, of which there must be one): with
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
    eps > 0.
    """
    check_batch(x, y)
    s = settings.at(eps)
    check_perturbations([*warm_starts, *extra_perturbations], x, s.eps, s.norm)
    with frozen(model):
        x, y = plain(x), plain(y)
        ce0, g0 = input_gradient(model, x, y)
        t, count = own_ascent(
            model,
            x,
            y,
            s,
            generator,
            ce0,
            g0,
            warm_starts=[plain(e) for e in warm_starts],
            extra=[plain(e) for e in extra_perturbations],
            on_evaluate=on_evaluate,
        )
    return LLMResult(
        gamma=t.gamma,
        e_star=t.e_star,
        residual=t.signed,
        ce=ce0,
        grad=g0,
        eps=s.eps,
        norm=s.norm,
        evaluations=count,
        steps_used=t.steps_used,
        converged=t.converged,
        gamma_half=t.gamma_half,
    )
