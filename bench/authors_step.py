"""The authors' KDIGA training step (RulinShao/AdversariallyRobustDistillation ``main.py``),
reimplemented as the reference our step is timed against (``bench.step_cost`` item 1,
``bench.gpu_check``'s step_cost section), and the check that it computes our loss.

Their step, in the variant whose IGA term trains: teacher forward on an input that requires
grad, batch-mean CE, ``autograd.grad`` -> t_grad; student forward, batch-mean CE,
``autograd.grad(create_graph=True)`` -> s_grad; then a SECOND student forward and a SECOND
teacher forward for the KL term (two student and two teacher forwards per step).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.pairs import IGA_CFG, KD_CFG, METHOD_CFG, Setup
from kdiga.methods import build_loss


def authors_kdiga_loss(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    ce_weight: float = KD_CFG["ce_weight"],
    kl_weight: float = KD_CFG["kl_weight"],
    temperature: float = KD_CFG["temperature"],
    gamma: float = IGA_CFG["iga_weight"],
) -> Tensor:
    """The authors' KDIGA loss formulation, two student and two teacher forwards (scalar).

    ``x`` [B, C, H, W], ``y`` [B]; student in train mode, teacher in eval mode with frozen
    parameters. t_grad and s_grad are gradients of the batch-MEAN CE, the IGA term is
    ``(gamma / B) * ‖s_grad − t_grad‖_F`` with s_grad's graph kept (so the term trains), and
    the KL term comes from a second forward of each model. The KL is ``batchmean`` (theirs is
    ``nn.KLDivLoss()``'s element mean) so the value equals ``build_loss("kdiga",
    iga_reduction="batch_frobenius", iga_weight=gamma)``; the cost is the same either way.
    """
    batch = x.shape[0]
    x_in = x.detach().clone().requires_grad_(True)
    t_logits = teacher(x_in)
    t_loss = F.cross_entropy(t_logits, y)
    t_grad = torch.autograd.grad(t_loss, x_in)[0].detach()
    s_logits = student(x_in)
    hard_loss = F.cross_entropy(s_logits, y)
    s_grad = torch.autograd.grad(hard_loss, x_in, create_graph=True)[0]
    x_kl = x.detach()
    s_logits_kl = student(x_kl)
    t_logits_kl = teacher(x_kl)
    kl = F.kl_div(
        F.log_softmax(s_logits_kl / temperature, dim=1),
        F.softmax(t_logits_kl / temperature, dim=1),
        reduction="batchmean",
    )
    iga = (gamma / batch) * (s_grad - t_grad).norm(2)
    return ce_weight * hard_loss + kl_weight * temperature**2 * kl + iga


def authors_kdiga_step(s: Setup) -> Callable[[], None]:
    """One training step with :func:`authors_kdiga_loss`."""

    def step() -> None:
        s.opt.zero_grad(set_to_none=True)
        authors_kdiga_loss(s.student, s.teacher, s.x, s.y).backward()
        s.opt.step()

    return step


def loss_agreement(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Our KDIGA loss and the authors' formulation on the same models and batch, no step.

    ``cfg``: ``ce_weight``, ``kl_weight``, ``temperature``, ``iga_weight`` (default
    ``METHOD_CFG["kdiga"]``); the IGA reduction is always ``batch_frobenius``.

    Returns ``ours``, ``authors``, ``rel`` (|ours − authors| / |ours|) and ``grad_rel``
    (‖g_ours − g_authors‖ / ‖g_ours‖ over all the student's parameter gradients at once; per
    tensor it would be dominated by rounding in gradients that are zero in exact arithmetic,
    e.g. a BatchNorm bias followed by a convolution and another train-mode BatchNorm).
    Copies of the student are used so BatchNorm running stats of ``student`` are untouched.
    """
    cfg = {**METHOD_CFG["kdiga"], **(cfg or {}), "iga_reduction": "batch_frobenius"}
    theirs = {k: cfg[k] for k in ("ce_weight", "kl_weight", "temperature")}
    results = {}
    grads = {}
    for name in ("ours", "authors"):
        s = copy.deepcopy(student).train()
        if name == "ours":
            loss = build_loss("kdiga", **cfg)(s, teacher, x, y)["loss"]
        else:
            loss = authors_kdiga_loss(s, teacher, x, y, **theirs, gamma=cfg["iga_weight"])
        loss.backward()
        results[name] = loss.item()
        grads[name] = [
            torch.zeros_like(p).flatten() if p.grad is None else p.grad.detach().flatten()
            for p in s.parameters()
        ]
    rel = abs(results["ours"] - results["authors"]) / max(abs(results["ours"]), 1e-30)
    g_ours, g_authors = torch.cat(grads["ours"]), torch.cat(grads["authors"])
    grad_rel = ((g_ours - g_authors).norm() / g_ours.norm().clamp_min(1e-30)).item()
    return {**results, "rel": rel, "grad_rel": grad_rel}
