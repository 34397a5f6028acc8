"""Pivot selection: top-K1 by saliency (CLASP eq. 35)."""

from __future__ import annotations

from torch import Tensor

from tokenprune import hookimpl, ops
from tokenprune.contract import Fused
from tokenprune.stages import Selector


class TopK(Selector):
    """``P = TopK1{phi_t}``: the ``k1`` highest scores among valid tokens, ties to the lower index."""

    def select(self, scores: Tensor, k1: Tensor, valid: Tensor, fused: Fused) -> Tensor:
        return ops.topk_mask(scores, k1, valid)  # (B, M)


@hookimpl
def register_selectors(register):
    register("top-k", TopK)
