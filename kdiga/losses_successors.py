"""Adversarial distillation after ARD and RSLAD: AdaAD, IAD and IGDM, with their departures.

Each loss is a :class:`kdiga.losses.DistillLoss` registered in :mod:`kdiga.methods`. Notation:
S and T the student's and the teacher's logits, p(·) = softmax, KL(a ‖ b) = Σ_j p(a)_j ·
(log p(a)_j − log p(b)_j) per sample, averaged over the batch (``batchmean``) unless weighted
per sample; x' = x + δ the point of the inner maximisation, in the ε-ball (``distill.adversarial``:
ε, steps, step size) and in [0, 1]. Every inner maximisation is :func:`kdiga.attacks.pgd`
(random start in the ball, signed-gradient steps, projection) with the student in eval mode,
run to the end before any train-mode forward (see :mod:`kdiga.losses` on BatchNorm); the
teacher always runs in eval mode and receives no parameter gradient. Sources are named as
``owner/repo file``; where an authors' script and its paper or README differ, the entry says
which one the default follows.

AdaAD (Huang et al., CVPR 2023, "Boosting Accuracy and Robustness of Student Models via
Adaptive Adversarial Distillation"; boyellow/AdaAD ``main.py``, ``AT_helper.py``)
-----------------------------------------------------------------------------------------
Loss: ``α·KL(T(x') ‖ S(x')) + (1 − α)·KL(T(x) ‖ S(x))``, no CE, no temperature.
Inner maximisation: x' maximises Σ_i KL(T(x'_i) ‖ S(x'_i)), the point of the ball where the
two models disagree most; the gradient flows through both models (theirs:
``adaad_inner_loss``). The teacher is read at x' (and at x when α < 1): cached signals cannot
serve it.
Settings: ``distill.adaad.alpha`` = α, default 1 (``--AdaAD_alpha``'s default; the README's
CIFAR-10 command leaves it). The README's CIFAR-10 command: ε = 8/255, 10 steps of 2/255
(``main.py``'s own argparse defaults, 16/255 and 4/255, are the "larger search radius"
variant its README runs separately).
Departures:

- Random start: theirs x + 0.001·N(0, I), not clamped to [0, 1] before the first step; here
  :func:`~kdiga.attacks.pgd`'s uniform start in the ball (as for ARD and RSLAD).
- KL reduction: their CIFAR-10 branch uses ``nn.KLDivLoss()``, the mean over all B·N entries,
  i.e. ``batchmean`` / N; their CIFAR-100 branch sums and divides by B, i.e. ``batchmean``.
  Here ``batchmean`` for both (their CIFAR-10 loss is ours / 10).
- With α = 1 their script still runs the student (train mode) and the teacher at the clean x
  every step, for a training-accuracy print, so the student's BatchNorm running statistics
  also see the clean batches; here that forward is skipped when α = 1 (running statistics
  from x' only). With α < 1 both read x and x', as theirs.
- Their ``AdaAD_with_IAD1`` method (AdaAD's inner maximisation under IAD's loss) is a
  separate combination, not this loss.

IAD (Zhu et al., ICLR 2022, "Reliable Adversarial Distillation with Unreliable Teachers";
ZFancy/IAD ``IAD-I.py``, ``IAD-II.py``)
-----------------------------------------------------------------------------------------
Loss (IAD-I, built on ARD), with w_i = P_T(y_i | x'_i)^β the teacher's probability of the
true class at x' (temperature 1, detached), τ the temperature::

    α·[ mean_i (v_i·τ²·KL(T(x_i)/τ ‖ S(x'_i)/τ)) + mean_i (u_i·KL(S(x_i) ‖ S(x'_i))) ]
      + (1 − α)·CE(S(x), y)

with u_i = 1 − w_i (the introspection term) and v_i = 1 after the warm-up; during the warm-up
u_i = 0, v_i = 1 (ARD). The introspection term's gradient flows through both S(x) and S(x')
(theirs does not detach S(x)). Inner maximisation: ARD's, PGD on the student's CE.
The teacher is read at x (the KL target) and at x' (the reliability): cached signals at x
cannot serve it.
Settings (``distill.iad``): ``alpha`` = α, 1; ``beta`` = β, 0.1; ``warmup`` = 0.3, the fraction
of the run's epochs before the introspection term (theirs ``--begin 60`` of 200 epochs; here
from the 0-based epoch ⌊0.3·E + ½⌋ of E); ``weight_teacher`` = false (v_i = 1); the
temperature is ``distill.temperature`` (theirs 1). ε = 8/255, 10 steps of 2/255 (their
``config_train``).
Departures:

- The teacher's weight: their ``IAD-I.py`` (the default here) keeps the teacher's term at
  full weight; their ``IAD-II.py`` weighs it by w_i and the introspection by 1 − w_i, which is
  what the abstract's third case ("otherwise, the student only relies on its own soft
  labels") needs. ``weight_teacher: true`` gives v_i = w_i after the warm-up on this ARD base.
  IAD-II's own base, AKD², also distils a standard-trained second teacher, which a job here
  does not have: it is not provided.
- Their inner PGD runs with the student in train mode (BatchNorm on batch statistics, running
  statistics updated at every step) from a uniform start not clamped to [0, 1]; here eval mode
  and :func:`~kdiga.attacks.pgd`'s start, as ARD's.
- They forward the student at x three times a step (CE, introspection target, accuracy); here
  once, its logits reused: the same values, fewer BatchNorm running-statistics updates.

IGDM (Lee, Cho and Kim, 2024, "Indirect Gradient Matching for Adversarial Robust
Distillation", the Indirect Gradient Distillation Module; HongsinLee/saad ``igdm.py``)
-----------------------------------------------------------------------------------------
Loss, with x⁺ = x + δ and x⁻ = x − δ (δ = x' − x from AdaAD's inner maximisation)::

    KL(T(x⁺) ‖ S(x⁺)) + γ_e·KL(T(x⁺) − T(x⁻) ‖ S(x⁺) − S(x⁻)),   γ_e = γ·(e + 1)/E

the second KL between the softmaxes of the logit differences (a first-order match of the input
gradients along δ, with no double backward); e the 0-based epoch of E (``fit`` says which, see
:meth:`DistillLoss.set_epoch`; outside ``fit`` the ramp stands at its end, γ). x⁻ is not
clamped to [0, 1] (neither is theirs). The base is AdaAD's KL at x' with α = 1, as in theirs.
Settings: ``distill.igdm.weight`` = γ, 1 (their ``--igdm_alpha`` default).
Departures:

- The ramp: theirs γ·e/200 for e = 1..200, a literal 200 (their epoch count); here
  γ·(e + 1)/E, the same at E = 200.
- Their script calls ``adaad_inner_loss(..., step_size=8/255, epsilon=2/255)``: a 2/255 ball
  with 8/255 steps. Here the ball and steps are ``distill.adversarial``'s, as for AdaAD, whose
  setting IGDM builds on (ε = 8/255, step 2/255 in the CIFAR-10 preset); set eps 2/255 and
  step_size 8/255 to run theirs.
- Random start as AdaAD's above.
- Precision: theirs runs in fp32. Under ``fit``'s bf16 autocast (``amp``, on CUDA) the logits
  are rounded to bf16 (about 0.4% of a logit) before their difference is taken, which a small
  δ can make a sizeable share of S(x⁺) − S(x⁻); train with ``amp`` off to match theirs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiga.losses import DistillLoss, kd_kl
from kdiga.utils import eval_mode


def kl_rows(target_logits: Tensor, logits: Tensor, temperature: float = 1.0) -> Tensor:
    """[B] KL(softmax(target/T) ‖ softmax(logits/T)) per sample, from logits [B, N].

    Gradients flow into both arguments (detach ``target_logits`` for a fixed target).
    """
    log_q = F.log_softmax(logits / temperature, dim=1)
    log_p = F.log_softmax(target_logits.to(log_q.dtype) / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


class _Disagreement(nn.Module):
    """``x -> [S(x), T(x)]`` concatenated, [B, 2N], for an inner maximisation reading both.

    The teacher is not a registered submodule, so ``train()``/``eval()`` on this wrapper (what
    :func:`~kdiga.attacks.pgd` does) switch the student only; the teacher runs in eval mode.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        self._teacher = (teacher,)
        self.training = student.training

    def forward(self, x: Tensor) -> Tensor:
        (teacher,) = self._teacher
        with eval_mode(teacher):
            t_logits = teacher(x)
        s_logits = self.student(x)
        return torch.cat([s_logits, t_logits.to(s_logits.dtype)], dim=1)


