"""Shared fixtures and hypothesis settings.

Every property test is parametrised over DEVICES: the CPU always, and ``cuda`` automatically when
a GPU is present, so the GPU runs the very same properties.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("TOKENPRUNE_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("default")


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
