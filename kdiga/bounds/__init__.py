"""Local-linearity bounds on adversarial robustness (paper section 3.3, Definition 2,
Proposition 2, Table 4).

The local linearity measure (LLM, paper eq. 10, after Qin et al. 2019) of a classifier f at
(x, y) and radius eps is

    γ(x) = max_{‖e‖ ≤ eps} |r(e)|,   r(e) = CE(f(x+e), y) − CE(f(x), y) − eᵀ∇x CE(f(x), y).

We keep the absolute value of Definition 2 (the authors' code drops it, which measures only
how far the loss rises above its tangent plane). We also restrict e to the valid image box,
x + e ∈ [0, 1]: that only shrinks the set, so the γ we report is still a lower bound of
Definition 2's maximum over the whole ball, and every point we evaluate is a real image.

Proposition 2 (paper eq. 11): for a student fs and a teacher ft and every e in the ball,

    |CE(fs(x+e), y) − CE(ft(x+e), y)| ≤ γs + γt + φ,
    φ = CE(fs(x), y) + CE(ft(x), y) + eps·‖∇x CE(fs(x), y) − ∇x CE(ft(x), y)‖_*.

Proof: write each CE at x+e as its value at x, plus eᵀg, plus its residual r(e); then
|r_s(e)| ≤ γs, |r_t(e)| ≤ γt, |CE_s(x) − CE_t(x)| ≤ CE_s(x) + CE_t(x) since CE ≥ 0, and
eᵀ(gs − gt) ≤ ‖e‖·‖gs − gt‖_* (Hölder). ‖·‖_* must be the DUAL of the ball's norm: ‖·‖₁ for
an L∞ ball, ‖·‖₂ for an L2 ball. The paper only says "a norm"; with the L2 norm under an L∞
ball the inequality is false (see tests). Table 4 reports ‖gs − gt‖₂ as a column, which we
compute as well, under its own name.

The maximum in γ is not computable; we seek it by projected ascent and keep, per sample, the
largest |r| over EVERY perturbation evaluated. Any evaluated point gives a valid lower bound of
the true maximum, so on every perturbation we evaluated the bound is a theorem, not an
estimate (`proposition2` evaluates both models on the union of both ascents and any extra
perturbations supplied). Elsewhere the bound holds only as far as γ is not underestimated:
`proposition2_violations` tests it where it could fail, at points no ascent chose (PGD
adversarial examples, random points) and at each model's ascent points against the other
model's γ.

The ascent ("adaptive", the default; its settings are one `AscentSettings`) runs from the
ball's corners ±eps·sign(∇x CE) (the FGSM points, or their L2 analogue), then from random
starts, plus any caller-given warm starts; it climbs |r| (or r, `signs`) with the attacks' own
step and projection (`kdiga.attacks`: `init_delta`, `step_delta`, `project_delta`) and a step
that starts at 2·eps (a jump to a corner of the ball) and halves, from the best point so far,
whenever a step gains nothing. A sample's run stops when its best value gained at most `tol`
(relative) over its last `patience` steps: it has converged. `LLMResult` records per sample
the steps used, whether every run converged, and γ at half the step budget. Where the ascent
falls short is not the step size but the landscape: r has several local maxima (each run
converges to one of them), so the budget buys restarts.

All inputs are images in [0, 1] with shape [B, C, H, W]; radii are in that pixel space.

Modules: `settings` (AscentSettings and the option lists, without torch), `primitives`
(input gradient, residual, gap), `ascent` (the maximisation), `llm` (Definition 2), `prop2`
(Proposition 2 and its check), `table` (Table 4, and the teacher's share of it).
"""

from __future__ import annotations

from kdiga.bounds.settings import ASCENTS, SIGNS, VIOLATION_KINDS, AscentSettings
from kdiga.lazy import lazy_exports
from kdiga.options import NORMS

#: public name -> the module that defines it. Loaded on first use (PEP 562): the params
#: schema imports `kdiga.bounds.settings`, which must not import torch.
_EXPORTS = {
    "LLMResult": "kdiga.bounds.llm",
    "local_linearity": "kdiga.bounds.llm",
    "gap": "kdiga.bounds.primitives",
    "input_gradient": "kdiga.bounds.primitives",
    "residual": "kdiga.bounds.primitives",
    "Prop2Check": "kdiga.bounds.prop2",
    "Prop2Result": "kdiga.bounds.prop2",
    "proposition2": "kdiga.bounds.prop2",
    "proposition2_violations": "kdiga.bounds.prop2",
    "TABLE4_PARTS": "kdiga.bounds.table",
    "TeacherShare": "kdiga.bounds.table",
    "llm_key": "kdiga.bounds.table",
    "load_teacher_share": "kdiga.bounds.table",
    "prop2_key": "kdiga.bounds.table",
    "sample_indices": "kdiga.bounds.table",
    "save_teacher_share": "kdiga.bounds.table",
    "table4": "kdiga.bounds.table",
    "teacher_share": "kdiga.bounds.table",
}

__all__ = [
    "ASCENTS",
    "NORMS",
    "SIGNS",
    "TABLE4_PARTS",
    "VIOLATION_KINDS",
    "AscentSettings",
    "LLMResult",
    "Prop2Check",
    "Prop2Result",
    "TeacherShare",
    "gap",
    "input_gradient",
    "llm_key",
    "load_teacher_share",
    "local_linearity",
    "prop2_key",
    "proposition2",
    "proposition2_violations",
    "residual",
    "sample_indices",
    "save_teacher_share",
    "table4",
    "teacher_share",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
