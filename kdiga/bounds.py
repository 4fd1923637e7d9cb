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

The maximum in γ is not computable; we maximise |r| by projected gradient ascent with random
starts and keep, per sample, the largest |r| over EVERY perturbation evaluated. Any evaluated
point gives a valid lower bound of the true maximum, so on every perturbation we evaluated the
bound is a theorem, not an estimate (`proposition2` evaluates both models on the union of both
ascents and any extra perturbations supplied).

All inputs are images in [0, 1] with shape [B, C, H, W]; radii are in that pixel space.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiga.utils import eval_mode

logger = logging.getLogger(__name__)

NORMS = ("linf", "l2")
_DUAL = {"linf": 1.0, "l2": 2.0}  # the p of the dual norm of each ball

__all__ = [
    "NORMS",
    "LLMResult",
    "Prop2Result",
    "gap",
    "input_gradient",
    "llm_key",
    "local_linearity",
    "proposition2",
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


def _check_attack(eps: float, steps: int, restarts: int, step_size: float | None, norm: str):
    _check_eps(eps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
    if step_size is not None:
        _check_eps(step_size, "step_size")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _check_batch(x: Tensor, y: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be a batch [B, C, H, W], got shape {tuple(x.shape)}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape [B]={tuple(x.shape[:1])}, got {tuple(y.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("x must be images in [0, 1]; normalisation lives inside the model")


def _check_perturbation(e: Tensor, x: Tensor, eps: float, norm: str) -> None:
    if e.shape != x.shape:
        raise ValueError(f"perturbation shape {tuple(e.shape)} != x shape {tuple(x.shape)}")
    tol = 1e-6 * eps + 1e-12
    if (_norm(e, norm) > eps + tol).any():
        raise ValueError(f"perturbation outside the {norm} ball of radius {eps}")
    if ((x + e) < -tol).any() or ((x + e) > 1 + tol).any():
        raise ValueError("perturbation leaves the image box: x + e must lie in [0, 1]")


# --------------------------------------------------------------------------- small helpers


def _norm(v: Tensor, norm: str) -> Tensor:
    """Per-sample norm of [B, ...]: L∞ or L2."""
    flat = v.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(p=2, dim=1)


def _dual_norm(v: Tensor, norm: str) -> Tensor:
    """Per-sample dual norm of [B, ...] for the ball `norm`: L1 for L∞, L2 for L2."""
    return v.flatten(1).norm(p=_DUAL[norm], dim=1)


def _dot(e: Tensor, g: Tensor) -> Tensor:
    return (e * g).flatten(1).sum(dim=1)


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


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


def _project(e: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Into the image box, then into the ball (which only shrinks |e_i|: box kept)."""
    e = (x + e).clamp(0, 1) - x
    if norm == "linf":
        return e.clamp(-eps, eps)
    scale = (eps / _norm(e, "l2").clamp_min(1e-30)).clamp(max=1.0)
    return e * _bcast(scale, e)


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else x.device
    if norm == "linf":
        e = torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype) * 2 - 1
        e = e.to(x.device) * eps
    else:
        d = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
        u = torch.rand(x.shape[0], generator=generator, device=dev, dtype=x.dtype).to(x.device)
        radius = eps * u ** (1.0 / x[0].numel())
        e = d * _bcast(radius / _norm(d, "l2").clamp_min(1e-30), d)
    return _project(e, x, eps, norm)


def _ascent_step(grad: Tensor, step_size: float, norm: str) -> Tensor:
    if norm == "linf":
        return step_size * grad.sign()
    return step_size * grad / _bcast(_norm(grad, "l2").clamp_min(1e-30), grad)


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
    """Running per-sample maximum of |r(e)| of one model over every e evaluated."""

    model: nn.Module
    ce0: Tensor
    g0: Tensor
    gamma: Tensor = field(init=False)
    signed: Tensor = field(init=False)
    e_star: Tensor = field(init=False)

    def __post_init__(self) -> None:
        # e = 0 is a valid point with r(0) = 0 exactly: γ starts there, so γ >= 0.
        self.gamma = torch.zeros_like(self.ce0)
        self.signed = torch.zeros_like(self.ce0)
        self.e_star = torch.zeros_like(self.g0)

    def update(self, e: Tensor, ce: Tensor) -> None:
        r = ce - self.ce0 - _dot(e, self.g0)
        better = r.abs() > self.gamma
        self.gamma = torch.where(better, r.abs(), self.gamma)
        self.signed = torch.where(better, r, self.signed)
        self.e_star = torch.where(_bcast(better, e), e, self.e_star)


class _Evaluator:
    """Evaluates every model on every perturbation tried, so that each γ is the max over the
    union of all points evaluated; also keeps the largest |CE gap| of the first and last
    models."""

    def __init__(self, tracks: list[_Track], x: Tensor, y: Tensor, on_evaluate) -> None:
        self.tracks, self.x, self.y, self.on_evaluate = tracks, x, y, on_evaluate
        self.count = 0
        self.gap_max = (tracks[0].ce0 - tracks[-1].ce0).abs()  # at e = 0

    def evaluate(self, e: Tensor, known: dict[int, Tensor] | None = None) -> None:
        e = e.detach()
        known = known or {}
        ces = []
        with torch.no_grad():
            for i, track in enumerate(self.tracks):
                ce = known[i] if i in known else _ce(track.model, self.x + e, self.y)
                track.update(e, ce)
                ces.append(ce)
            self.gap_max = torch.maximum(self.gap_max, (ces[0] - ces[-1]).abs())
        self.count += 1
        if self.on_evaluate is not None:
            self.on_evaluate(e)

    def ascend(self, i: int, eps, steps, restarts, step_size, norm, generator) -> None:
        """Projected (sign) gradient ascent on |r_i(e)| from `restarts` random starts."""
        track, x, y = self.tracks[i], self.x, self.y
        step_size = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
        for _ in range(restarts):
            e = _random_start(x, eps, norm, generator)
            for t in range(steps + 1):
                e = e.detach().requires_grad_(t < steps)
                ce = _ce(track.model, x + e, y)
                self.evaluate(e, {i: ce.detach()})
                if t == steps:
                    break
                r = ce - track.ce0 - _dot(e, track.g0)
                (grad,) = torch.autograd.grad(r.abs().sum(), e)
                e = _project(e.detach() + _ascent_step(grad, step_size, norm), x, eps, norm)


# --------------------------------------------------------------------------- LLM


@dataclass
class LLMResult:
    """Local linearity (Definition 2) of one model on a batch.

    gamma [B]: max |r(e)| found; e_star [B, C, H, W]: the perturbation attaining it (zero
    where no point beat e = 0); residual [B]: the signed r(e_star); ce [B] and grad
    [B, C, H, W]: CE and its input gradient at x; eps, norm; evaluations: number of
    perturbations evaluated per sample (besides e = 0).
    """

    gamma: Tensor
    e_star: Tensor
    residual: Tensor
    ce: Tensor
    grad: Tensor
    eps: float
    norm: str
    evaluations: int


def local_linearity(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = 20,
    restarts: int = 2,
    step_size: float | None = None,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    extra_perturbations: Sequence[Tensor] = (),
    on_evaluate: Callable[[Tensor], None] | None = None,
) -> LLMResult:
    """LLM(f, x, eps) of paper eq. 10 per sample, WITH the absolute value.

    γ(x) = max over ‖e‖ ≤ eps and x + e ∈ [0, 1] of |CE(f(x+e), y) − CE(f(x), y) − eᵀ∇x CE|.
    Restricting to the valid image box only shrinks Definition 2's set. The maximum is sought
    by projected gradient ascent on |r(e)| (sign steps for L∞, normalised steps for L2;
    default step size 2.5·eps/steps), `restarts` uniform random starts, `steps` steps each;
    the result is, per sample, the max over EVERY iterate evaluated (steps + 1 per restart,
    the start included), over `extra_perturbations` (each [B, C, H, W], inside the ball and
    the box, else ValueError) and over e = 0 (r = 0), so γ >= 0 and γ is a lower bound of the
    true maximum. `on_evaluate(e)` is called with each perturbation evaluated. The model runs
    in eval mode (restored after); no parameter gradients.

    x [B, C, H, W] in [0, 1], y [B]; eps > 0; norm in NORMS ("linf", "l2").
    """
    _check_batch(x, y)
    _check_attack(eps, steps, restarts, step_size, norm)
    for e in extra_perturbations:
        _check_perturbation(e, x, eps, norm)
    with _frozen(model):
        x, y = _plain(x), _plain(y)
        ce0, g0 = input_gradient(model, x, y)
        ev = _Evaluator([_Track(model, ce0, g0)], x, y, on_evaluate)
        ev.ascend(0, eps, steps, restarts, step_size, norm, generator)
        for e in extra_perturbations:
            ev.evaluate(e)
    t = ev.tracks[0]
    return LLMResult(t.gamma, t.e_star, t.signed, ce0, g0, float(eps), norm, ev.count)


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
    perturbations evaluated per sample (besides e = 0).
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


def proposition2(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = 20,
    restarts: int = 2,
    step_size: float | None = None,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    extra_perturbations: Sequence[Tensor] = (),
    on_evaluate: Callable[[Tensor], None] | None = None,
) -> Prop2Result:
    """Right side of Proposition 2 (paper eq. 11) per sample: γs + γt + φ.

    φ = CE(fs(x)) + CE(ft(x)) + eps·‖gs − gt‖_*, where ‖·‖_* is the dual norm of the ball's
    norm (‖·‖₁ for L∞, ‖·‖₂ for L2): the proof needs eᵀ(gs − gt) ≤ eps·‖gs − gt‖_* (Hölder),
    which the paper's "a norm" does not give for, e.g., ‖·‖₂ under an L∞ ball. γs and γt are
    each the max |r| over the UNION of the student's ascent iterates, the teacher's ascent
    iterates (same settings as `local_linearity`), `extra_perturbations` (each
    [B, C, H, W] in the ball and the box) and e = 0: both models are evaluated on every
    point, so on every perturbation evaluated the inequality is a theorem.
    `on_evaluate(e)` is called with each perturbation evaluated. Models in eval mode
    (restored after); no parameter gradients.
    """
    _check_batch(x, y)
    _check_attack(eps, steps, restarts, step_size, norm)
    for e in extra_perturbations:
        _check_perturbation(e, x, eps, norm)
    with _frozen(student, teacher):
        x, y = _plain(x), _plain(y)
        ce_s, g_s = input_gradient(student, x, y)
        ce_t, g_t = input_gradient(teacher, x, y)
        ev = _Evaluator([_Track(student, ce_s, g_s), _Track(teacher, ce_t, g_t)], x, y, on_evaluate)
        for i in (0, 1):
            ev.ascend(i, eps, steps, restarts, step_size, norm, generator)
        for e in extra_perturbations:
            ev.evaluate(e)
    s, t = ev.tracks
    dual = _dual_norm(g_s - g_t, norm)
    phi = ce_s + ce_t + eps * dual
    return Prop2Result(
        gamma_s=s.gamma,
        gamma_t=t.gamma,
        ce_s=ce_s,
        ce_t=ce_t,
        grad_gap_l2=_dual_norm(g_s - g_t, "l2"),
        grad_gap_dual=dual,
        phi=phi,
        bound=s.gamma + t.gamma + phi,
        gap_max=ev.gap_max,
        e_star_s=s.e_star,
        e_star_t=t.e_star,
        eps=float(eps),
        norm=norm,
        evaluations=ev.count,
    )


# --------------------------------------------------------------------------- Table 4


def llm_key(radius: float) -> str:
    """Key of the LLM column at `radius` in `table4`'s dict: f"llm@{radius:g}"."""
    return f"llm@{radius:g}"


def sample_indices(n_total: int, n: int, seed: int) -> Tensor:
    """`n` distinct random indices into range(n_total), sorted, int64 [n], fixed by `seed`
    (Table 4 uses 1000 random test samples)."""
    if not (isinstance(n_total, int) and isinstance(n, int) and 1 <= n <= n_total):
        raise ValueError(f"need ints 1 <= n <= n_total, got n={n!r}, n_total={n_total!r}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=gen)[:n].sort().values


def table4(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    radii: Sequence[float] = (4 / 255, 8 / 255),
    steps: int = 20,
    restarts: int = 2,
    batch_size: int = 250,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Table 4's columns for `student`, averaged over the samples x [N, C, H, W], y [N].

    Keys: `llm_key(r)` for each radius (mean LLM of the student, L∞ ball, eq. 10), "ce" (mean
    clean CE of the student) and "grad_gap_l2" (mean ‖gs − gt‖₂ with `teacher`). The caller
    picks the samples (`sample_indices`). Batches of `batch_size` are moved to `device`
    (default: the student's parameters' device); the models must already be there.
    """
    for r in radii:
        _check_eps(r, "radius")
    _check_attack(1.0, steps, restarts, None, "linf")
    keys = [llm_key(r) for r in radii]
    if len(set(keys)) != len(keys) or not keys:
        raise ValueError(f"radii must be non-empty and distinct at 6 significant digits: {radii}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    _check_batch(x, y)
    if len(x) == 0:
        raise ValueError("table4 needs at least one sample")
    if device is None:
        device = next((p.device for p in student.parameters()), x.device)
    sums = dict.fromkeys([*keys, "ce", "grad_gap_l2"], 0.0)
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        ce_s, g_s = input_gradient(student, xb, yb)
        _, g_t = input_gradient(teacher, xb, yb)
        sums["ce"] += ce_s.sum().item()
        sums["grad_gap_l2"] += _dual_norm(g_s - g_t, "l2").sum().item()
        for key, r in zip(keys, radii, strict=True):
            res = local_linearity(
                student, xb, yb, r, steps=steps, restarts=restarts, generator=generator
            )
            sums[key] += res.gamma.sum().item()
        logger.debug("table4: %d/%d samples", min(start + batch_size, len(x)), len(x))
    return {k: v / len(x) for k, v in sums.items()}
