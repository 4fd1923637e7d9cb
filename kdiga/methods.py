"""The distillation methods, one entry each: what a method needs and which settings it reads.

Every layer that treats methods differently (the loss factory, the params schema, the DAG,
the distill stage, the report, the benchmarks) reads this table instead of keeping its own
list. An entry (:class:`Method`) names the method's loss class, whether it needs the teacher
and where (at x only, or at x+δ too), whether it has an inner maximisation and the IGA term,
the label the report prints, and the keys of the pipeline's ``distill`` params section it
reads; :meth:`Method.settings` turns a validated ``distill`` section into the keyword
arguments of :func:`kdiga.losses.build_loss`.

``METHODS`` holds the entries in order (st, kd, ard, kdiga, kdiga_ardc, kdiga_arda, rslad,
adaad, iad, igdm).
A new method is one :func:`register` call with its loss class; ``build_loss`` accepts it with
no other edit. ``at`` and ``trades`` train teachers, not students, and are not in this table
(:data:`kdiga.losses.TEACHER_LOSSES`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kdiga.losses import (
    TEACHER_LOSSES,
    ARDLoss,
    DistillLoss,
    KDIGALoss,
    KDLoss,
    LossConfig,
    RSLADLoss,
    STLoss,
)
from kdiga.losses_successors import AdaADLoss, IADLoss, IGDMLoss

#: For each key of the ``distill`` section a method may read: the ``build_loss`` keywords it
#: gives, each from the key's own value (``None``) or from one key of its mapping.
SECTION_KWARGS: dict[str, dict[str, str | None]] = {
    "ce_weight": {"ce_weight": None},
    "kl_weight": {"kl_weight": None},
    "temperature": {"temperature": None},
    "iga": {"iga_weight": "weight", "iga_reduction": "reduction", "student_grad_mode": "grad_mode"},
    "adversarial": {"eps": "eps", "steps": "steps", "step_size": "step_size"},
    "rslad": {"adv_weight": "adv_weight"},
    "adaad": {"adaad_alpha": "alpha"},
    "iad": {
        "iad_alpha": "alpha",
        "iad_beta": "beta",
        "iad_warmup": "warmup",
        "iad_weight_teacher": "weight_teacher",
    },
    "igdm": {"igdm_weight": "weight"},
}
#: ``build_loss`` keywords that come with a section key but that the section does not set, so
#: :class:`kdiga.losses.LossConfig`'s default holds (the inner attack's norm: L∞).
_DEFAULT_ONLY: dict[str, tuple[str, ...]] = {"adversarial": ("norm",)}

_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Method:
    """One distillation method; validated on construction (``ValueError`` naming the field).

    ``name``: the id in params and student ids (lower case, digits, ``_``). ``label``: the
    report's name. ``description``: one line, with the paper's equation where there is one.
    ``loss``: its :class:`kdiga.losses.DistillLoss` subclass, built as ``loss(name, config)``.
    ``needs_teacher``: the loss reads the teacher. ``teacher_at_adversarial``: it reads the
    teacher at x+δ, not only at the clean x. ``inner_attack``: it has an inner maximisation
    (reads ``distill.adversarial``). ``iga``: it has the IGA term (reads ``distill.iga``).
    ``param_keys``: the keys of the ``distill`` section it reads besides the training keys
    every method reads, each a key of :data:`SECTION_KWARGS`.
    """

    name: str
    label: str
    description: str
    loss: type[DistillLoss]
    needs_teacher: bool
    teacher_at_adversarial: bool
    inner_attack: bool
    iga: bool
    param_keys: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(
                f"method name must be lower case letters, digits and '_', starting with a "
                f"letter, got {self.name!r}"
            )
        for field in ("label", "description"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip() or "\n" in value:
                raise ValueError(f"method {self.name!r}: {field} must be one non-empty line")
        if not (isinstance(self.loss, type) and issubclass(self.loss, DistillLoss)):
            raise ValueError(
                f"method {self.name!r}: loss must be a kdiga.losses.DistillLoss subclass, "
                f"got {self.loss!r}"
            )
        for field in ("needs_teacher", "teacher_at_adversarial", "inner_attack", "iga"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"method {self.name!r}: {field} must be a bool")
        self._check_param_keys()
        if self.teacher_at_adversarial and not (self.needs_teacher and self.inner_attack):
            raise ValueError(
                f"method {self.name!r}: teacher_at_adversarial needs needs_teacher and inner_attack"
            )

    def _check_param_keys(self) -> None:
        keys = self.param_keys
        if not isinstance(keys, tuple) or len(set(keys)) != len(keys):
            raise ValueError(f"method {self.name!r}: param_keys must be a tuple without repeats")
        unknown = [k for k in keys if k not in SECTION_KWARGS]
        if unknown:
            raise ValueError(
                f"method {self.name!r}: unknown param_keys {unknown}; allowed: "
                f"{', '.join(SECTION_KWARGS)}"
            )
        for flag, key in (("iga", "iga"), ("inner_attack", "adversarial")):
            if getattr(self, flag) != (key in keys):
                raise ValueError(
                    f"method {self.name!r}: {flag}={getattr(self, flag)} but {key!r} is "
                    f"{'not ' if key not in keys else ''}in param_keys; they go together"
                )

    @property
    def cacheable(self) -> bool:
        """Cached teacher signals at the clean (augmented) input can serve it."""
        return self.needs_teacher and not self.teacher_at_adversarial

    @property
    def loss_keys(self) -> tuple[str, ...]:
        """The keywords ``build_loss`` accepts for it: those of :meth:`settings`, then the
        ones its params keys leave at their default (the inner attack's ``norm``)."""
        keys = [kw for key in self.param_keys for kw in SECTION_KWARGS[key]]
        return (*keys, *(kw for key in self.param_keys for kw in _DEFAULT_ONLY.get(key, ())))

    def settings(self, distill: Mapping[str, Any]) -> dict[str, Any]:
        """The ``build_loss`` keyword arguments from a validated ``distill`` params section,
        e.g. ``{"iga": {"weight": w, ...}}`` -> ``{"iga_weight": w, ...}``."""
        out: dict[str, Any] = {}
        for key in self.param_keys:
            if key not in distill:
                raise ValueError(f"the distill section has no {key!r}, which {self.name} reads")
            value = distill[key]
            for kw, sub in SECTION_KWARGS[key].items():
                if sub is None:
                    out[kw] = value
                elif isinstance(value, Mapping) and sub in value:
                    out[kw] = value[sub]
                else:
                    raise ValueError(f"distill.{key} has no {sub!r}, which {self.name} reads")
        return out


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (last) and return it.

    A taken name (or ``at``/``trades``), a non-:class:`Method`, or a loss class that disagrees
    with the entry (its ``requires_teacher`` vs ``needs_teacher``, its
    ``accepts_teacher_cache`` vs ``cacheable``) raises ``ValueError``.
    """
    if not isinstance(method, Method):
        raise ValueError(f"register takes a kdiga.methods.Method, got {type(method).__name__}")
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.name in TEACHER_LOSSES:
        raise ValueError(f"{method.name!r} is taken by a teacher-training loss (kdiga.losses)")
    probe = method.loss(method.name, LossConfig())
    for flag, attr, want in (
        ("needs_teacher", "requires_teacher", method.needs_teacher),
        ("cacheable", "accepts_teacher_cache", method.cacheable),
    ):
        if bool(getattr(probe, attr)) != want:
            raise ValueError(
                f"method {method.name!r}: {flag}={want} but {method.loss.__name__}."
                f"{attr} is {getattr(probe, attr)}"
            )
    METHODS[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove method ``name`` from :data:`METHODS` and return its entry (for tests)."""
    method = get_method(name)
    del METHODS[name]
    return method


def get_method(name: str) -> Method:
    """The entry of ``name``; an unknown name raises ``ValueError`` naming the allowed ones."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def method_names() -> tuple[str, ...]:
    """The registered method names, in order."""
    return tuple(METHODS)


_KD = ("ce_weight", "kl_weight", "temperature")

ST = register(
    Method(
        name="st",
        label="ST",
        description="Standard training: CE(f(x), y); no teacher.",
        loss=STLoss,
        needs_teacher=False,
        teacher_at_adversarial=False,
        inner_attack=False,
        iga=False,
        param_keys=(),
    )
)
KD = register(
    Method(
        name="kd",
        label="KD",
        description="KD (eq. 1): λCE·CE(fs(x), y) + λKL·T²·KL(ft(x)/T ‖ fs(x)/T).",
        loss=KDLoss,
        needs_teacher=True,
        teacher_at_adversarial=False,
        inner_attack=False,
        iga=False,
        param_keys=_KD,
    )
)
ARD = register(
    Method(
        name="ard",
        label="ARD",
        description="ARD (eq. 2, 3): KD's KL at fs(x+δ) vs ft(x), δ = PGD on the student's CE.",
        loss=ARDLoss,
        needs_teacher=True,
        teacher_at_adversarial=False,
        inner_attack=True,
        iga=False,
        param_keys=(*_KD, "adversarial"),
    )
)
KDIGA = register(
    Method(
        name="kdiga",
        label="KDIGA",
        description="KDIGA (eq. 5, Algorithm 1): KD + λIGA·‖∇x CE(fs) − ∇x CE(ft)‖ at x.",
        loss=KDIGALoss,
        needs_teacher=True,
        teacher_at_adversarial=False,
        inner_attack=False,
        iga=True,
        param_keys=(*_KD, "iga"),
    )
)
KDIGA_ARDC = register(
    Method(
        name="kdiga_ardc",
        label="KDIGA-ARDC",
        description="KDIGA-ARDC (eq. 6): ARD's KL at fs(x+δ) vs ft(x), IGA at the clean x.",
        loss=KDIGALoss,
        needs_teacher=True,
        teacher_at_adversarial=False,
        inner_attack=True,
        iga=True,
        param_keys=(*_KD, "iga", "adversarial"),
    )
)
KDIGA_ARDA = register(
    Method(
        name="kdiga_arda",
        label="KDIGA-ARDA",
        description="KDIGA-ARDA (eq. 7): KL(fs(x+δ)/T, ft(x+δ)/T) and IGA, both at x+δ.",
        loss=KDIGALoss,
        needs_teacher=True,
        teacher_at_adversarial=True,
        inner_attack=True,
        iga=True,
        param_keys=(*_KD, "iga", "adversarial"),
    )
)
RSLAD = register(
    Method(
        name="rslad",
        label="RSLAD",
        description="RSLAD (Zi et al. 2021): α·KL(ft(x) ‖ fs(x+δ)) + (1−α)·KL(ft(x) ‖ fs(x)).",
        loss=RSLADLoss,
        needs_teacher=True,
        teacher_at_adversarial=False,
        inner_attack=True,
        iga=False,
        param_keys=("temperature", "adversarial", "rslad"),
    )
)
"""RSLAD: the teacher's clean soft labels are the only target; δ maximises the first KL.

Reads ``distill.temperature`` (1 in the paper), ``distill.adversarial`` (the paper: ε = 8/255,
step 2/255, 10 steps) and ``distill.rslad``, a mapping ``{adv_weight: 0.8333333333333334}``:
α, the weight of the KL at x+δ (5/6 in the paper).
"""
ADAAD = register(
    Method(
        name="adaad",
        label="AdaAD",
        description="AdaAD (Huang et al. 2023): α·KL(ft(x') ‖ fs(x')) + (1−α)·KL(ft(x) ‖ fs(x)), "
        "x' maximising the first KL.",
        loss=AdaADLoss,
        needs_teacher=True,
        teacher_at_adversarial=True,
        inner_attack=True,
        iga=False,
        param_keys=("adversarial", "adaad"),
    )
)
"""AdaAD: the student matches the teacher where the two disagree most in the ball.

Reads ``distill.adversarial`` (the authors' CIFAR-10 command: ε = 8/255, 10 steps of 2/255) and
``distill.adaad``, ``{alpha: 1.0}``: α, the weight of the KL at x' (1 in the authors' code).
"""
IAD = register(
    Method(
        name="iad",
        label="IAD",
        description="IAD-I (Zhu et al. 2022): ARD's KL at fs(x+δ) vs ft(x) plus "
        "(1 − P_T(y|x+δ)^β)·KL(fs(x) ‖ fs(x+δ)) after a warm-up.",
        loss=IADLoss,
        needs_teacher=True,
        teacher_at_adversarial=True,
        inner_attack=True,
        iga=False,
        param_keys=("temperature", "adversarial", "iad"),
    )
)
"""IAD: the student trusts the teacher at x+δ as far as the teacher is right there.

Reads ``distill.temperature`` (1 in the authors' code), ``distill.adversarial`` (8/255, 10
steps of 2/255) and ``distill.iad``, ``{alpha: 1.0, beta: 0.1, warmup: 0.3, weight_teacher:
false}`` (their IAD-I defaults: introspection from epoch 60 of 200). The teacher is read at x+δ
for its reliability, so cached signals cannot serve it.
"""
IGDM = register(
    Method(
        name="igdm",
        label="IGDM",
        description="IGDM (Lee et al. 2024) on AdaAD: KL(ft(x+δ) ‖ fs(x+δ)) + γ·(e+1)/E·"
        "KL(ft(x+δ)−ft(x−δ) ‖ fs(x+δ)−fs(x−δ)).",
        loss=IGDMLoss,
        needs_teacher=True,
        teacher_at_adversarial=True,
        inner_attack=True,
        iga=False,
        param_keys=("adversarial", "igdm"),
    )
)
"""IGDM: the input gradients matched through output differences along ±δ, no double backward.

Reads ``distill.adversarial`` (AdaAD's inner maximisation) and ``distill.igdm``, ``{weight:
1.0}``: γ, the IGDM term's weight at the last epoch, ramped linearly over the epochs (the
authors' ``--igdm_alpha`` default).
"""
