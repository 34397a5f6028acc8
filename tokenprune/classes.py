"""Question classes and CLASP's class table (layer weights ``W``, temperature ``tau``, pivot
ratio ``a_c`` per class), as validated data.

A class row is either an explicit weight vector ``w_c`` of length ``L`` (``-inf`` switches a layer
off) or a named layer *strategy*, ``A`` (shallow-heavy) to ``E`` (deep-heavy), that is defined on
relative depth and so fits any encoder depth. ``alpha = softmax(tau * w_c)`` (CLASP eq. 25).
"""

from __future__ import annotations

import math
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from .tomlfile import read_toml

__all__ = ["CLASSES", "STRATEGIES", "ClassEntry", "ClassTable", "strategy_row"]

#: Every router class, in a fixed order; ``general`` is the fallback.
CLASSES: tuple[str, ...] = (
    "ocr",
    "counting",
    "spatial",
    "attribute",
    "existence",
    "scene",
    "reasoning",
    "general",
)

#: Layer strategies: the relative depth ``c`` each one centres on (shallow -> deep).
STRATEGIES: dict[str, float] = {"A": 0.25, "B": 0.45, "C": 0.65, "D": 0.85, "E": 1.0}
#: Width of a strategy's bump in relative depth.
STRATEGY_WIDTH = 0.15


def strategy_row(strategy: str, num_layers: int) -> Tensor:
    """Weight row ``w`` ``(L,)`` float32 of a named strategy: ``-((l/L - c) / width)**2``."""
    depth = torch.arange(1, num_layers + 1, dtype=torch.float32) / num_layers  # (L,)
    return -(((depth - STRATEGIES[strategy]) / STRATEGY_WIDTH) ** 2)


class ClassEntry(BaseModel):
    """One class's row of the table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["A", "B", "C", "D", "E"] | None = Field(
        None, description="named layer strategy, A (shallow-heavy) .. E (deep-heavy)"
    )
    weights: tuple[float, ...] | None = Field(
        None, description="explicit layer scores w_c, one per encoder layer 1..L (-inf = off)"
    )
    temperature: float = Field(1.0, gt=0, description="tau > 0; larger = peakier layer mix")
    pivot_ratio: float = Field(ge=0, le=1, description="a_c: share of the budget given to pivots")

    @model_validator(mode="after")
    def _one_source(self) -> ClassEntry:
        if (self.strategy is None) == (self.weights is None):
            raise ValueError("give exactly one of 'strategy' (A..E) or 'weights' (a list of L scores)")
        if self.weights is not None:
            if any(math.isnan(w) or w == math.inf for w in self.weights):
                raise ValueError("weights must be finite or -inf (to switch a layer off)")
            if all(w == -math.inf for w in self.weights):
                raise ValueError("weights switch every layer off; at least one must be finite")
        return self

    def row(self, num_layers: int) -> Tensor:
        """``w_c`` as an ``(L,)`` float32 tensor."""
        if self.strategy is not None:
            return strategy_row(self.strategy, num_layers)
        return torch.tensor(self.weights, dtype=torch.float32)


class ClassTable(BaseModel):
    """Per-class layer weighting and pivot ratio.

    Attributes:
        num_layers: the encoder depth ``L`` that explicit ``weights`` rows are written for. May be
            omitted when every row uses a named strategy.
        source: where the values come from (e.g. which calibration split), shown by
            ``tokenprune spec show``.
        classes: one :class:`ClassEntry` per class in :data:`CLASSES`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_layers: int | None = Field(None, ge=1)
    source: str = ""
    classes: dict[str, ClassEntry]

    @model_validator(mode="after")
    def _complete(self) -> ClassTable:
        missing = [c for c in CLASSES if c not in self.classes]
        unknown = [c for c in self.classes if c not in CLASSES]
        if missing:
            raise ValueError(
                f"class table is missing classes {missing}; every class needs a row: {list(CLASSES)}"
            )
        if unknown:
            raise ValueError(f"class table has unknown classes {unknown}; valid classes: {list(CLASSES)}")
        explicit = {c: e for c, e in self.classes.items() if e.weights is not None}
        if explicit and self.num_layers is None:
            raise ValueError(
                f"classes {sorted(explicit)} give explicit weights, so the table needs 'num_layers'"
            )
        for c, e in explicit.items():
            n = len(e.weights or ())
            if n != self.num_layers:
                raise ValueError(f"class '{c}' has {n} layer weights but num_layers = {self.num_layers}")
        return self

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> ClassTable:
        """Read a table from a TOML file."""
        return cls.model_validate(read_toml(path, "class table file"))

    @classmethod
    def default(cls) -> ClassTable:
        """The table shipped with tokenprune (``tokenprune/data/class_table.toml``)."""
        text = resources.files("tokenprune").joinpath("data/class_table.toml").read_text()
        return cls.model_validate(tomllib.loads(text))

    # -- use ------------------------------------------------------------------------------------
    def check_layers(self, num_layers: int) -> None:
        """Raise if explicit rows were written for a different encoder depth."""
        if self.num_layers is not None and self.num_layers != num_layers and any(
            e.weights is not None for e in self.classes.values()
        ):
            raise ValueError(
                f"the class table has explicit weights for {self.num_layers} encoder layers, but this "
                f"encoder has {num_layers}: calibrate a table for this model (tokenprune calibrate) "
                "or use strategy rows, which fit any depth"
            )

    def alpha(self, classes: tuple[str, ...], num_layers: int, min_weight: float = 0.0) -> Tensor:
        """Layer weights ``softmax(tau * w_c)`` per sample, ``(B, L)`` float32 (rows sum to 1).

        Weights below ``min_weight`` are set to exactly zero and the row renormalised, so those
        layers need not be computed at all.
        """
        self.check_layers(num_layers)
        rows = {c: self.classes[c] for c in set(classes)}
        table = {
            c: torch.softmax(e.temperature * e.row(num_layers), 0) for c, e in rows.items()
        }  # class -> (L,)
        alpha = torch.stack([table[c] for c in classes]) if classes else torch.zeros(0, num_layers)
        if min_weight > 0:
            keep = (alpha >= min_weight) | (alpha == alpha.amax(-1, keepdim=True))  # (B, L)
            alpha = torch.where(keep, alpha, 0.0)
            alpha = alpha / alpha.sum(-1, keepdim=True)
        return alpha  # (B, L)

    def pivot_ratio(self, classes: tuple[str, ...]) -> Tensor:
        """``a_c`` per sample, ``(B,)`` float32."""
        return torch.tensor([self.classes[c].pivot_ratio for c in classes], dtype=torch.float32)
