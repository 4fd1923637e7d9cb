"""The settings of the LLM's ascent, without torch: the params schema (``pipeline/params/``)
takes the bounds' defaults from :class:`AscentSettings` and loads without torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kdiga.options import NORMS

ASCENTS = ("adaptive", "fixed")
SIGNS = ("abs", "positive", "both")
DUAL = {"linf": "l1", "l2": "l2"}  # the dual norm of each ball's norm
VIOLATION_KINDS = ("ascent", "pgd_student", "pgd_teacher", "random")
#: the Proposition 2 check's points: PGD steps of each model's adversarial example, and
#: random points of the ball per sample
PGD_STEPS = 20
RANDOM_POINTS = 8


def check_eps(eps: float, name: str = "eps") -> float:
    """``eps`` as a float; ValueError unless it is a positive finite number."""
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise ValueError(f"{name} must be a positive finite float, got {eps!r:.40}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{name} must be a positive finite float, got {eps!r}")
    return float(eps)


def check_int(value: int, name: str, low: int) -> int:
    """``value``; ValueError unless it is an int >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r:.40}")
    return value


def check_tol(value: float, name: str) -> float:
    """``value`` as a float; ValueError unless it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r:.40}")
    if not (0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class AscentSettings:
    """How the LLM's maximum of |r(e)| is sought (see `kdiga.bounds.local_linearity`).

    steps: gradient steps of each run, at most; restarts: runs from the ball's own starts
    (with `corners` the FGSM corner and its opposite first, then random points; 0: warm
    starts only); step_size: None for the default of the ascent (adaptive: 2·eps, fixed:
    2.5·eps/steps); norm: the ball's (NORMS); ascent: "adaptive" (from the best point, halving
    on no gain) or "fixed" (PGD's plain step); signs: climb |r| ("abs"), r ("positive") or
    both r and −r ("both"); tol, patience: a run of a sample stops when its best gained at
    most tol·|best| over its last `patience` steps (0: never stops). The defaults are the
    converging ones (bench/llm_convergence.py measures them against a long budget) and the
    params schema's (``bounds.*``). ValueError on a bad value.
    """

    steps: int = 20
    restarts: int = 3
    step_size: float | None = None
    norm: str = "linf"
    ascent: str = "adaptive"
    signs: str = "abs"
    corners: bool = True
    tol: float = 3e-3
    patience: int = 3

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", 0)
        check_int(self.restarts, "restarts", 0)
        if self.step_size is not None:
            check_eps(self.step_size, "step_size")
        for name, allowed in (("norm", NORMS), ("ascent", ASCENTS), ("signs", SIGNS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r:.40}")
        if not isinstance(self.corners, bool):
            raise ValueError(f"corners must be a bool, got {self.corners!r:.40}")
        check_tol(self.tol, "tol")
        check_int(self.patience, "patience", 0)

    @property
    def adaptive(self) -> bool:
        return self.ascent == "adaptive"

    def at(self, eps: float) -> Ascent:
        """These settings at radius `eps`, with the step size resolved."""
        eps = check_eps(eps)
        step = self.step_size
        if step is None:
            step = 2.0 * eps if self.adaptive else 2.5 * eps / max(self.steps, 1)
        return Ascent(self, eps, float(step))


@dataclass(frozen=True)
class Ascent:
    """An ascent at one radius: its settings `cfg`, the radius `eps` and the step size."""

    cfg: AscentSettings
    eps: float
    step_size: float

    @property
    def norm(self) -> str:
        return self.cfg.norm
