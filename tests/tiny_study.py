"""A tiny study (digits at 8x8, one epoch, narrow models) shared by the end-to-end tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def bin_path(name: str) -> str:
    return str(BIN / name)


def env(**extra: str) -> dict:
    """The environment of a stage run: the venv first, the repo importable, CPU only."""
    out = dict(os.environ)
    out["PATH"] = f"{BIN}:{out['PATH']}"
    out["PYTHONPATH"] = str(ROOT)
    out["KDIGA_GPU_SLOTS"] = "0"  # CPU, whatever the machine has
    out.pop("KDIGA_PARAMS", None)
    out.update(extra)
    return out


TINY = {
    "seeds": [0],
    "shard": {
        "dataset": "digits",
        "root": None,
        "image_size": 8,
        "val_fraction": 0.2,
        "test_samples": 120,
        "max_per_shard": 500,
        "seed": 0,
    },
    "teachers": {
        "pgdat": {
            "source": "train",
            "arch": "small_cnn",
            "arch_kwargs": {"width": 8},
            "train": {
                "method": "at",
                "eps": 0.1,
                "steps": 2,
                "epochs": 2,
                "batch_size": 64,
                "lr": 0.05,
                "milestones": [],
                "augment": "none",
                "crop_padding": 0,
            },
        },
    },
    "students": {"small_cnn": {"arch": "small_cnn", "kwargs": {"width": 8}}},
    "distill": {
        "methods": ["st", "kd", "kdiga"],
        "epochs": 1,
        "batch_size": 64,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "milestones": [],
        "augment": "none",
        "crop_padding": 0,
        "ce_weight": 0.5,
        "kl_weight": 0.5,
        "temperature": 1.0,
        "iga": {"weight": 1.0, "reduction": "per_sample_mean", "grad_mode": "train"},
        "adversarial": {"eps": 0.1, "steps": 2, "step_size": None},
    },
    "signals": {
        "enabled": False,
        "views": 1,
        "grad_dtype": "float16",
        "schedule": "cycle",
        "batch_size": 256,
    },
    "attack": {
        "split": "test",
        "attacks": ["pgd", "autoattack"],
        "radii": [0.05, 0.1],
        "norm": "linf",
        "batch_size": 120,
        "pgd": {"steps": 3, "restarts": 1, "step_size": None},
        "autoattack": {
            "version": "custom",
            "attacks": ["apgd-ce"],
            "n_restarts": 1,
            "n_iter": 20,
            "n_target_classes": None,
        },
    },
    "bounds": {"radii": [0.1], "samples": 40, "steps": 2, "restarts": 1, "batch_size": 40},
    "report": {"figure_attack": "pgd"},
}
