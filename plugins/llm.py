"""Attention-ranked pruning inside the LLM: FastV and PyramidDrop, reimplemented from their papers.

Both rank the visual tokens by the attention the text pays them at layer ``K - 1`` and keep the
top ones from layer ``K`` on. tokenprune records that attention row inside the layer's own
kernel call (SDPA and FlashAttention keep running), only at prefill and only at ``K - 1``.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Literal

from pydantic import Field, field_validator
from torch import Tensor

from tokenprune import hookimpl, ops
from tokenprune.stages import LlmPruner, LlmRequest

Query = Literal["last", "text"]


class FastV(LlmPruner):
    """FastV (Chen et al., ECCV 2024): after layer ``K - 1``, keep the ``R`` visual tokens that the
    last token attended to most (head-averaged), drop the rest for layers ``K..``.

    The paper's setting is ``K = 2`` keeping 50 % (``budget_ratio = 0.5``); a matched budget
    is any other final count.
    """

    layer: int = Field(2, ge=1, description="K: the first decoder layer that sees the pruned sequence")
    query: Query = Field("last", description="rank by the last token's attention, or the mean over question tokens")
    reads: ClassVar[frozenset[str]] = frozenset({"attention"})

    def schedule(self, num_layers: int) -> list[int]:
        return [self.layer]

    def select(self, req: LlmRequest) -> Tensor:
        return ops.topk_mask(req.read("attention"), req.keep, req.valid)  # (N, M)


class PyramidDrop(LlmPruner):
    """PyramidDrop (Xing et al., CVPR 2025): the FastV rule at several layers, each keeping a
    share of the previous stage's tokens.

    With ``n`` layers, stage ``s`` keeps ``round(M * (R / M) ** ((s + 1) / n))`` tokens, so the
    last stage keeps the budget ``R``; the paper's ``lambda = 0.5`` at layers 8/16/24 of a
    32-layer LLM is ``budget_ratio = 0.125`` (576 -> 288 -> 144 -> 72).
    """

    layers: list[int] = Field([8, 16, 24], min_length=1, description="decoder layers K of the stages, ascending")
    query: Query = Field("last", description="rank by the last token's attention, or the mean over question tokens")
    reads: ClassVar[frozenset[str]] = frozenset({"attention"})

    @field_validator("layers")
    @classmethod
    def _ascending(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError(f"layers must be strictly ascending, got {v}")
        return v

    def schedule(self, num_layers: int) -> list[int]:
        return list(self.layers)

    def select(self, req: LlmRequest) -> Tensor:
        return ops.topk_mask(req.read("attention"), req.keep, req.valid)


@hookimpl
def register_llm_pruners(register):
    register("fastv", FastV)
    register("pyramid-drop", PyramidDrop)
