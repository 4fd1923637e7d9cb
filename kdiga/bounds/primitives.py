"""The bounds' primitives: input checks, the frozen-model context, per-sample CE, the input
gradient, the Taylor residual r(e) and the Proposition 2 gap. The ball's own primitives (random
start, step, projection) are the attacks' (`kdiga.attacks`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiga.attacks import perturbation_norm, project_delta, step_delta
from kdiga.utils import eval_mode


def check_batch(x: Tensor, y: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be a batch [B, C, H, W], got shape {tuple(x.shape)}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape [B]={tuple(x.shape[:1])}, got {tuple(y.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("x must be images in [0, 1]; normalisation lives inside the model")


def check_perturbations(es: Sequence[Tensor], x: Tensor, eps: float, norm: str) -> None:
    for e in es:
        if e.shape != x.shape:
            raise ValueError(f"perturbation shape {tuple(e.shape)} != x shape {tuple(x.shape)}")
        tol = 1e-6 * eps + 1e-12
        if (perturbation_norm(e, norm) > eps + tol).any():
            raise ValueError(f"perturbation outside the {norm} ball of radius {eps}")
        if ((x + e) < -tol).any() or ((x + e) > 1 + tol).any():
            raise ValueError("perturbation leaves the image box: x + e must lie in [0, 1]")


def dot(e: Tensor, g: Tensor) -> Tensor:
    return (e * g).flatten(1).sum(dim=1)


def bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@contextlib.contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
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


def plain(t: Tensor) -> Tensor:
    """A detached tensor autograd may save (an inference-mode tensor is cloned); call inside
    `frozen`, where inference mode is off."""
    return t.detach().clone() if t.is_inference() else t.detach()


def sample_ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def corner(x: Tensor, g: Tensor, eps: float, norm: str, sign: float) -> Tensor:
    """±eps·sign(g) (L∞) or ±eps·g/‖g‖₂ (L2), kept in the image box: PGD's step from e = 0."""
    return project_delta(x, step_delta(torch.zeros_like(x), sign * g, eps, norm), eps, norm)


def input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample CE [B] and input gradient ∇x CE [B, C, H, W] of `model` at (x, y).

    The gradient is that of the SUMMED CE, i.e. each sample's own gradient. The model runs in
    eval mode (its mode is restored) and no parameter gradient is computed or stored. Both
    outputs are detached.
    """
    check_batch(x, y)
    with frozen(model):
        x = x.detach().clone().requires_grad_(True)
        ce = sample_ce(model, x, plain(y))
        (g,) = torch.autograd.grad(ce.sum(), x)
    return ce.detach(), g.detach()


def residual(model: nn.Module, x: Tensor, y: Tensor, e: Tensor, ce0: Tensor, g0: Tensor) -> Tensor:
    """Signed first-order Taylor residual r(e) [B] (the quantity inside paper eq. 10).

    r(e) = CE(f(x+e), y) − ce0 − eᵀ g0, with ce0 [B] and g0 [B, C, H, W] from
    `input_gradient(model, x, y)`. Differentiable in `e` when `e` requires grad (the ascent
    uses that); the caller chooses the model's mode (the public functions use eval mode).
    """
    return sample_ce(model, x + e, y) - ce0 - dot(e, g0)


def gap(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, e: Tensor) -> Tensor:
    """Left side of Proposition 2 (eq. 11): |CE(fs(x+e), y) − CE(ft(x+e), y)| [B].

    Both models in eval mode (modes restored); no gradients.
    """
    check_batch(x, y)
    if e.shape != x.shape:
        raise ValueError(f"e shape {tuple(e.shape)} != x shape {tuple(x.shape)}")
    with eval_mode(student, teacher), torch.no_grad():
        return (sample_ce(student, x + e, y) - sample_ce(teacher, x + e, y)).abs()
