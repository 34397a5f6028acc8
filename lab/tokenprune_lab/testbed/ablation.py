"""Ablation files (``specs/ablations/*.toml``): a base spec, stage swaps, budgets, a split.

::

    name = "fusion"
    description = "which encoder layers feed selection and the LLM"
    base = "../clasp.toml"          # relative to this file
    budgets = [8, 16, 32, 64, 128, 192]
    split = "test"

    [[variant]]
    name = "class-adaptive (CLASP)"   # no swaps: the base spec itself

    [[variant]]
    name = "last layer only"
    fusion = { stage = "single-layer", layer = -1, feed = "llm" }

    [[variant]]
    name = "DivPrune"
    spec = "../variants/divprune.toml"  # a whole other spec instead of swaps

    [[variant]]
    name = "oracle router"
    oracle_router = true             # every question routed to its true class

    [[variant]]
    name = "pool 2x2"
    spec = "../methods/pool-2x2.toml"
    own_budget = true                # one run at the spec's own budget (pooling fixes its count)

A variant's other keys are spec fields (stage tables, ``class_table``) that replace the base's.
Unknown keys, unknown stages and bad parameters are errors with the variant's name in them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenprune.spec import load_spec
from tokenprune.stages import KINDS
from tokenprune.tomlfile import describe_problems, read_toml

from .evaluate import Variant
from .protocol import BUDGETS

__all__ = ["Ablation", "load_ablation"]

_SWAPPABLE = set(KINDS) | {"class_table"}


class VariantEntry(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    spec: str | None = Field(None, description="path of a whole spec to use instead of the base")
    oracle_router: bool = False
    budgets: list[int] | None = Field(None, description="this variant's budgets instead of the file's")
    own_budget: bool = Field(False, description="one run at the spec's own budget (pooling, FastV's paper ratio)")


class Ablation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    base: str
    budgets: list[int] = Field(default_factory=lambda: list(BUDGETS))
    split: str = "test"
    variant: list[VariantEntry] = Field(min_length=1)

    def variants(self, base_dir: Path) -> list[Variant]:
        base = load_spec(base_dir / self.base)
        out = []
        for v in self.variant:
            swaps: dict[str, Any] = dict(v.model_extra or {})
            unknown = set(swaps) - _SWAPPABLE
            if unknown:
                raise ValueError(f"ablation '{self.name}', variant '{v.name}': unknown keys {sorted(unknown)}; "
                                 f"a variant may set spec, oracle_router or {sorted(_SWAPPABLE)}")
            try:
                if v.spec is not None:
                    spec = load_spec(base_dir / v.spec)
                    if swaps:
                        spec = spec.replace(**swaps)
                else:
                    spec = base.replace(**swaps) if swaps else base
            except ValidationError as exc:
                msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}".removeprefix(": ") for e in exc.errors())
                raise ValueError(f"ablation '{self.name}', variant '{v.name}': {msgs}") from None
            except ValueError as exc:
                raise ValueError(f"ablation '{self.name}', variant '{v.name}': {exc}") from None
            if v.own_budget and v.budgets is not None:
                raise ValueError(f"ablation '{self.name}', variant '{v.name}': give budgets or own_budget, not both")
            own = (None,) if v.own_budget else (tuple(v.budgets) if v.budgets is not None else None)
            out.append(Variant(v.name, spec, v.oracle_router, own))
        names = [v.name for v in out]
        if len(set(names)) != len(names):
            raise ValueError(f"ablation '{self.name}': variant names must be unique, got {names}")
        return out


def load_ablation(path: str | Path) -> tuple[Ablation, list[Variant]]:
    path = Path(path)
    data = read_toml(path, "ablation file")
    try:
        abl = Ablation.model_validate(data)
    except ValidationError as exc:
        raise ValueError(describe_problems(exc, Ablation, "ablation file", path)) from None
    return abl, abl.variants(path.parent)
