"""The kits on the stages named by ``--tokenprune-stage`` and the families named by
``--tokenprune-adapter`` (collected by the plugin only)."""

from __future__ import annotations

from tokenprune.testing.adapters import AdapterConformance
from tokenprune.testing.conformance import StageConformance


class TestStage(StageConformance):
    """One test per (stage, property, device); the plugin parametrises ``conformance_case`` from
    ``--tokenprune-stage``."""


class TestFamily(AdapterConformance):
    """One test per (family, property, device); the plugin parametrises ``adapter_case`` from
    ``--tokenprune-adapter``."""
