"""Shared fixtures and hypothesis settings.

Every property test is parametrised over DEVICES: the CPU always, and ``cuda`` automatically when
a GPU is present, so the GPU runs the very same properties.
"""

from __future__ import annotations

import importlib
import os
import sys

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


#: intra-op threads per test process: the cores shared among pytest-xdist's workers (``make test``
#: runs one per core), so that workers do not oversubscribe the machine
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, THREADS))
    yield


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A temporary ``sys.path`` entry for distributions built by ``helpers.make_dist``; their
    modules (named ``tp_thirdparty*``) and any registry that saw them are forgotten afterwards."""
    from tokenprune.registry import get_registry

    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("tp_thirdparty")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    get_registry.cache_clear()  # a registry built while these distributions were installed is stale
