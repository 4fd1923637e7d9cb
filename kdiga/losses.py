"""Distillation losses: ST, PGD-AT, TRADES, KD, ARD, KDIGA (paper eq. 1, 2, 3, 5, 6, 7), RSLAD.

:func:`kdiga.methods.build_loss` (or a method entry's ``build``) returns a
:class:`DistillLoss`, a small ``nn.Module`` whose ``forward(student, teacher, x, y,
teacher_out=None)`` returns a dict: ``"loss"`` (scalar with grad) and the detached parts
(``"ce"``, ``"kl"``, ``"iga"``, ``"adv_ce"``, ``"robust_kl"``). Inputs ``x`` are images
[B, C, H, W] in [0, 1]; labels ``y`` are [B]; logits are [B, N].

Methods: the distillation methods of :mod:`kdiga.methods`, whose table says what each needs
(teacher, inner attack, IGA term) and which settings it takes, and the two teacher-training
losses ``at`` and ``trades`` (:data:`kdiga.methods.TEACHER_METHODS`).

- ``st``: CE(f(x), y).
- ``at``: Madry PGD-AT, CE(f(x+δ), y), δ = PGD on the model's CE.
- ``trades``: CE(f(x), y) + β·KL(softmax(f(x)) ‖ softmax(f(x+δ))), δ maximising that KL
  (Zhang et al. 2019; ``F.kl_div(log_softmax(f(x+δ)), softmax(f(x)))``).
- ``kd`` (eq. 1): λCE·CE(fs(x), y) + λKL·T²·KL(softmax(ft(x)/T) ‖ softmax(fs(x)/T)).
- ``ard`` (eq. 2, 3): λCE·CE(fs(x), y) + λKL·T²·KL(fs(x+δ)/T, ft(x)/T), δ = PGD on the
  student's CE.
- ``kdiga`` (eq. 5, Algorithm 1): KD + λIGA·IGA(gs, gt), gs = ∇x CE(fs(x), y), gt = ∇x CE(ft(x), y).
- ``kdiga_ardc`` (eq. 6): ARD's KL at x+δ, IGA at the clean x.
- ``kdiga_arda`` (eq. 7): KL(fs(x+δ)/T, ft(x+δ)/T) and IGA at x+δ.
- ``rslad`` (Zi et al. 2021, "Revisiting Adversarial Robustness Distillation: Robust Soft
  Labels Make Student Better"): α·T²·KL(ft(x)/T ‖ fs(x+δ)/T) + (1−α)·T²·KL(ft(x)/T ‖ fs(x)/T),
  no CE; δ = PGD maximising KL(ft(x)/T ‖ fs(x+δ)/T), the teacher's clean soft labels being
  the only target (the paper: α = 5/6, T = 1). The teacher is needed at x only.
- ``adaad``, ``iad``, ``igdm``: in :mod:`kdiga.losses_successors`.

Every KL is ``F.kl_div(..., reduction="batchmean")`` (a true KL per sample, averaged over the
batch), computed from log-probabilities for numerical stability.

The IGA reduction
-----------------
Per-sample input gradients ``g_i = ∇_{x_i} CE(f(x_i), y_i)`` are the rows of the gradient of
the SUMMED CE (no ``vmap`` needed). :func:`iga_term` reduces the gaps ``Δg_i = gs_i − gt_i``:

- ``"per_sample_mean"`` (default, batch-size invariant): ``mean_i ‖Δg_i‖₂``.
- ``"batch_frobenius"`` (the authors' scaling): ``(1/B)·‖Gs − Gt‖_F`` where ``G`` holds the
  gradients of the batch-MEAN CE, ``G = g / B``; i.e. ``(1/B²)·sqrt(Σ_i ‖Δg_i‖²)``. This
  reproduces RulinShao/AdversariallyRobustDistillation ``main.py``,
  ``gama = 1000 / B; gama * (s_grad - t_grad).norm(2)``, with ``iga_weight=1000``.

Conversion: if every per-sample gap has norm d, ``per_sample_mean = d`` and
``batch_frobenius = d / B^1.5``, so the authors' γ corresponds to ``λ_mean ≈ γ / B^1.5``
(γ = 1000, B = 125: λ_mean ≈ 0.716). The paper writes λIGA = c/B. The zero-gap case has a
finite (zero) gradient: the square root is guarded, not shifted by an epsilon.

Two facts about that ``main.py`` (as stored): it detaches the student's input gradient
(``torch.autograd.grad(..., create_graph=True)[0].clone().detach()``), so its IGA term, as
written, sends no gradient to the student; and it uses ``nn.KLDivLoss()`` with the default
reduction (mean over all B·N elements, i.e. batchmean / N) rather than ``batchmean``. Here the
student gradient keeps its graph (double backprop) and the KL is ``batchmean``.

Cost and modes
--------------
KDIGA computes ONE student forward at x and reuses its logits for CE, KL and gs
(``create_graph=True``); the teacher's logits and input gradient come from one forward and one
backward w.r.t. x only, parameters frozen (:func:`teacher_signals`), or from a cache
(``teacher_out``). ``student_grad_mode="train"`` (default, the authors' choice) takes gs from
that train-mode forward; train-mode BatchNorm then ties the samples of a batch together.
``student_grad_mode="eval"`` takes gs from a separate eval-mode forward (what an attacker
sees): one more student forward plus its double backward, roughly doubling the student's cost.
That eval-mode forward runs AFTER every train-mode forward of the step: BatchNorm's running
stats are updated in place without bumping autograd's version counter (pytorch issue 13402),
so an eval-mode graph built before a train-mode forward would backpropagate through stale
statistics silently. For the same reason the inner PGD of the adversarial methods runs (and
is fully consumed) before any train-mode forward. The teacher always runs in eval mode; the
student forward runs under :func:`kdiga.utils.math_attention` whenever the IGA term is on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiga.attacks import pgd
from kdiga.loss_config import IGA_REDUCTIONS, LossConfig, MethodEntry, check_choice
from kdiga.utils import eval_mode, math_attention

logger = logging.getLogger(__name__)


@dataclass
class TeacherSignals:
    """The teacher's outputs at x, detached: ``logits`` [B, N] and ``input_grad`` [B, C, H, W].

    ``input_grad`` is the gradient of the SUMMED cross-entropy w.r.t. x, i.e. row i is the
    per-sample gradient ∇_{x_i} CE(ft(x_i), y_i) (paper eq. 5, gt).
    """

    logits: Tensor
    input_grad: Tensor


@contextlib.contextmanager
def _frozen_params(module: nn.Module) -> Iterator[None]:
    """Set ``requires_grad=False`` on the module's parameters; restore each flag afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def teacher_signals(teacher: nn.Module, x: Tensor, y: Tensor) -> TeacherSignals:
    """Teacher logits [B, N] and per-sample input gradients [B, C, H, W] at x (eq. 5, gt).

    One forward and one backward w.r.t. x only: the teacher is in eval mode and its parameters
    are frozen for the call (modes and ``requires_grad`` flags restored), so no parameter
    gradient is computed or accumulated.
    """
    _check_batch(x, y)
    x_in = x.detach().requires_grad_(True)
    with eval_mode(teacher), _frozen_params(teacher), torch.enable_grad():
        logits = teacher(x_in)
        ce_sum = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(ce_sum, x_in)
    return TeacherSignals(logits=logits.detach(), input_grad=grad.detach())


