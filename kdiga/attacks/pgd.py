"""Projected gradient descent (PGD) in L∞ and L2, with random start, restarts and early exit.

Madry et al. (2018), the attack the paper uses for evaluation (20 steps on CIFAR-10, 40 on
ImageNet) and for ARD's inner maximisation (paper eq. 2, 3). Everything lives in the
[0, 1] pixel space: ``x + δ`` is clamped to [0, 1] and ``δ`` projected onto the ε-ball.

The attack is written as three small pieces, ``init_delta`` / ``step_delta`` /
``project_delta``, which ``pgd`` chains.

``pgd(..., compile_model=True)`` runs the steps' forward and input gradient through
``torch.compile(model)`` (first order only; opt-in, CUDA only: elsewhere a no-op with a log
line). The first call pays the compilation; the sizes that early exit and restarts produce are
compiled once each (dynamic shapes after the first change).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiga.options import MEASURE_NORMS, NORMS
from kdiga.utils import eval_mode

logger = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]


def canonical_norm(norm: str) -> str:
    """Return ``"linf"`` or ``"l2"`` for any capitalisation of them; ValueError otherwise."""
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} (any case), got {norm!r}")
    return norm.lower()


def check_eps(eps: float, name: str = "eps") -> float:
    """Return ``eps`` as a float if it is finite and > 0; ValueError otherwise."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0, got {eps!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {eps!r}")
    return value


def perturbation_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-sample norm of ``delta`` [B, ...] -> [B]; ``norm`` "linf", "l2" or "l1", any case."""
    key = norm.lower() if isinstance(norm, str) else norm
    if key not in MEASURE_NORMS:
        raise ValueError(f"norm must be one of {MEASURE_NORMS} (any case), got {norm!r}")
    flat = delta.reshape(delta.shape[0], -1)
    if flat.shape[1] == 0:
        return flat.new_zeros(flat.shape[0])
    if key == "linf":
        return flat.abs().amax(dim=1)
    return flat.norm(p=2 if key == "l2" else 1, dim=1)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a [B] tensor so it broadcasts against ``like`` [B, ...]."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def init_delta(
    x: Tensor, eps: float, norm: str, random_start: bool, generator: torch.Generator | None
) -> Tensor:
    """Starting perturbation δ₀ [B, ...]: zero, or random in the ε-ball, with x + δ₀ in [0, 1].

    L∞: uniform in [-ε, ε] per coordinate. L2: a uniformly random direction scaled by
    ε·u, u ~ U(0, 1). With a ``generator`` the numbers are drawn on its device and moved to
    ``x``'s (a CPU generator gives the same start on every device); without one they come
    from torch's global RNG on ``x``'s device.
    """
    if not random_start:
        return torch.zeros_like(x)
    gen_device = generator.device if generator is not None else x.device
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
        delta = (2 * u - 1).to(x.device) * eps
    else:
        d = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
        r = torch.rand(x.shape[0], generator=generator, device=gen_device, dtype=x.dtype)
        d, r = d.to(x.device), r.to(x.device)
        d = d / _per_sample(perturbation_norm(d, "l2").clamp_min(1e-12), d)
        delta = d * _per_sample(r, d) * eps
    return project_delta(x, delta, eps, norm)


def step_delta(delta: Tensor, grad: Tensor, step_size: float, norm: str) -> Tensor:
    """One ascent step: δ + α·sign(g) (L∞) or δ + α·g/‖g‖₂ per sample (L2)."""
    if norm == "linf":
        return delta + step_size * grad.sign()
    g_norm = _per_sample(perturbation_norm(grad, "l2").clamp_min(1e-12), grad)
    return delta + step_size * grad / g_norm


def project_delta(x: Tensor, delta: Tensor, eps: float, norm: str) -> Tensor:
    """Project δ onto the ε-ball of ``norm``, then so that x + δ lies in [0, 1].

    The box clamp after the ball projection only shrinks each |δᵢ| (x is in [0, 1]), so the
    result stays in the ball.
    """
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = perturbation_norm(delta, "l2")
        factor = torch.where(n > eps, eps / n.clamp_min(1e-12), torch.ones_like(n))
        delta = delta * _per_sample(factor, delta)
    return (x + delta).clamp(0.0, 1.0) - x


def _default_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _compiled(model: nn.Module, enabled: bool, device: torch.device) -> nn.Module:
    """``torch.compile(model)`` when ``enabled`` on CUDA; else ``model`` (logged when enabled).

    Compiled code is cached per model by torch (a later wrapper of the same model reuses it).
    """
    if not enabled:
        return model
    if device.type != "cuda":
        logger.info("compile_model=True is ignored on %s (compiling is for CUDA)", device.type)
        return model
    return torch.compile(model)


def _loss_and_grad(
    model: nn.Module, x_adv: Tensor, y: Tensor, loss_fn: LossFn
) -> tuple[Tensor, Tensor]:
    """Logits [B, N] and ∇ₓ of the summed per-sample loss [B, ...], w.r.t. x only."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv)
        loss = loss_fn(logits, y)
        if loss.shape != y.shape:
            raise ValueError(
                f"loss_fn must return a per-sample loss of shape {tuple(y.shape)}, "
                f"got shape {tuple(loss.shape)}"
            )
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return logits.detach(), grad.detach()


