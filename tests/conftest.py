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
    _longest_first(items)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _longest_first(items: list) -> None:
    """Order the tests so that the long chains start first on both workers.

    ``make test`` hands each xdist worker half of this list (``--dist worksteal``), and an
    idle worker takes tests from the end of the other's. The tests of the tiny study (its
    build, then the end-to-end tests on copies of it) open the first half; the other slow
    tests (the ImageNet-path study, the DDP runs) open the second; the quick tests fill both
    ends, where they are the first to move. Tests are independent, so any order is correct.
    """
    tiny = [i for i in items if "tiny_study_built" in getattr(i, "fixturenames", ())]
    taken = {id(i) for i in tiny}
    slow = [i for i in items if id(i) not in taken and i.get_closest_marker("slow")]
    taken |= {id(i) for i in slow}
    quick = [i for i in items if id(i) not in taken]
    first = max(len(items) // 2 - len(tiny), 0)
    items[:] = [*tiny, *quick[:first], *slow, *quick[first:]]


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