def _disagreement(logits: Tensor, _y: Tensor) -> Tensor:
    """[B] KL(T ‖ S) from :class:`_Disagreement`'s [B, 2N] output: AdaAD's inner objective."""
    s_logits, t_logits = logits.chunk(2, dim=1)
    return kl_rows(t_logits, s_logits)


class _EpochSchedule:
    """Keeps the epoch :meth:`DistillLoss.set_epoch` reports; before any report (a loss used
    outside :func:`kdiga.train.fit`) the schedule stands at its end."""

    epoch: int | None = None
    epochs: int | None = None

    def set_epoch(self, epoch: int, epochs: int) -> None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, epochs))
        if not ints or not 0 <= epoch < epochs:
            raise ValueError(
                f"set_epoch takes a 0-based epoch and the run's epochs, ints with "
                f"0 <= epoch < epochs, got epoch={epoch!r}, epochs={epochs!r}"
            )
        self.epoch, self.epochs = epoch, epochs


class AdaADLoss(DistillLoss):
    """AdaAD: α·KL(T(x') ‖ S(x')) + (1 − α)·KL(T(x) ‖ S(x)), x' maximising KL(T(x') ‖ S(x')).

    Parts: ``robust_kl`` (at x'), and ``kl`` (at x) when α < 1. See the module docstring.
    """

    def _adaptive_point(
        self, student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor
    ) -> Tensor:
        """x' [B, C, H, W]: the point of the ball where KL(T ‖ S) is largest (AdaAD's inner
        maximisation), from eval-mode forwards consumed here."""
        return self._attack(_Disagreement(student, teacher), x, y, loss_fn=_disagreement)

    def _compute(self, student, teacher, x, y, teacher_out):
        alpha = self.config.adaad_alpha
        x_adv = self._adaptive_point(student, teacher, x, y)
        with torch.no_grad(), eval_mode(teacher):
            t_adv = teacher(x_adv)
            t_clean = teacher(x) if alpha < 1 else None
        robust_kl = kd_kl(student(x_adv), t_adv, 1.0)
        if t_clean is None:
            return {"loss": robust_kl, "robust_kl": robust_kl.detach()}
        kl = kd_kl(student(x), t_clean, 1.0)
        loss = alpha * robust_kl + (1 - alpha) * kl
        return {"loss": loss, "robust_kl": robust_kl.detach(), "kl": kl.detach()}