def _run_once(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    delta: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    norm: str,
    loss_fn: LossFn,
    early_stop: bool,
) -> tuple[Tensor, int]:
    """Run ``steps`` PGD steps from δ; return (δ, per-sample gradient evaluations).

    With ``early_stop`` a sample that the model misclassifies at the current iterate is
    frozen there and is not attacked further.
    """
    active = torch.arange(x.shape[0], device=x.device)
    grad_evals = 0
    for _ in range(steps):
        if active.numel() == 0:
            break
        xa, ya = x[active], y[active]
        logits, grad = _loss_and_grad(model, xa + delta[active], ya, loss_fn)
        grad_evals += int(active.numel())
        if early_stop:
            keep = logits.argmax(dim=1) == ya
            active, xa, grad = active[keep], xa[keep], grad[keep]
            if active.numel() == 0:
                break
        new = step_delta(delta[active], grad, step_size, norm)
        delta[active] = project_delta(xa, new, eps, norm)
    return delta, grad_evals


@dataclass
class _Best:
    """Per sample, the best attack point found so far over the restarts: ``x_adv`` [B, ...],
    whether it is misclassified ``mis`` [B] and its loss ``loss`` [B]."""

    x_adv: Tensor
    mis: Tensor
    loss: Tensor

    @classmethod
    def start(cls, x: Tensor) -> _Best:
        """The clean points, none misclassified, at loss -inf."""
        n = x.shape[0]
        return cls(
            x.clone(),
            torch.zeros(n, dtype=torch.bool, device=x.device),
            torch.full((n,), -math.inf, dtype=x.dtype, device=x.device),
        )

    def todo(self, early_stop: bool) -> Tensor:
        """Indices [K] of the samples the next restart attacks: all, or with ``early_stop``
        those not yet misclassified."""
        todo = ~self.mis if early_stop else torch.ones_like(self.mis)
        return todo.nonzero().squeeze(1)

    def update(self, idx: Tensor, cand: Tensor, mis: Tensor, loss: Tensor) -> None:
        """Keep ``cand`` (the points of samples ``idx``, with their ``mis`` and ``loss``) where
        it is better: misclassified where the best is not, else equally so at a higher loss."""
        better = (mis & ~self.mis[idx]) | ((mis == self.mis[idx]) & (loss > self.loss[idx]))
        sel = idx[better]
        self.x_adv[sel], self.mis[sel], self.loss[sel] = cand[better], mis[better], loss[better]


@torch.no_grad()
def _score(model: nn.Module, x_adv: Tensor, y: Tensor, loss_fn: LossFn) -> tuple[Tensor, Tensor]:
    """(misclassified [B] bool, per-sample loss [B]) at x_adv."""
    logits = model(x_adv)
    return logits.argmax(dim=1) != y, loss_fn(logits, y).detach()


