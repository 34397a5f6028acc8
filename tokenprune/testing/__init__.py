"""The conformance kit for stage authors: tokenprune's stage contract as hypothesis properties,
runnable on any registered stage, built-in or third-party.

::

    pip install "tokenprune[test]"
    pytest --tokenprune-stage divprune                 # one stage by name (KIND:NAME if ambiguous)
    pytest --tokenprune-stage my-scorer --tokenprune-stage completion:greedy

or, in a test module of the plugin's own suite::

    from tokenprune.testing import StageConformance

    class TestGreedy(StageConformance):
        stage = "completion:greedy"

The adapter kit does the same for a model family (:mod:`tokenprune.testing.adapters`)::

    pytest --tokenprune-adapter llava                       # a built-in family
    pytest --tokenprune-adapter my_family.testing:TinyMine  # a FamilyCase of your own

The stage properties are in :mod:`tokenprune.testing.conformance`, the random inputs in
:mod:`tokenprune.testing.inputs`, and the pytest plugin (loaded through the ``pytest11`` entry
point) in :mod:`tokenprune.testing.plugin`. This module imports nothing heavy, so the plugin
costs nothing in a pytest run that does not use it.
"""

from __future__ import annotations

from typing import Any

_STAGE_KIT = ("StageConformance", "stage_under_test", "properties", "run")
_ADAPTER_KIT = ("AdapterConformance", "FamilyCase", "TinyFamily", "family_case", "run_property", "ADAPTER_PROPERTIES")
__all__ = [*_STAGE_KIT, *_ADAPTER_KIT]


def __getattr__(name: str) -> Any:
    if name in _STAGE_KIT:
        from . import conformance

        return getattr(conformance, name)
    if name in _ADAPTER_KIT:
        from . import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module 'tokenprune.testing' has no attribute '{name}'")
