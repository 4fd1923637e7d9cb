"""Sanity checks on attack outputs; the pipeline marks a result suspect when any fails.

Each check returns a list of human-readable problems (empty when all is well) instead of
raising, so a report can show every problem at once.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

from kdiga.attacks.pgd import perturbation_norm
from kdiga.options import MEASURE_NORMS
from kdiga.utils import eval_mode


def check_perturbation(
    x: Tensor, x_adv: Tensor, eps: float, norm: str, tol: float = 1e-6
) -> list[str]:
    """Problems with adversarial inputs ``x_adv`` [B, C, H, W] around ``x`` [B, C, H, W].

    Reports samples outside the ``norm`` ball of radius ``eps`` (beyond ``tol``), values
    outside [0, 1] (beyond ``tol``), non-finite values and a shape mismatch.
    """
    if not isinstance(norm, str) or norm.lower() not in MEASURE_NORMS:
        raise ValueError(f"norm must be one of {MEASURE_NORMS} (any case), got {norm!r}")
    if x.shape != x_adv.shape:
        return [f"x_adv has shape {tuple(x_adv.shape)}, x has shape {tuple(x.shape)}"]
    problems = []
    if x_adv.numel() and not torch.isfinite(x_adv).all():
        problems.append(f"x_adv has {int((~torch.isfinite(x_adv)).sum())} non-finite values")
    if x.shape[0] == 0:
        return problems
    dist = perturbation_norm((x_adv.detach() - x.detach()).double(), norm)
    outside = dist > eps + tol
    if outside.any():
        problems.append(
            f"{int(outside.sum())}/{len(dist)} samples outside the {norm} ball of radius "
            f"{eps:g} (max norm {dist.max().item():.6g})"
        )
    low, high = x_adv.min().item(), x_adv.max().item()
    if low < -tol or high > 1 + tol:
        problems.append(f"x_adv outside [0, 1]: range [{low:.6g}, {high:.6g}]")
    return problems


def check_sweep(result: Any, tol: float = 1e-6) -> list[str]:
    """Problems with a ``SweepResult``: robust above clean, robust rising with the radius.

    Checked per sample (a sample robust at a radius but misclassified clean; a sample robust
    at a larger radius after an attack broke it at a smaller one, which means the attack at
    the larger radius is weak or the gradients are masked) and for the accuracies; also the
    recorded largest perturbation per radius and the [0, 1] range of the adversarial inputs.
    """
    problems = []
    radii = [float(r) for r in result.radii]
    clean = result.clean_correct.bool()
    robust = result.robust.bool()
    if robust.shape != (len(radii), clean.shape[0]):
        return [f"robust has shape {tuple(robust.shape)}, expected ({len(radii)}, {len(clean)})"]
    if any(b <= a for a, b in itertools.pairwise(radii)):
        problems.append(f"radii are not strictly increasing: {radii}")
    n = max(clean.shape[0], 1)
    clean_acc = clean.sum().item() / n
    above_clean = robust & ~clean
    for k, r in enumerate(radii):
        if above_clean[k].any():
            problems.append(
                f"radius {r:g}: {int(above_clean[k].sum())} samples robust but misclassified clean"
            )
        acc = robust[k].sum().item() / n
        if acc > clean_acc:
            problems.append(f"radius {r:g}: robust accuracy {acc:.4f} above clean {clean_acc:.4f}")
        if k == 0:
            continue
        prev_acc = robust[k - 1].sum().item() / n
        if acc > prev_acc:
            problems.append(
                f"robust accuracy rises from {prev_acc:.4f} at radius {radii[k - 1]:g} "
                f"to {acc:.4f} at radius {r:g}"
            )
        revived = robust[k] & ~robust[k - 1]
        if revived.any():
            problems.append(
                f"{int(revived.sum())} samples broken at radius {radii[k - 1]:g} but robust at "
                f"{r:g}: the attack at the larger radius is weak or gradients are masked"
            )
    problems += _record_problems(result, radii, tol)
    return problems


def _record_problems(result: Any, radii: list[float], tol: float) -> list[str]:
    """Problems with a ``SweepResult``'s records: a largest perturbation above its radius (or
    not finite), adversarial inputs outside [0, 1]."""
    problems = []
    for r, m in zip(radii, getattr(result, "max_perturbation", []), strict=False):
        if not math.isfinite(m) or m > r + tol:
            problems.append(f"radius {r:g}: largest perturbation {m:.6g} exceeds the radius")
    for r, ok in zip(radii, getattr(result, "in_range", []), strict=False):
        if not ok:
            problems.append(f"radius {r:g}: adversarial inputs outside [0, 1]")
    return problems


def check_gradients(model: torch.nn.Module, x: Tensor, y: Tensor) -> list[str]:
    """Problems with the input gradients of cross-entropy at ``x`` [B, C, H, W], labels [B].

    Zero or non-finite per-sample gradients make gradient-based attacks unreliable (gradient
    masking, or a saturated softmax): AutoAttack checks this only for its DLR losses, this
    check does it for CE, the loss PGD uses. The model is run in eval mode (mode restored);
    no parameter gradient is accumulated.
    """
    if x.shape[0] == 0:
        return []
    x = x.detach().requires_grad_(True)
    with eval_mode(model), torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    flat = grad.reshape(grad.shape[0], -1)
    problems = []
    nonfinite = ~torch.isfinite(flat).all(dim=1)
    if nonfinite.any():
        problems.append(f"{int(nonfinite.sum())}/{len(flat)} points with non-finite input gradient")
    zero = (flat.abs().sum(dim=1) == 0) & ~nonfinite
    if zero.any():
        problems.append(
            f"{int(zero.sum())}/{len(flat)} points with zero input gradient of the CE loss: "
            "gradient-based attacks are unreliable there (masked gradients or saturated softmax)"
        )
    return problems
