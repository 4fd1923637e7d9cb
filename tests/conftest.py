"""Shared fixtures: tiny models and data, CPU by default; GPU tests skip without a GPU.

The suite runs in parallel (``make test``: pytest-xdist, one process per core), each worker
at one torch thread. The tiny study is built once per run for every worker
(``tiny_study_built``); tests that change it take their own copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from tiny_study import build_once, git_commit_all, new_study

# Each worker is one process at one thread, so workers do not fight over the cores; the
# stage processes the end-to-end tests start read KDIGA_THREADS (1 unless set).
torch.set_num_threads(1)

# CI draws the same property-test examples on every run, so a red run is reproducible and a
# green one is not luck. `KDIGA_HYPOTHESIS=explore pytest` draws fresh, more numerous ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile(
    "explore", max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None
)
settings.load_profile(os.environ.get("KDIGA_HYPOTHESIS", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    """A temporary folder shared by every xdist worker of this run (the workers' own base
    folders sit side by side in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _build_tiny_study(path: Path) -> None:
    new_study(path)
    git_commit_all(path, "results")  # as a user keeps a finished study: report and lock in git


@pytest.fixture(scope="session")
def tiny_study_built(shared_root) -> Path:
    """The tiny study as Snakemake first built it, its results committed: built once per
    run. Read it; never change it (``copy_study`` it first)."""
    return build_once(shared_root, "tiny-study", _build_tiny_study)
