"""kdiga: knowledge distillation that keeps adversarial robustness.

KDIGA (KD with input gradient alignment) adds ‖∇x CE(fs(x), y) − ∇x CE(ft(x), y)‖₂ to the
KD loss so the student learns the teacher's input gradients as well as its logits. This
package is the core: losses, attacks, bounds, models, teachers, data and the training loop.
"""

from kdiga.attacks import autoattack, pgd, robust_sweep
from kdiga.bounds import local_linearity, proposition2, table4
from kdiga.losses import TeacherSignals, build_loss, iga_term, teacher_signals
from kdiga.methods import METHODS, Method, get_method, method_names, register
from kdiga.models import build_model, list_models, load_model, save_model
from kdiga.teachers import TeacherMeta, load_teacher
from kdiga.train import TrainConfig, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Method",
    "TeacherMeta",
    "TeacherSignals",
    "TrainConfig",
    "autoattack",
    "build_loss",
    "build_model",
    "evaluate",
    "fit",
    "get_method",
    "iga_term",
    "list_models",
    "load_model",
    "load_teacher",
    "local_linearity",
    "method_names",
    "pgd",
    "proposition2",
    "register",
    "robust_sweep",
    "save_model",
    "table4",
    "teacher_signals",
]
