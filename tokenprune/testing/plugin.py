"""The pytest plugin of the conformance kit (entry point ``pytest11``: ``tokenprune``).

``--tokenprune-stage NAME`` (repeatable; ``KIND:NAME`` when several kinds share a name) runs the
kit on that registered stage: when no test paths are given, only the kit runs; with paths, the
kit runs beside them. ``--tokenprune-examples N`` sets the examples per property (default 25).
Test classes that subclass :class:`tokenprune.testing.StageConformance` get one test per
property and device.

This module imports neither torch nor hypothesis until a run asks for the kit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SELECTED = Path(__file__).with_name("selected.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tokenprune", "tokenprune stage conformance")
    group.addoption("--tokenprune-stage", action="append", default=[], metavar="[KIND:]NAME",
                    help="run tokenprune's conformance kit on this registered stage (repeatable)")
    group.addoption("--tokenprune-examples", type=int, default=None, metavar="N",
                    help="hypothesis examples per conformance property (default 25)")


def pytest_configure(config: pytest.Config) -> None:
    words = config.getoption("tokenprune_stage")
    if not words:
        return
    from .conformance import stage_under_test

    for word in words:  # a name that does not resolve stops the run before collection
        try:
            stage_under_test(word)
        except (LookupError, ValueError) as exc:
            raise pytest.UsageError(f"--tokenprune-stage {word}: {exc}") from None
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        config.args.append(str(SELECTED))
    else:  # no paths given: run the kit alone, not the folder's tests
        config.args[:] = [str(SELECTED)]


def _devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_case" not in metafunc.fixturenames:
        return
    from .conformance import properties, stage_under_test

    cls = metafunc.cls
    words = [cls.stage] if cls is not None and cls.stage else metafunc.config.getoption("tokenprune_stage")
    params = dict(getattr(cls, "params", {}) or {}) if cls is not None and cls.stage else {}
    cases, ids = [], []
    for word in words:
        try:
            sut = stage_under_test(word, params)
        except (LookupError, ValueError) as exc:
            raise pytest.UsageError(f"--tokenprune-stage {word}: {exc}") from None
        for prop in properties(sut):
            for device in _devices():
                cases.append((sut, prop, device))
                ids.append(f"{sut.id}-{prop}-{device}")
    metafunc.parametrize("conformance_case", cases, ids=ids)


@pytest.fixture
def tokenprune_examples(request: pytest.FixtureRequest) -> int | None:
    """``--tokenprune-examples``, or ``None`` for the test class's own setting."""
    return request.config.getoption("tokenprune_examples")
