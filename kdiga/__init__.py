"""kdiga: knowledge distillation that keeps adversarial robustness.

KDIGA (KD with input gradient alignment) adds ‖∇x CE(fs(x), y) − ∇x CE(ft(x), y)‖₂ to the
KD loss so the student learns the teacher's input gradients as well as its logits. This
package is the core: losses, attacks, bounds, models, teachers, data and the training loop.

The names below are loaded on first use (PEP 562), so that importing one module of the
package (the method table, the model names, the file helpers) does not import torch: the
params schema and the DAG read those tables, and a Snakemake dry run pays no torch import.
"""

from __future__ import annotations

from kdiga.lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "METHODS": "kdiga.methods",
    "Method": "kdiga.methods",
    "TeacherMeta": "kdiga.teachers",
    "TeacherSignals": "kdiga.losses",
    "TrainConfig": "kdiga.train",
    "autoattack": "kdiga.attacks",
    "build_loss": "kdiga.methods",
    "build_model": "kdiga.models",
    "evaluate": "kdiga.train",
    "fit": "kdiga.train",
    "get_method": "kdiga.methods",
    "iga_term": "kdiga.losses",
    "list_models": "kdiga.models",
    "load_model": "kdiga.models",
    "load_teacher": "kdiga.teachers",
    "local_linearity": "kdiga.bounds",
    "method_names": "kdiga.methods",
    "pgd": "kdiga.attacks",
    "proposition2": "kdiga.bounds",
    "register": "kdiga.methods",
    "robust_sweep": "kdiga.attacks",
    "save_model": "kdiga.models",
    "table4": "kdiga.bounds",
    "teacher_signals": "kdiga.losses",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
