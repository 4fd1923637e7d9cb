"""Shared fixtures: tiny models and data, CPU by default; GPU tests skip without a GPU."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

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
