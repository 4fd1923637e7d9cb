"""Attacks for evaluation and for ARD's inner maximisation: PGD, AutoAttack, radius sweeps.

All radii and inputs are in [0, 1] pixel space; normalisation lives inside the model.
"""

from kdiga.attacks.autoattack import ATTACKS as AUTOATTACK_ATTACKS
from kdiga.attacks.autoattack import VERSIONS as AUTOATTACK_VERSIONS
from kdiga.attacks.autoattack import AutoAttackResult, autoattack
from kdiga.attacks.checks import check_gradients, check_perturbation, check_sweep
from kdiga.attacks.pgd import (
    NORMS,
    canonical_norm,
    init_delta,
    perturbation_norm,
    pgd,
    project_delta,
    step_delta,
)
from kdiga.attacks.sweep import SWEEP_ATTACKS, SweepResult, robust_sweep

__all__ = [
    "AUTOATTACK_ATTACKS",
    "AUTOATTACK_VERSIONS",
    "NORMS",
    "SWEEP_ATTACKS",
    "AutoAttackResult",
    "SweepResult",
    "autoattack",
    "canonical_norm",
    "check_gradients",
    "check_perturbation",
    "check_sweep",
    "init_delta",
    "perturbation_norm",
    "pgd",
    "project_delta",
    "robust_sweep",
    "step_delta",
]
