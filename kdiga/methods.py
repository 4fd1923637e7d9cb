"""The distillation methods, one entry each: what a method needs, which settings it reads,
and how its loss is built.

Every layer that treats methods differently (the params schema, the DAG, the distill stage,
the report, the benchmarks) reads this table instead of keeping its own list. An entry
(:class:`Method`) names the method's loss class, whether it needs the teacher and where (at
x only, or at x+δ too), whether it has an inner maximisation and the IGA term, the label the
report prints, and the keys of the pipeline's ``distill`` params section it reads.
:meth:`Method.settings` turns a validated ``distill`` section into loss settings, and
:meth:`Method.build` (or :func:`build_loss` by name) builds the loss: the loss class gets
its entry and reads its flags from it, so no loss branches on a method's name.

``METHODS`` holds the entries in order (st, kd, ard, kdiga, kdiga_ardc, kdiga_arda, rslad,
adaad, iad, igdm). A new method is one :func:`register` call with its loss class.
``TEACHER_METHODS`` holds ``at`` and ``trades``, which train teachers, not students.

The table loads without torch: a built-in entry names its loss class as ``"module:Class"``,
imported when a loss is built, because the params schema and the DAG read the table on
every Snakemake call and must not pay torch's import (about 2 s) for it.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kdiga.loss_config import LossConfig

if TYPE_CHECKING:
    from kdiga.losses import DistillLoss

logger = logging.getLogger(__name__)

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
#: :class:`kdiga.loss_config.LossConfig`'s default holds (the inner attack's norm: L∞).
_DEFAULT_ONLY: dict[str, tuple[str, ...]] = {"adversarial": ("norm",)}

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_LOSS_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class Method:
    """One distillation method; validated on construction (``ValueError`` naming the field).

    ``name``: the id in params and student ids (lower case, digits, ``_``). ``label``: the
    report's name. ``description``: one line, with the paper's equation where there is one.
    ``loss``: its :class:`kdiga.losses.DistillLoss` subclass, or ``"module:Class"`` naming it
    (imported when built), built as ``loss(entry, config)``.
    ``needs_teacher``: the loss reads the teacher. ``teacher_at_adversarial``: it reads the
    teacher at x+δ, not only at the clean x. ``inner_attack``: it has an inner maximisation
    (reads ``distill.adversarial``). ``iga``: it has the IGA term (reads ``distill.iga``).
    ``param_keys``: the keys of the ``distill`` section it reads besides the training keys
    every method reads, each a key of :data:`SECTION_KWARGS`. ``extra_keys``: loss settings it
    accepts that no ``distill`` key gives (a teacher loss's TRADES β).
    """

    name: str
    label: str
    description: str
    loss: type[DistillLoss] | str
    needs_teacher: bool
    teacher_at_adversarial: bool
    inner_attack: bool
    iga: bool
    param_keys: tuple[str, ...]
    extra_keys: tuple[str, ...] = ()

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
        if isinstance(self.loss, str):
            if not _LOSS_REF.fullmatch(self.loss):
                raise ValueError(
                    f"method {self.name!r}: loss must be a DistillLoss subclass or "
                    f"'module:Class', got {self.loss!r}"
                )
        else:
            self._check_loss_class(self.loss)
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

    def _check_loss_class(self, cls: Any) -> None:
        # lazy: the method table loads without torch (pipeline.dag reads it); given a class,
        # torch is loaded already
        from kdiga.losses import DistillLoss  # noqa: PLC0415

        if not (isinstance(cls, type) and issubclass(cls, DistillLoss)):
            raise ValueError(
                f"method {self.name!r}: loss must be a kdiga.losses.DistillLoss subclass, "
                f"got {cls!r}"
            )

    @property
    def loss_class(self) -> type[DistillLoss]:
        """The loss class (imported here when the entry names it as ``"module:Class"``)."""
        if not isinstance(self.loss, str):
            return self.loss
        module, _, name = self.loss.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(
                f"method {self.name!r}: cannot load its loss {self.loss}: {exc}"
            ) from exc
        self._check_loss_class(cls)
        return cls

    def build(self, **settings: Any) -> DistillLoss:
        """The method's loss with ``settings`` (keywords of :attr:`loss_keys`; the others keep
        :class:`~kdiga.loss_config.LossConfig`'s defaults). An unknown key, a negative weight,
        a temperature <= 0 etc. raise ``ValueError``."""
        allowed = self.loss_keys
        for key in settings:
            if key not in allowed:
                raise ValueError(
                    f"unknown setting {key!r} for method {self.name!r}; allowed keys: "
                    f"{', '.join(allowed) if allowed else '(none)'}"
                )
        loss = self.loss_class(self, LossConfig(**settings))
        logger.debug("built loss %r", loss)
        return loss

    def build_from(self, distill: Mapping[str, Any]) -> DistillLoss:
        """The method's loss as a validated ``distill`` params section sets it: what a study's
        job trains with (:meth:`build` with :meth:`settings`)."""
        return self.build(**self.settings(distill))

    @property
    def cacheable(self) -> bool:
        """Cached teacher signals at the clean (augmented) input can serve it."""
        return self.needs_teacher and not self.teacher_at_adversarial

    @property
    def loss_keys(self) -> tuple[str, ...]:
        """The keywords ``build_loss`` accepts for it: those of :meth:`settings`, then the
        ones its params keys leave at their default (the inner attack's ``norm``)."""
        keys = [kw for key in self.param_keys for kw in SECTION_KWARGS[key]]
        defaults = [kw for key in self.param_keys for kw in _DEFAULT_ONLY.get(key, ())]
        return (*keys, *defaults, *self.extra_keys)

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
#: The teacher-training losses (PGD-AT, TRADES): not distillation methods, so not in METHODS.
TEACHER_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (last) and return it.

    A taken name (or ``at``/``trades``) or a non-:class:`Method` raises ``ValueError``. The
    loss reads its flags from the entry, so there is nothing else to agree on.
    """
    if not isinstance(method, Method):
        raise ValueError(f"register takes a kdiga.methods.Method, got {type(method).__name__}")
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.name in TEACHER_METHODS:
        raise ValueError(f"{method.name!r} is taken by a teacher-training loss (TEACHER_METHODS)")
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


def loss_names() -> tuple[str, ...]:
    """Every name :func:`build_loss` accepts: the registered methods, then ``at``, ``trades``."""
    return (*METHODS, *TEACHER_METHODS)


def _entry(name: str) -> Method:
    if isinstance(name, str) and name in TEACHER_METHODS:
        return TEACHER_METHODS[name]
    if isinstance(name, str) and name in METHODS:
        return METHODS[name]
    raise ValueError(f"unknown loss method {name!r}; allowed: {', '.join(loss_names())}")


def allowed_keys(name: str) -> tuple[str, ...]:
    """The settings ``build_loss(name, ...)`` accepts; ``ValueError`` for an unknown name."""
    return _entry(name).loss_keys


def build_loss(name: str, **settings: Any) -> DistillLoss:
    """The loss of method ``name`` (a registered method, or ``at`` or ``trades``) with
    ``settings``: :meth:`Method.build` of its entry."""
    return _entry(name).build(**settings)


TEACHER_METHODS["at"] = Method(
    name="at",
    label="PGD-AT",
    description="Madry PGD-AT: CE(f(x+δ), y), δ = PGD on the model's CE (trains a teacher).",
    loss="kdiga.losses:ATLoss",
    needs_teacher=False,
    teacher_at_adversarial=False,
    inner_attack=True,
    iga=False,
    param_keys=("adversarial",),
)
TEACHER_METHODS["trades"] = Method(
    name="trades",
    label="TRADES",
    description="TRADES: CE(f(x), y) + β·KL(f(x) ‖ f(x+δ)), δ maximising the KL (a teacher).",
    loss="kdiga.losses:TRADESLoss",
    needs_teacher=False,
    teacher_at_adversarial=False,
    inner_attack=True,
    iga=False,
    param_keys=("adversarial",),
    extra_keys=("trades_beta",),
)


_KD = ("ce_weight", "kl_weight", "temperature")

ST = register(
    Method(
        name="st",
        label="ST",
        description="Standard training: CE(f(x), y); no teacher.",
        loss="kdiga.losses:STLoss",
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
        loss="kdiga.losses:KDLoss",
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
        loss="kdiga.losses:ARDLoss",
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
        loss="kdiga.losses:KDIGALoss",
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
        loss="kdiga.losses:KDIGALoss",
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
        loss="kdiga.losses:KDIGALoss",
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
        loss="kdiga.losses:RSLADLoss",
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
        loss="kdiga.losses_successors:AdaADLoss",
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
        loss="kdiga.losses_successors:IADLoss",
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
        loss="kdiga.losses_successors:IGDMLoss",
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
