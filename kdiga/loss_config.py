"""The settings of every loss (:class:`LossConfig`) and their option lists, without torch.

The method table (:mod:`kdiga.methods`) builds each loss from a :class:`LossConfig`, and the
params schema (``pipeline/params/``) checks its keys against the lists here; neither needs
torch for that, so a Snakemake dry run pays no torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from kdiga.options import NORMS

IGA_REDUCTIONS = ("per_sample_mean", "batch_frobenius")
STUDENT_GRAD_MODES = ("train", "eval")
#: LossConfig's non-negative weights, and its settings in [0, 1].
_WEIGHTS = ("ce_weight", "kl_weight", "iga_weight", "trades_beta", "iad_beta", "igdm_weight")
_UNIT_INTERVAL = ("adv_weight", "adaad_alpha", "iad_alpha", "iad_warmup")


@dataclass(frozen=True)
class LossConfig:
    """Every weight and setting of the losses, with defaults; validated on construction.

    Which keys a method accepts is its table entry's ``loss_keys`` (:mod:`kdiga.methods`);
    the others keep their defaults and are unused. ``step_size=None`` means PGD's rule
    2.5·eps/steps. ``adv_weight`` is RSLAD's α in [0, 1], the weight of its KL at x+δ. The
    ``adaad_*``, ``iad_*`` and ``igdm_*`` settings are those of :mod:`kdiga.losses_successors`
    (each described there): AdaAD's α in [0, 1]; IAD's α in [0, 1], β >= 0, warm-up fraction
    of the epochs in [0, 1] and whether the reliability also weighs the teacher's term;
    IGDM's final weight >= 0.
    """

    ce_weight: float = 0.5
    kl_weight: float = 0.5
    temperature: float = 1.0
    iga_weight: float = 1.0
    iga_reduction: str = "per_sample_mean"
    student_grad_mode: str = "train"
    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    norm: str = "linf"
    trades_beta: float = 6.0
    adv_weight: float = 5 / 6
    adaad_alpha: float = 1.0
    iad_alpha: float = 1.0
    iad_beta: float = 0.1
    iad_warmup: float = 0.3
    iad_weight_teacher: bool = False
    igdm_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in (*_WEIGHTS, *_UNIT_INTERVAL):
            _check_number(name, getattr(self, name), allow_zero=True)
        for name in _UNIT_INTERVAL:
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not isinstance(self.iad_weight_teacher, bool):
            raise ValueError(
                f"iad_weight_teacher must be True or False, got {self.iad_weight_teacher!r}"
            )
        for name in ("temperature", "eps"):
            _check_number(name, getattr(self, name), allow_zero=False)
        if self.step_size is not None:
            _check_number("step_size", self.step_size, allow_zero=False)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        check_choice("iga_reduction", self.iga_reduction, IGA_REDUCTIONS)
        check_choice("student_grad_mode", self.student_grad_mode, STUDENT_GRAD_MODES)
        check_choice("norm", self.norm, NORMS)


def _check_number(name: str, value: Any, *, allow_zero: bool) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class MethodEntry(Protocol):
    """What a loss reads of its method's entry (:class:`kdiga.methods.Method`): the flags of
    the method table, so that a loss never branches on a method's name."""

    @property
    def name(self) -> str: ...

    @property
    def needs_teacher(self) -> bool: ...

    @property
    def teacher_at_adversarial(self) -> bool: ...

    @property
    def inner_attack(self) -> bool: ...

    @property
    def iga(self) -> bool: ...

    @property
    def cacheable(self) -> bool: ...

    @property
    def loss_keys(self) -> tuple[str, ...]: ...
