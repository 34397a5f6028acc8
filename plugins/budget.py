"""Budget policies: class -> pivot ratio ``a`` (CLASP eq. 34: ``K1 = floor(a R)``)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from tokenprune import hookimpl
from tokenprune.classes import ClassTable
from tokenprune.contract import Routing
from tokenprune.stages import BudgetPolicy


class ClassTablePolicy(BudgetPolicy):
    """CLASP: the routed class's ``a_c`` from the pipeline's class table (the cell of the row's
    budget band, when the table has bands)."""

    def pivot_ratio(self, routing: Routing, table: ClassTable) -> Tensor:
        return table.pivot_ratio(routing.classes, routing.budgets)  # (B,)


class FixedPolicy(BudgetPolicy):
    """The same pivot ratio for every class (the non-adaptive ablation)."""

    ratio: float = Field(0.5, ge=0, le=1, description="pivot share a of the budget, in [0, 1]")

    def pivot_ratio(self, routing: Routing, table: ClassTable) -> Tensor:
        return torch.full((len(routing.classes),), self.ratio, dtype=torch.float32)


@hookimpl
def register_budget_policies(register):
    register("class-table", ClassTablePolicy)
    register("fixed", FixedPolicy)
