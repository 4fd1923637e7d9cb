"""A tiny study (digits at 8x8, one epoch, narrow models) shared by the end-to-end tests.

Studies are expensive to build (every job is a process that imports torch), so each is
built once per test run and shared: :func:`build_once` makes it under a file lock in the
run's shared temporary folder, whichever pytest-xdist worker asks first, and a test that
changes a study works on its own :func:`copy_study` of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def bin_path(name: str) -> str:
    return str(BIN / name)


def env(**extra: str) -> dict:
    """The environment of a stage run: the venv first, the repo importable, CPU only, jobs
    handed to the fork server (pipeline.forkserver) whichever tool starts them."""
    out = dict(os.environ)
    out["PATH"] = f"{BIN}:{out['PATH']}"
    out["PYTHONPATH"] = str(ROOT)
    out["KDIGA_GPU_SLOTS"] = "0"  # CPU, whatever the machine has
    out["KDIGA_FORKSERVER"] = "1"
    out.pop("KDIGA_PARAMS", None)
    out.update(extra)
    return out


def run(cmd: list[str], cwd: Path, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd`` with the study's environment (its own code importable)."""
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env(PYTHONPATH=str(cwd), **extra),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def write_params(study: Path, params: dict) -> None:
    (study / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([sys.executable, "-m", "pipeline.dag"], study)


def new_study(path: Path, source: Path = ROOT, params: dict | None = None) -> Path:
    """A fresh git + DVC repo holding the tiny study (or ``params``) and the code of
    ``source``, built by Snakemake."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "Snakefile", path / "Snakefile")
    for code in ("pipeline", "kdiga"):  # a clone: DVC tracks the code as dependencies
        shutil.copytree(source / code, path / code, ignore=shutil.ignore_patterns("__pycache__"))
    run(["git", "init", "-q"], path)
    run(["git", "config", "user.email", "ci@example.invalid"], path)
    run(["git", "config", "user.name", "ci"], path)
    run([bin_path("dvc"), "init", "-q"], path)
    shutil.copy(ROOT / ".dvcignore", path / ".dvcignore")
    (path / ".gitignore").write_text("/data/\n/logs/\n.snakemake/\n__pycache__/\n")
    write_params(path, TINY if params is None else params)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "tiny study"], path)
    run([bin_path("snakemake"), "--cores", "2"], path)
    return path


def git_commit_all(study: Path, message: str) -> None:
    run(["git", "add", "-A"], study)
    run(["git", "commit", "-qm", message], study)


def copy_study(src: Path, dst: Path, ignore: Callable | None = None) -> Path:
    """A copy of the study ``src`` (its git and DVC repos, Snakemake's records, every file
    with its modification time), for a test that changes it."""
    shutil.copytree(src, dst, symlinks=True, ignore=ignore)
    return dst


def build_once(root: Path, name: str, build: Callable[[Path], object]) -> Path:
    """``root / name``, made by ``build(path)`` once per test run: the first pytest-xdist
    worker to ask builds it under a file lock, the others wait and then use it. A build that
    failed leaves no mark, so the next one to ask builds it again (and fails the same way)."""
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if path.exists():
                shutil.rmtree(path)
            build(path)
            done.touch()
    return path


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
