"""VisPruner's diverse tokens (Zhang et al., ICCV 2025), reimplemented from the paper.

VisPruner keeps *important* tokens by [CLS] attention (tokenprune: ``cls-attention`` scoring with
``top-k`` pivots, ``important_ratio`` = the pivot ratio) and then *diverse* tokens, found by
removing duplicates from the rest until the budget is met. This is the second half.
"""

from __future__ import annotations

from pydantic import Field

from tokenprune import hookimpl, ops
from tokenprune.stages import Completion, CompletionRequest, CompletionResult


class VisPrunerDiverse(Completion):
    """Iterative duplicate removal by bipartite matching (:func:`tokenprune.ops.bipartite_dedup`)
    over the pool's unit decoder-space features, until ``K2`` tokens remain.

    Each round splits the remaining tokens alternately into two sets and drops the
    ``per_round`` tokens of the first set that are most similar to the second.
    ``per_round`` is ours; the paper removes duplicates "progressively".
    """

    per_round: int = Field(32, ge=1, description="most tokens removed per round")
    permutation_invariant = False  # the two sets alternate in token order

    def complete(self, req: CompletionRequest) -> CompletionResult:
        return CompletionResult(ops.bipartite_dedup(req.unit, req.pool, req.k2, self.per_round))


@hookimpl
def register_completions(register):
    register("vispruner", VisPrunerDiverse)