def _validate(
    x: Tensor, y: Tensor, eps: float, steps: int, step_size: float | None, restarts: int
) -> tuple[float, float]:
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError("x must be a floating tensor [B, C, H, W] of images in [0, 1]")
    if not isinstance(y, Tensor) or y.shape != x.shape[:1]:
        raise ValueError(f"y must be a label tensor of shape [{x.shape[0]}], got {y!r:.80}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"x must lie in [0, 1] (got range [{x.min().item():.4g}, {x.max().item():.4g}]); "
            "normalisation belongs inside the model wrapper"
        )
    eps = check_eps(eps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
    if step_size is None:
        step_size = 2.5 * eps / steps if steps else 0.0
    else:
        step_size = check_eps(step_size, "step_size")
    return eps, step_size


@overload
def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float | None = ...,
    norm: str = ...,
    restarts: int = ...,
    random_start: bool = ...,
    loss_fn: LossFn | None = ...,
    generator: torch.Generator | None = ...,
    early_stop: bool = ...,
    return_stats: Literal[False] = ...,
    compile_model: bool = ...,
) -> Tensor: ...


@overload
def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float | None = ...,
    norm: str = ...,
    restarts: int = ...,
    random_start: bool = ...,
    loss_fn: LossFn | None = ...,
    generator: torch.Generator | None = ...,
    early_stop: bool = ...,
    return_stats: Literal[True],
    compile_model: bool = ...,
) -> tuple[Tensor, dict[str, Any]]: ...


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float | None = None,
    norm: str = "linf",
    restarts: int = 1,
    random_start: bool = True,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    early_stop: bool = False,
    return_stats: bool = False,
    compile_model: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Any]]:
    """PGD attack: maximise ``loss_fn(model(x + δ), y)`` over ‖δ‖ ≤ ε, x + δ in [0, 1].

    Args:
        model: classifier on images in [0, 1] -> logits [B, N]. Run in eval mode during
            the attack; its previous mode is restored. No parameter gradient is accumulated.
        x: clean images [B, C, H, W] in [0, 1]. y: labels [B].
        eps: radius ε > 0 in [0, 1] pixel space. steps: number of steps (>= 0).
        step_size: α; default 2.5·ε/steps.
        norm: "linf" (sign step) or "l2" (normalised-gradient step), any case.
        restarts: runs from independent random starts; per sample the result kept is the
            first misclassified one, else the one with the highest loss.
        random_start: start from a random point in the ball (else from x).
        loss_fn: ``loss_fn(logits, y) -> [B]`` per-sample loss; default cross-entropy.
        generator: RNG for the random starts (drawn on its device; None: the global RNG).
        early_stop: freeze a sample as soon as it is misclassified (for evaluation).
        return_stats: also return ``{"grad_evals": int}``, the per-sample gradient
            evaluations spent (one sample through one forward + backward counts 1).
        compile_model: run the steps through ``torch.compile(model)`` (CUDA only; elsewhere
            ignored with a log line). Same attack up to floating-point rounding; the first
            call compiles (tens of seconds), later calls on the same model reuse it.

    Returns:
        x_adv [B, C, H, W] (detached), or ``(x_adv, stats)`` with ``return_stats``.
    """
    norm = canonical_norm(norm)
    eps, step_size = _validate(x, y, eps, steps, step_size, restarts)
    loss_fn = loss_fn or _default_loss
    x = x.detach()
    grad_evals = 0
    best = _Best.start(x)
    step_model = _compiled(model, compile_model, x.device)
    with eval_mode(model):
        for r in range(restarts):
            idx = best.todo(early_stop)
            if idx.numel() == 0:
                break
            xs, ys = x[idx], y[idx]
            delta = init_delta(xs, eps, norm, random_start, generator)
            delta, n = _run_once(
                step_model,
                xs,
                ys,
                delta,
                eps=eps,
                steps=steps,
                step_size=step_size,
                norm=norm,
                loss_fn=loss_fn,
                early_stop=early_stop,
            )
            grad_evals += n
            cand = xs + delta
            if restarts == 1:
                best.x_adv = cand
                break
            best.update(idx, cand, *_score(model, cand, ys, loss_fn))
            logger.debug("pgd restart %d: %d/%d misclassified", r, int(best.mis.sum()), len(x))
    x_adv = best.x_adv.detach()
    if return_stats:
        return x_adv, {"grad_evals": grad_evals}
    return x_adv
