"""The pytest plugin of the conformance kit (entry point ``pytest11``: ``tokenprune``).

``--tokenprune-stage NAME`` (repeatable; ``KIND:NAME`` when several kinds share a name) runs the
stage kit on that registered stage, ``--tokenprune-adapter FAMILY`` (repeatable; a built-in
family, or ``module:Class`` of a :class:`tokenprune.testing.FamilyCase`) the adapter kit on that
family: when no test paths are given, only the kit runs; with paths, the kit runs beside them.
``--tokenprune-examples N`` sets the examples per stage property (default 25). Test classes that
subclass :class:`tokenprune.testing.StageConformance` or
:class:`tokenprune.testing.AdapterConformance` get one test per property and device.

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
    group.addoption("--tokenprune-adapter", action="append", default=[], metavar="FAMILY",
                    help="run tokenprune's adapter conformance kit on this family: a built-in one, or "
                         "module:Class of a tokenprune.testing.FamilyCase (repeatable)")
    group.addoption("--tokenprune-examples", type=int, default=None, metavar="N",
                    help="hypothesis examples per conformance property (default 25)")


def pytest_configure(config: pytest.Config) -> None:
    stages, families = config.getoption("tokenprune_stage"), config.getoption("tokenprune_adapter")
    if not stages and not families:
        return
    for word in stages:  # a name that does not resolve stops the run before collection
        _stage(word)
    for word in families:
        _family(word)
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        config.args.append(str(SELECTED))
    else:  # no paths given: run the kit alone, not the folder's tests
        config.args[:] = [str(SELECTED)]


def _stage(word: str, params: dict | None = None):
    from .conformance import stage_under_test

    try:
        return stage_under_test(word, params or {})
    except (LookupError, ValueError) as exc:
        raise pytest.UsageError(f"--tokenprune-stage {word}: {exc}") from None


def _family(word: str):
    from .adapters import family_case

    try:
        return family_case(word)
    except (LookupError, ImportError) as exc:
        raise pytest.UsageError(f"--tokenprune-adapter {word}: {exc}") from None


def _devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "adapter_case" in metafunc.fixturenames:
        _parametrize_families(metafunc)
    if "conformance_case" not in metafunc.fixturenames:
        return
    from .conformance import properties

    cls = metafunc.cls
    words = [cls.stage] if cls is not None and cls.stage else metafunc.config.getoption("tokenprune_stage")
    params = dict(getattr(cls, "params", {}) or {}) if cls is not None and cls.stage else {}
    cases, ids = [], []
    for word in words:
        sut = _stage(word, params)
        for prop in properties(sut):
            for device in _devices():
                cases.append((sut, prop, device))
                ids.append(f"{sut.id}-{prop}-{device}")
    metafunc.parametrize("conformance_case", cases, ids=ids)


def _parametrize_families(metafunc: pytest.Metafunc) -> None:
    from .adapters import ADAPTER_PROPERTIES

    cls = metafunc.cls
    own = getattr(cls, "case", None) if cls is not None else None
    chosen = [own] if own is not None else [_family(w) for w in metafunc.config.getoption("tokenprune_adapter")]
    cases = [(case, prop, device) for case in chosen for prop in ADAPTER_PROPERTIES for device in _devices()]
    metafunc.parametrize("adapter_case", cases, ids=[f"{c.family}-{p}-{d}" for c, p, d in cases])


@pytest.fixture
def tokenprune_examples(request: pytest.FixtureRequest) -> int | None:
    """``--tokenprune-examples``, or ``None`` for the test class's own setting."""
    return request.config.getoption("tokenprune_examples")