def _safe_l2(sq: Tensor) -> Tensor:
    """sqrt(sq) for sq >= 0 with a zero (not NaN) gradient where sq == 0; value unchanged."""
    pos = sq > 0
    return torch.where(
        pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq)
    )


def iga_term(gs: Tensor, gt: Tensor, reduction: str = "per_sample_mean") -> Tensor:
    """Input-gradient alignment term of eq. 5, a scalar, from per-sample gradients [B, ...].

    ``gs``/``gt``: student/teacher gradients of the SUMMED CE w.r.t. x (row i = ∇_{x_i}).
    ``reduction``: ``"per_sample_mean"`` -> mean_i ‖gs_i − gt_i‖₂ (batch-size invariant);
    ``"batch_frobenius"`` -> (1/B²)·sqrt(Σ_i ‖gs_i − gt_i‖²), the authors' (1/B)·‖Gs − Gt‖_F
    with G the gradients of the batch-mean CE. See the module docstring for the conversion.
    """
    check_choice("reduction", reduction, IGA_REDUCTIONS)
    if gs.shape != gt.shape or gs.dim() < 1 or gs.shape[0] == 0:
        raise ValueError(
            f"gs and gt must be per-sample gradients of one non-empty shape [B, ...], "
            f"got {tuple(gs.shape)} and {tuple(gt.shape)}"
        )
    diff = (gs - gt.to(gs.dtype)).reshape(gs.shape[0], -1)
    sq = (diff * diff).sum(dim=1)
    if reduction == "per_sample_mean":
        return _safe_l2(sq).mean()
    batch = gs.shape[0]
    return _safe_l2(sq.sum()) / batch**2


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), ``batchmean`` (eq. 1); logits [B, N] -> scalar."""
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits.to(log_ps.dtype) / temperature, dim=1)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def _per_sample_kl(
    ref_log_probs: Tensor, temperature: float = 1.0
) -> Callable[[Tensor, Tensor], Tensor]:
    """loss_fn(logits, y) -> [B] KL(p_ref ‖ softmax(logits/T)), for the inner maximisation of
    TRADES (p_ref the model's clean prediction) and RSLAD (the teacher's soft labels at x)."""

    def loss_fn(logits: Tensor, _y: Tensor) -> Tensor:
        log_p = F.log_softmax(logits / temperature, dim=1)
        return (ref_log_probs.exp() * (ref_log_probs - log_p)).sum(dim=1)

    return loss_fn


def _check_batch(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError("x and y must be tensors: images [B, C, H, W] and labels [B]")
    if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"x must be [B, C, H, W] and y [B] with the same B > 0, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )


class DistillLoss(nn.Module):
    """Base of all losses: holds its ``method`` (the :class:`kdiga.methods.Method` entry it
    was built from, whose flags say what it needs) and its ``config``.

    ``forward(student, teacher, x, y, teacher_out=None) -> dict[str, Tensor]`` with ``"loss"``
    (scalar with grad) and detached scalar parts. The student is expected in train mode; inner
    attacks run in eval mode (handled here). ``teacher_out`` (cached :class:`TeacherSignals`
    at x) replaces the teacher call where the method needs the teacher only at x.
    """

    def __init__(self, method: MethodEntry, config: LossConfig) -> None:
        super().__init__()
        self.method = method
        self.config = config

    @property
    def requires_teacher(self) -> bool:
        return self.method.needs_teacher

    @property
    def accepts_teacher_cache(self) -> bool:
        """Cached teacher signals at the clean x can replace the teacher call."""
        return self.method.cacheable

    def config_dict(self) -> dict[str, Any]:
        """The settings this method uses, e.g. for run metadata."""
        return {k: getattr(self.config, k) for k in self.method.loss_keys}

    def extra_repr(self) -> str:
        items = [f"{k}={v!r}" for k, v in self.config_dict().items()]
        return ", ".join([f"method={self.method.name!r}", *items])

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Hear that training is at epoch ``epoch`` (0-based) of ``epochs``.

        :func:`kdiga.train.fit` calls it at the start of every epoch, a resumed run's first
        included, so a loss whose weights follow the epochs (IAD's warm-up, IGDM's ramp in
        :mod:`kdiga.losses_successors`) needs no state in the checkpoint. A no-op here.
        """

    def forward(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        x: Tensor,
        y: Tensor,
        teacher_out: TeacherSignals | None = None,
    ) -> dict[str, Tensor]:
        _check_batch(x, y)
        if (
            self.requires_teacher
            and teacher is None
            and (teacher_out is None or not self.accepts_teacher_cache)
        ):
            raise ValueError(f"method {self.method.name!r} needs a teacher (or cached teacher_out)")
        if teacher_out is not None and self.accepts_teacher_cache:
            teacher_out = self._check_cache(teacher_out, x)
        return self._compute(student, teacher, x, y, teacher_out)

    def _compute(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        x: Tensor,
        y: Tensor,
        teacher_out: TeacherSignals | None,
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def _check_cache(self, teacher_out: TeacherSignals, x: Tensor) -> TeacherSignals:
        if not isinstance(teacher_out, TeacherSignals):
            raise ValueError(f"teacher_out must be TeacherSignals, got {type(teacher_out)}")
        if teacher_out.logits.dim() != 2 or teacher_out.logits.shape[0] != x.shape[0]:
            raise ValueError(
                f"teacher_out.logits must be [B={x.shape[0]}, N], "
                f"got {tuple(teacher_out.logits.shape)}"
            )
        grad = teacher_out.input_grad
        if self.method.iga and (grad is None or grad.shape != x.shape):
            shape = None if grad is None else tuple(grad.shape)
            raise ValueError(
                f"teacher_out.input_grad must have x's shape {tuple(x.shape)}, got {shape}"
            )
        return TeacherSignals(
            logits=teacher_out.logits.detach().to(x.device),
            input_grad=None if grad is None else grad.detach().to(x.device),
        )

    def _attack(self, student: nn.Module, x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        """x + δ [B, C, H, W] by PGD on the student in eval mode (eq. 3); graphs consumed here."""
        c = self.config
        x_adv = pgd(
            student, x, y, eps=c.eps, steps=c.steps, step_size=c.step_size, norm=c.norm, **kwargs
        )
        return x_adv.detach()

    def _teacher_logits(
        self, teacher: nn.Module | None, x: Tensor, teacher_out: TeacherSignals | None
    ) -> Tensor:
        if teacher_out is not None:
            return teacher_out.logits
        with torch.no_grad(), eval_mode(teacher):
            return teacher(x).detach()


class STLoss(DistillLoss):
    """Standard training: CE(f(x), y), mean over the batch. Parts: ``ce``."""

    def _compute(self, student, teacher, x, y, teacher_out):
        ce = F.cross_entropy(student(x), y)
        return {"loss": ce, "ce": ce.detach()}


class ATLoss(DistillLoss):
    """Madry PGD-AT: CE(f(x+δ), y), δ = PGD on the model's CE. Parts: ``adv_ce``."""

    def _compute(self, student, teacher, x, y, teacher_out):
        x_adv = self._attack(student, x, y)
        adv_ce = F.cross_entropy(student(x_adv), y)
        return {"loss": adv_ce, "adv_ce": adv_ce.detach()}


class TRADESLoss(DistillLoss):
    """TRADES: CE(f(x), y) + β·KL(f(x) ‖ f(x+δ)) (batchmean), δ maximising that KL.

    As in Zhang et al.'s code, the KL is KL(softmax(f(x)) ‖ softmax(f(x+δ))) and the inner
    maximisation targets the eval-mode clean prediction. Parts: ``ce``, ``robust_kl``.
    """

    def _compute(self, student, teacher, x, y, teacher_out):
        with torch.no_grad(), eval_mode(student):
            ref = F.log_softmax(student(x), dim=1)
        x_adv = self._attack(student, x, y, loss_fn=_per_sample_kl(ref))
        logits = student(x)
        logits_adv = student(x_adv)
        ce = F.cross_entropy(logits, y)
        robust_kl = F.kl_div(
            F.log_softmax(logits_adv, dim=1),
            F.log_softmax(logits, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        loss = ce + self.config.trades_beta * robust_kl
        return {"loss": loss, "ce": ce.detach(), "robust_kl": robust_kl.detach()}


class KDLoss(DistillLoss):
    """KD (eq. 1): λCE·CE(fs(x), y) + λKL·T²·KL(ft(x)/T ‖ fs(x)/T). Parts: ``ce``, ``kl``."""

    def _compute(self, student, teacher, x, y, teacher_out):
        c = self.config
        t_logits = self._teacher_logits(teacher, x, teacher_out)
        logits = student(x)
        ce = F.cross_entropy(logits, y)
        kl = kd_kl(logits, t_logits, c.temperature)
        loss = c.ce_weight * ce + c.kl_weight * kl
        return {"loss": loss, "ce": ce.detach(), "kl": kl.detach()}


class ARDLoss(DistillLoss):
    """ARD (eq. 2, 3): λCE·CE(fs(x), y) + λKL·T²·KL(fs(x+δ)/T, ft(x)/T).

    δ = PGD on the student's CE, in eval mode, run before the train-mode forwards.
    Parts: ``ce``, ``kl``.
    """

    def _compute(self, student, teacher, x, y, teacher_out):
        c = self.config
        x_adv = self._attack(student, x, y)
        t_logits = self._teacher_logits(teacher, x, teacher_out)
        ce = F.cross_entropy(student(x), y)
        kl = kd_kl(student(x_adv), t_logits, c.temperature)
        loss = c.ce_weight * ce + c.kl_weight * kl
        return {"loss": loss, "ce": ce.detach(), "kl": kl.detach()}


class KDIGALoss(DistillLoss):
    """KDIGA and its ARD combinations (eq. 5, 6, 7; Algorithm 1). Parts: ``ce``, ``kl``, ``iga``.

    Which one is the entry's flags: no inner attack is KDIGA; an inner attack with the teacher
    at x is KDIGA-ARDC; with the teacher at x+δ, KDIGA-ARDA.

    - ``kdiga``: λCE·CE(fs(x),y) + λKL·T²·KL(fs(x)/T, ft(x)/T) + λIGA·IGA at x; one student
      forward, its logits reused for CE, KL and gs.
    - ``kdiga_ardc``: KL uses fs(x+δ) against ft(x); IGA at x (the forward at x also gives CE).
    - ``kdiga_arda``: KL(fs(x+δ)/T, ft(x+δ)/T) and IGA at x+δ (the forward at x+δ also gives
      the KL logits). The teacher is needed at x+δ, so a cached ``teacher_out`` (signals at x)
      is ignored (``accepts_teacher_cache`` is False) and the teacher is always called.

    gs is ∇x of the student's summed CE with ``create_graph=True`` (double backprop); the
    ``student_grad_mode`` and cost are described in the module docstring.
    """

    def _student_grad(self, student: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One student forward at x: (logits [B, N], gs [B, C, H, W] with graph if IGA on)."""
        x_in = x.detach().requires_grad_(True)
        create_graph = self.config.iga_weight > 0
        with torch.enable_grad(), math_attention():
            logits = student(x_in)
            ce_sum = F.cross_entropy(logits, y, reduction="sum")
            (gs,) = torch.autograd.grad(ce_sum, x_in, create_graph=create_graph, retain_graph=True)
        return logits, gs

    def _eval_grad(self, student: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """gs from an eval-mode forward; called after every train-mode forward of the step."""
        with eval_mode(student):
            return self._student_grad(student, x, y)[1]

    def _compute(self, student, teacher, x, y, teacher_out):
        c = self.config
        eval_grad = c.student_grad_mode == "eval"
        adversarial, at_adv = self.method.inner_attack, self.method.teacher_at_adversarial
        x_adv = self._attack(student, x, y) if adversarial else None
        x_iga = x_adv if at_adv else x
        if teacher_out is None or at_adv:
            teacher_out = teacher_signals(teacher, x_iga, y)
        # Train-mode forwards first; the one at x_iga also yields gs in "train" mode.
        logits_iga, gs = (
            (student(x_iga), None) if eval_grad else self._student_grad(student, x_iga, y)
        )
        if not adversarial:  # KDIGA
            logits_clean, logits_kl = logits_iga, logits_iga
        elif not at_adv:  # KDIGA-ARDC
            logits_clean, logits_kl = logits_iga, student(x_adv)
        else:  # KDIGA-ARDA
            logits_clean, logits_kl = student(x), logits_iga
        if eval_grad:
            gs = self._eval_grad(student, x_iga, y)
        ce = F.cross_entropy(logits_clean, y)
        kl = kd_kl(logits_kl, teacher_out.logits, c.temperature)
        iga = iga_term(gs, teacher_out.input_grad, c.iga_reduction)
        loss = c.ce_weight * ce + c.kl_weight * kl + c.iga_weight * iga
        return {"loss": loss, "ce": ce.detach(), "kl": kl.detach(), "iga": iga.detach()}


class RSLADLoss(DistillLoss):
    """RSLAD (Zi et al. 2021): α·T²·KL(ft(x)/T ‖ fs(x+δ)/T) + (1−α)·T²·KL(ft(x)/T ‖ fs(x)/T).

    The teacher's soft labels at the clean x are the only target (no CE term), so cached
    signals at x serve it. δ maximises the per-sample KL(ft(x)/T ‖ fs(x+δ)/T) by PGD on the
    student in eval mode, run before the train-mode forwards; it starts, as ARD's does, from
    :func:`kdiga.attacks.pgd`'s random point in the ball (the authors' code starts at
    x + 0.001·N(0, I)). Parts: ``kl`` (at x), ``robust_kl`` (at x+δ).
    """

    def _compute(self, student, teacher, x, y, teacher_out):
        c = self.config
        t_logits = self._teacher_logits(teacher, x, teacher_out)
        soft = F.log_softmax(t_logits / c.temperature, dim=1)
        x_adv = self._attack(student, x, y, loss_fn=_per_sample_kl(soft, c.temperature))
        kl = kd_kl(student(x), t_logits, c.temperature)
        robust_kl = kd_kl(student(x_adv), t_logits, c.temperature)
        loss = c.adv_weight * robust_kl + (1 - c.adv_weight) * kl
        return {"loss": loss, "kl": kl.detach(), "robust_kl": robust_kl.detach()}
