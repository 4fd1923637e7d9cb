"""The training loop: SGD with momentum and multi-step LR, a checkpoint every epoch, resume.

``fit`` trains a student on in-memory images with any criterion of the losses contract,
``parts = criterion(student, teacher, x, y)`` returning a dict whose ``"loss"`` is
backpropagated (paper eq. 1, 2, 5, 6, 7 live in ``kdiga.losses``).

Reproducibility: the data order and the augmentation of epoch ``e`` come from generators
seeded with ``(cfg.seed, e)`` alone; the global torch RNG (PGD random starts inside losses,
dropout) is forked for the run, seeded with ``cfg.seed`` and saved in every checkpoint. A run
killed at any point and started again on the same checkpoint path ends with the same weights,
bit for bit on CPU, as one that was never interrupted.

One topic a module: ``config`` (:class:`TrainConfig`, the data's checks, :class:`BatchStream`),
``rng`` (the run's random streams), ``checkpoint`` (save, check, resume), ``steps`` (an epoch's
batches), ``epoch`` (the optimisation step and an epoch's means), ``evaluation`` (``predict``,
``evaluate``) and ``fit`` (the run).
"""

from kdiga.train.checkpoint import CHECKPOINT_FORMAT
from kdiga.train.config import BatchStream, TrainConfig, check_data
from kdiga.train.epoch import NonFiniteLossError
from kdiga.train.evaluation import evaluate, predict
from kdiga.train.fit import fit, maybe_compile_teacher

__all__ = [
    "CHECKPOINT_FORMAT",
    "BatchStream",
    "NonFiniteLossError",
    "TrainConfig",
    "check_data",
    "evaluate",
    "fit",
    "maybe_compile_teacher",
    "predict",
]
