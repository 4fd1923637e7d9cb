"""The optimiser and its schedule: SGD with momentum, the learning rate multi-step."""

from __future__ import annotations

import torch
from torch import nn

from kdiga.train.config import TrainConfig


def build_optimizer(
    student: nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    """SGD over ``student``'s parameters and its MultiStepLR: the learning rate is
    ``cfg.lr * cfg.lr_gamma ** (number of cfg.milestones <= epoch)``."""
    optimizer = torch.optim.SGD(
        student.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(cfg.milestones), gamma=cfg.lr_gamma
    )
    return optimizer, scheduler
