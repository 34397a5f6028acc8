"""tokenprune: training-free visual-token reduction for multimodal LLMs.

CLASP (class-adaptive layer fusion + dual-stage pruning) and its alternatives are interchangeable
stage plugins; a pipeline spec picks one stage per kind.
"""

from __future__ import annotations

from . import ops
from .apply import PruningHandle, apply
from .budget import KEEP_ALL, Budget
from .call import PrunedCall, PruneRecord
from .classes import CLASSES, ClassTable
from .contract import (
    Fused,
    Provenance,
    Requirements,
    Routing,
    Selection,
    VisualTokens,
    grid_positions,
    normalize_layer,
)
from .hookspecs import hookimpl, hookspec
from .pipeline import Pipeline, resolve_budget
from .registry import Registry, RegistryError, build_registry, get_registry
from .spec import PipelineSpec, load_spec

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "KEEP_ALL",
    "CLASSES",
    "ClassTable",
    "PruneRecord",
    "PrunedCall",
    "PruningHandle",
    "apply",
    "Fused",
    "Pipeline",
    "PipelineSpec",
    "Provenance",
    "Registry",
    "RegistryError",
    "Requirements",
    "Routing",
    "Selection",
    "VisualTokens",
    "build_registry",
    "get_registry",
    "grid_positions",
    "hookimpl",
    "hookspec",
    "load_spec",
    "normalize_layer",
    "ops",
    "resolve_budget",
]
