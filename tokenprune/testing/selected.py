"""The kit on the stages named by ``--tokenprune-stage`` (collected by the plugin only)."""

from __future__ import annotations

from tokenprune.testing.conformance import StageConformance


class TestStage(StageConformance):
    """One test per (stage, property, device); the plugin parametrises ``conformance_case`` from
    ``--tokenprune-stage``."""
