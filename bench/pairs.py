"""Teacher -> student pairs as the step benchmarks build them (``bench.step_cost``,
``bench.gpu_check``, ``bench.loader_throughput``): the distill settings every comparison uses,
one CIFAR-shaped batch with its models and optimiser, our training step, and the student with
kdiga's converted layers turned back into PyTorch's own."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bench import common
from kdiga.losses import DistillLoss
from kdiga.methods import get_method, method_names
from kdiga.models import GroupedConv2d, build_model
from kdiga.models.batchnorm import IGABatchNorm2d

NUM_CLASSES = 10
SHAPE = (3, 32, 32)
#: The distill params section every comparison uses: KDIGA with the authors' scaling (gama =
#: 1000 / B on the gradients of the batch-mean CE) so that their formulation gives the same
#: loss value; the inner maximisation at the paper's CIFAR setting (step size 2.5 * eps /
#: steps = 2/255); the later methods at their authors' defaults. Each method's build_loss
#: settings come from the method table.
DISTILL: dict[str, Any] = {
    "ce_weight": 0.5,
    "kl_weight": 0.5,
    "temperature": 1.0,
    "iga": {"weight": 1000.0, "reduction": "batch_frobenius", "grad_mode": "train"},
    "adversarial": {"eps": 8 / 255, "steps": 10, "step_size": None},
    "rslad": {"adv_weight": 5 / 6},
    "adaad": {"alpha": 1.0},
    "iad": {"alpha": 1.0, "beta": 0.1, "warmup": 0.3, "weight_teacher": False},
    "igdm": {"weight": 1.0},
}
#: Every registered method's settings (``bench.step_cost`` item 3b times each beside KD).
METHOD_CFG: dict[str, dict[str, Any]] = {m: get_method(m).settings(DISTILL) for m in method_names()}
KD_CFG, IGA_CFG = METHOD_CFG["kd"], METHOD_CFG["kdiga"]
LR = 1e-3
#: suffix of the candidates whose student keeps nn.BatchNorm2d ("BN conversion off")
BN_OFF = "[nn.BatchNorm2d]"


@dataclass(frozen=True)
class Pair:
    """A teacher -> student size pair and the batch size it is timed at."""

    name: str
    teacher: str
    student: str
    batch: int
    teacher_kw: dict[str, Any] = field(default_factory=dict)
    student_kw: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        def one(arch: str, kw: dict[str, Any]) -> str:
            opts = ", ".join(f"{k}={v}" for k, v in kw.items())
            return f"{arch}({opts})" if opts else arch

        return f"{one(self.teacher, self.teacher_kw)} -> {one(self.student, self.student_kw)}"


@dataclass
class Setup:
    """Models, optimiser and one batch for a pair: student in train mode, teacher frozen."""

    student: nn.Module
    teacher: nn.Module
    opt: torch.optim.Optimizer
    x: Tensor
    y: Tensor
    mac_ratio: float


def build_setup(pair: Pair, dev: torch.device, seed: int = 0) -> Setup:
    """Build the pair on ``dev`` with a random CIFAR-shaped batch ``x`` [B, 3, 32, 32] in [0, 1].

    The teacher is in eval mode with its parameters frozen, as in the authors' script (so
    freezing is no part of the difference ``bench.step_cost`` item 1 measures).
    """
    torch.manual_seed(seed)
    teacher = build_model(pair.teacher, NUM_CLASSES, **pair.teacher_kw).to(dev).eval()
    student = build_model(pair.student, NUM_CLASSES, **pair.student_kw).to(dev).train()
    teacher.requires_grad_(False)
    macs = common.count_macs(teacher, SHAPE) / common.count_macs(student, SHAPE)
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(pair.batch, *SHAPE, device=dev)
    y = torch.randint(0, NUM_CLASSES, (pair.batch,), device=dev)
    return Setup(student, teacher, opt, x, y, macs)


def ours_step(loss_fn: DistillLoss, s: Setup) -> Callable[[], None]:
    """One training step with our loss: zero_grad, loss, backward, SGD step."""

    def step() -> None:
        s.opt.zero_grad(set_to_none=True)
        loss_fn(s.student, s.teacher, s.x, s.y)["loss"].backward()
        s.opt.step()

    return step


def revert_layers(model: nn.Module, cls: type[nn.Module], base: type[nn.Module]) -> int:
    """Turn ``model``'s layers of exactly type ``cls`` back into ``base`` in place (the layers
    kdiga's ``build_model`` converts: same weights, PyTorch's own derivatives); the count."""
    found = [m for m in model.modules() if type(m) is cls]
    for m in found:
        m.__class__ = base
    return len(found)


def _reverted_setup(s: Setup, cls: type[nn.Module], base: type[nn.Module]) -> Setup | None:
    """A copy of the student (same weights, own optimiser) with ``cls`` layers turned back
    into ``base``; None when it has none."""
    student = copy.deepcopy(s.student)
    if not revert_layers(student, cls, base):
        return None
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    return Setup(student, s.teacher, opt, s.x, s.y, s.mac_ratio)


def plain_convs_setup(s: Setup) -> Setup | None:
    """The student with plain ``nn.Conv2d`` for its GroupedConv2d layers (PyTorch's per-group
    double backward); None when it has none."""
    return _reverted_setup(s, GroupedConv2d, nn.Conv2d)


def native_bn_setup(s: Setup) -> Setup | None:
    """The student with plain ``nn.BatchNorm2d`` for its IGABatchNorm2d layers (PyTorch's
    generic BatchNorm double backward: "BN conversion off"); None when it has none."""
    return _reverted_setup(s, IGABatchNorm2d, nn.BatchNorm2d)
