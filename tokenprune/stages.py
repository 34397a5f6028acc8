"""Base classes of the six stage kinds.

A stage is a small typed object: a pydantic model whose fields are its hyper-parameters (validated
with ``extra="forbid"``, so a misspelt parameter is an error) and one method that does the work.
Plugins subclass one of these and register the subclass under a name through the matching hook in
:mod:`tokenprune.hookspecs`. Stage instances are immutable and hold no per-call state.

The methods' shapes use the alphabet of :mod:`tokenprune.contract`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from .classes import ClassTable
from .contract import Fused, Requirements, Routing, VisualTokens

__all__ = [
    "Stage",
    "Router",
    "Fusion",
    "Scorer",
    "Selector",
    "Completion",
    "BudgetPolicy",
    "CompletionRequest",
    "CompletionResult",
    "STAGE_KINDS",
]


class Stage(BaseModel):
    """Common base: parameters are pydantic fields; instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    #: which hook registers this kind of stage (set on each kind's base class)
    kind: ClassVar[str] = ""
    #: whether selection by this stage commutes with permuting the tokens (no use of token order
    #: or positions beyond tie-breaking). Property tests check equivariance for these.
    permutation_invariant: ClassVar[bool] = True


class Router(Stage):
    """Maps prompt texts to question classes. Registered through ``register_routers``."""

    kind: ClassVar[str] = "router"
    #: whether :meth:`route` reads the prompt text. Adapters need a tokenizer (or explicit
    #: prompts) to recover the text only when this is true.
    reads_text: ClassVar[bool] = True

    @abstractmethod
    def route(self, prompts: Sequence[str]) -> Routing:
        """Classify ``B`` prompts.

        Args:
            prompts: the question texts, without image tokens and never with the answer.

        Returns:
            :class:`~tokenprune.contract.Routing`: one class from
            :data:`~tokenprune.classes.CLASSES` per prompt and a ``(B,)`` float32 confidence in
            ``[0, 1]``.
        """


class Fusion(Stage):
    """Fuses the encoder's per-layer features. Registered through ``register_fusions``."""

    kind: ClassVar[str] = "fusion"

    @abstractmethod
    def requirements(self, routing: Routing, table: ClassTable, num_layers: int) -> Requirements:
        """The hidden-state indices (``0..L``) :meth:`fuse` will read for this batch."""

    @abstractmethod
    def fuse(self, tokens: VisualTokens, routing: Routing, table: ClassTable) -> Fused:
        """Fuse layers and project into decoder space.

        Must not stack the ``L`` layer tensors (that costs more than the fusion); accumulate in
        place instead. Must not modify the inputs.

        Returns:
            :class:`~tokenprune.contract.Fused` with ``encoder`` ``(B, M, Dv)`` and ``decoder``
            ``(B, M, D)`` in the input dtype.
        """


class Scorer(Stage):
    """Per-token saliency ``phi``. Registered through ``register_scorers``."""

    kind: ClassVar[str] = "scorer"

    def requirements(self, num_layers: int) -> Requirements:
        """Signals :meth:`score` reads (attention layers, text embedding). Default: none."""
        return Requirements()

    @abstractmethod
    def score(self, tokens: VisualTokens, fused: Fused) -> Tensor:
        """Return ``phi`` ``(B, M)`` float32; higher = more salient. Values on padding are ignored."""


class Selector(Stage):
    """Chooses the pivots under budget ``K1``. Registered through ``register_selectors``."""

    kind: ClassVar[str] = "selector"

    @abstractmethod
    def select(self, scores: Tensor, k1: Tensor, valid: Tensor, fused: Fused) -> Tensor:
        """Pick pivots.

        Args:
            scores: ``(B, M)`` float32 ``phi``.
            k1: ``(B,)`` int64 pivots per row, ``0 <= k1[b] <= valid[b].sum()``.
            valid: ``(B, M)`` bool real tokens.
            fused: the fused features (for selectors that look at them).

        Returns:
            ``(B, M)`` bool with exactly ``k1[b]`` true entries in row ``b``, within ``valid``.
        """


@dataclass(frozen=True)
class CompletionRequest:
    """Everything a completion stage may read.

    Attributes:
        unit: ``(B, M, D)`` unit-norm decoder-space features ``u_t`` (input dtype).
        scores: ``(B, M)`` float32 saliency ``phi``.
        pivots: ``(B, M)`` bool pivots already kept.
        k2: ``(B,)`` int64 completion tokens to add per row
            (``k2[b] <= (valid & ~pivots)[b].sum()``).
        valid: ``(B, M)`` bool real tokens.
        tokens: the stage inputs (positions, sample keys, ...).
        fused: the fused features.
    """

    unit: Tensor
    scores: Tensor
    pivots: Tensor
    k2: Tensor
    valid: Tensor
    tokens: VisualTokens
    fused: Fused

    @property
    def pool(self) -> Tensor:
        """``(B, M)`` bool candidates: valid non-pivot tokens ``U = V \\ P``."""
        return self.valid & ~self.pivots


@dataclass(frozen=True)
class CompletionResult:
    """A completion stage's answer.

    Attributes:
        mask: ``(B, M)`` bool with exactly ``k2[b]`` true entries per row, within the pool.
        features: optional ``(B, M, D)`` replacement decoder-space features for kept tokens
            (merge-based methods write merged features at the kept positions), else ``None``.
    """

    mask: Tensor
    features: Tensor | None = None


class Completion(Stage):
    """Fills the remaining ``K2`` of the budget. Registered through ``register_completions``."""

    kind: ClassVar[str] = "completion"

    @abstractmethod
    def complete(self, request: CompletionRequest) -> CompletionResult:
        """Choose ``k2[b]`` tokens of row ``b`` from ``request.pool``."""


class BudgetPolicy(Stage):
    """Maps classes to pivot ratios. Registered through ``register_budget_policies``."""

    kind: ClassVar[str] = "budget_policy"

    @abstractmethod
    def pivot_ratio(self, routing: Routing, table: ClassTable) -> Tensor:
        """``a`` ``(B,)`` float32 in ``[0, 1]``; ``K1 = floor(a * R)``, ``K2 = R - K1``."""


#: kind name -> base class, in pipeline order
STAGE_KINDS: dict[str, type[Stage]] = {
    "router": Router,
    "fusion": Fusion,
    "scorer": Scorer,
    "selector": Selector,
    "completion": Completion,
    "budget_policy": BudgetPolicy,
}
