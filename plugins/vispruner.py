"""VisPruner's diverse tokens (Zhang et al., ICCV 2025), reimplemented from the paper.

VisPruner keeps *important* tokens by [CLS] attention (tokenprune: ``cls-attention`` scoring with
``top-k`` pivots, ``important_ratio`` = the pivot ratio) and then *diverse* tokens, found by
removing duplicates from the rest until the budget is met. This is the second half.
"""

from __future__ import annotations

from pydantic import Field

from tokenprune import hookimpl, ops
from tokenprune.merging import Space, source
from tokenprune.stages import Completion, CompletionRequest, CompletionResult


class VisPrunerDiverse(Completion):
    """Iterative duplicate removal by bipartite matching (:func:`tokenprune.ops.bipartite_dedup`)
    until ``K2`` tokens remain.

    The remaining tokens start in descending ``phi`` (the [CLS] attention that chose the
    important tokens); each round splits them alternately into two sets and drops the
    ``per_round`` tokens of the first set most similar to the second (8 per round and cosine
    similarity of the encoder features, as in the released code).
    """

    per_round: int = Field(8, ge=1, description="most tokens removed per round")
    space: Space = Field("encoder", description="compare encoder features (as published) or decoder features")

    def complete(self, req: CompletionRequest) -> CompletionResult:
        x = ops.unit(source(req, self.space))  # (B, M, F)
        return CompletionResult(ops.bipartite_dedup(x, req.pool, req.k2, self.per_round, order_by=req.scores))


@hookimpl
def register_completions(register):
    register("vispruner", VisPrunerDiverse)
