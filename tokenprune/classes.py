"""Question classes and CLASP's class table (layer weights ``W``, temperature ``tau``, pivot
ratio ``a_c`` per class), as validated data.

A class row is either an explicit weight vector ``w_c`` of length ``L`` (``-inf`` switches a layer
off) or a named layer *strategy*, ``A`` (shallow-heavy) to ``E`` (deep-heavy), that is defined on
relative depth and so fits any encoder depth. ``alpha = softmax(tau * w_c)`` (CLASP eq. 25).

**Budget bands** ([ours], an extension of the paper, whose table has one cell per class): a class
row may hold ``bands``, each a cell of its own for the budgets up to its ``up_to``
(``R <= up_to``, above the previous band's ``up_to``); a budget above the last band, or a call
whose budgets are unknown, uses the row's own cell. Without bands the table is the paper's.
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

__all__ = ["CLASSES", "STRATEGIES", "Cell", "Band", "ClassEntry", "ClassTable", "strategy_row"]

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


class Cell(BaseModel):
    """One cell of the table: a layer weighting and a pivot ratio."""

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
    def _one_source(self) -> Cell:
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

    def as_cell(self) -> Cell:
        """The cell alone (a band or a row without its budget range or bands)."""
        return Cell(strategy=self.strategy, weights=self.weights, temperature=self.temperature,
                    pivot_ratio=self.pivot_ratio)


class Band(Cell):
    """A cell for the budgets up to ``up_to`` tokens per image (above the previous band's)."""

    up_to: int = Field(ge=1, description="the largest budget R (tokens per image) this cell serves")


class ClassEntry(Cell):
    """One class's row of the table: its own cell, and optionally cells per budget band."""

    bands: tuple[Band, ...] = Field((), description="cells for budgets up to each band's up_to, "
                                                    "in increasing order ([ours]; empty: the paper's one cell)")

    @model_validator(mode="after")
    def _bands_in_order(self) -> ClassEntry:
        edges = [b.up_to for b in self.bands]
        if edges != sorted(set(edges)):
            raise ValueError(f"bands must have strictly increasing up_to, got {edges}")
        return self

    def cell(self, budget: int | None) -> Cell:
        """The cell serving ``budget`` tokens per image (``None``: the row's own cell)."""
        if budget is not None:
            for band in self.bands:
                if budget <= band.up_to:
                    return band
        return self


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
        for c, e in self.classes.items():
            for cell in (e, *e.bands):
                if cell.weights is not None and self.num_layers is None:
                    raise ValueError(f"class '{c}' gives explicit weights, so the table needs 'num_layers'")
                n = len(cell.weights or ())
                if cell.weights is not None and n != self.num_layers:
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
            cell.weights is not None for e in self.classes.values() for cell in (e, *e.bands)
        ):
            raise ValueError(
                f"the class table has explicit weights for {self.num_layers} encoder layers, but this "
                f"encoder has {num_layers}: calibrate a table for this model (tokenprune calibrate) "
                "or use strategy rows, which fit any depth"
            )

    @property
    def has_bands(self) -> bool:
        """Whether any class holds cells per budget band."""
        return any(e.bands for e in self.classes.values())

    def band_edges(self) -> tuple[int, ...]:
        """Every band's ``up_to`` over the table, sorted: a budget at each edge (and ``None``)
        reaches every cell of the table."""
        return tuple(sorted({b.up_to for e in self.classes.values() for b in e.bands}))

    def cells(self, classes: tuple[str, ...], budgets: Tensor | None = None) -> list[Cell]:
        """Each row's cell: its class's, for its budget ``budgets[b]`` (``None``: the own cells)."""
        if budgets is None:
            return [self.classes[c] for c in classes]
        if len(budgets) != len(classes):
            raise ValueError(f"{len(budgets)} budgets for {len(classes)} rows; give one budget per row")
        return [self.classes[c].cell(int(r)) for c, r in zip(classes, budgets.tolist(), strict=True)]

    def alpha(self, classes: tuple[str, ...], num_layers: int, min_weight: float = 0.0,
              budgets: Tensor | None = None) -> Tensor:
        """Layer weights ``softmax(tau * w_c)`` per sample, ``(B, L)`` float32 (rows sum to 1);
        ``budgets`` ``(B,)``: each row's budget, which picks its band's cell.

        Weights below ``min_weight`` are set to exactly zero and the row renormalised, so those
        layers need not be computed at all.
        """
        self.check_layers(num_layers)
        cells = self.cells(classes, budgets)
        rows = {id(e): torch.softmax(e.temperature * e.row(num_layers), 0) for e in cells}  # cell -> (L,)
        alpha = torch.stack([rows[id(e)] for e in cells]) if cells else torch.zeros(0, num_layers)
        if min_weight > 0:
            keep = (alpha >= min_weight) | (alpha == alpha.amax(-1, keepdim=True))  # (B, L)
            alpha = torch.where(keep, alpha, 0.0)
            alpha = alpha / alpha.sum(-1, keepdim=True)
        return alpha  # (B, L)

    def pivot_ratio(self, classes: tuple[str, ...], budgets: Tensor | None = None) -> Tensor:
        """``a_c`` per sample, ``(B,)`` float32; ``budgets`` ``(B,)``: each row's budget, which
        picks its band's cell."""
        return torch.tensor([e.pivot_ratio for e in self.cells(classes, budgets)], dtype=torch.float32)