class IADLoss(_EpochSchedule, DistillLoss):
    """IAD-I: ARD's KL at x' against T(x), plus (1 − w)·KL(S(x) ‖ S(x')) after the warm-up,
    w = P_T(y | x')^β. Parts: ``ce``, ``kl`` (τ²·KL(T(x)/τ ‖ S(x')/τ)), ``introspection``
    (KL(S(x) ‖ S(x')), unweighted), ``reliability`` (the batch mean of w). See the module
    docstring."""

    @property
    def introspecting(self) -> bool:
        """Whether the warm-up is over (True outside :func:`kdiga.train.fit`)."""
        if self.epoch is None:
            return True
        return self.epoch >= int(self.config.iad_warmup * self.epochs + 0.5)

    def _compute(self, student, teacher, x, y, teacher_out):
        c = self.config
        x_adv = self._attack(student, x, y)
        with torch.no_grad(), eval_mode(teacher):
            t_clean, t_adv = teacher(x), teacher(x_adv)
        w = F.softmax(t_adv, dim=1).gather(1, y[:, None]).squeeze(1).pow(c.iad_beta)
        logits, logits_adv = student(x), student(x_adv)
        ce = F.cross_entropy(logits, y)
        kl = c.temperature**2 * kl_rows(t_clean, logits_adv, c.temperature)
        intro = kl_rows(logits, logits_adv)
        on = self.introspecting
        v = w if on and c.iad_weight_teacher else torch.ones_like(w)
        distill = (v * kl).mean() + ((1 - w) * intro).mean() if on else kl.mean()
        loss = c.iad_alpha * distill + (1 - c.iad_alpha) * ce
        return {
            "loss": loss,
            "ce": ce.detach(),
            "kl": kl.mean().detach(),
            "introspection": intro.mean().detach(),
            "reliability": w.mean().detach(),
        }


class IGDMLoss(_EpochSchedule, AdaADLoss):
    """IGDM on AdaAD: KL(T(x⁺) ‖ S(x⁺)) + γ·(e+1)/E·KL(T(x⁺) − T(x⁻) ‖ S(x⁺) − S(x⁻)),
    x± = x ± δ. Parts: ``robust_kl``, ``igdm`` (unweighted). See the module docstring."""

    @property
    def current_weight(self) -> float:
        """γ·(e + 1)/E at the epoch :meth:`set_epoch` reported; γ outside ``fit``."""
        if self.epoch is None:
            return self.config.igdm_weight
        return self.config.igdm_weight * (self.epoch + 1) / self.epochs

    def _compute(self, student, teacher, x, y, teacher_out):
        x_plus = self._adaptive_point(student, teacher, x, y)
        x_minus = x - (x_plus - x)
        with torch.no_grad(), eval_mode(teacher):
            t_plus, t_minus = teacher(x_plus), teacher(x_minus)
        s_plus, s_minus = student(x_plus), student(x_minus)
        robust_kl = kd_kl(s_plus, t_plus, 1.0)
        igdm = kd_kl(s_plus - s_minus, t_plus - t_minus, 1.0)
        loss = robust_kl + self.current_weight * igdm
        return {"loss": loss, "robust_kl": robust_kl.detach(), "igdm": igdm.detach()}
