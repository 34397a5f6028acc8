"""DART (Wen et al., EMNLP 2025), reimplemented from the paper: keep the tokens least duplicated
with a few pivots.

- ``dart`` completion (pre-LLM): the pivots are the pipeline's (``feature-norm`` scoring with
  ``top-k``); the completion adds the pool tokens least similar to them.
- ``dart`` LLM pruner (layer 2): pivots are the tokens with the largest key norms (4 image +
  4 text tokens in the paper) at layer ``K - 1``; it needs no attention maps.

In both, each pivot in turn takes its share of the budget: the remaining tokens least
cosine-similar to it, so later pivots cannot take what earlier ones took.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from tokenprune import hookimpl, ops
from tokenprune.stages import Completion, CompletionRequest, CompletionResult, LlmPruner, LlmRequest


def least_duplicated(x: Tensor, anchors: Tensor, anchor_ok: Tensor, open_: Tensor, k: Tensor) -> Tensor:
    """DART's duplication rule, batched over rows.

    Anchor ``a`` (in column order) takes ``floor(k / A) + (a < k mod A)`` of the still-open
    tokens with the lowest cosine similarity to it (ties to the lower index), ``A`` the row's
    anchor count. The loop runs over anchor ordinals, never over tokens or rows.

    Args:
        x: ``(B, M, D)`` unit vectors of the candidates.
        anchors: ``(B, A, D)`` unit vectors of the pivots; ``anchor_ok`` ``(B, A)`` bool.
        open_: ``(B, M)`` bool candidates. k: ``(B,)`` int64 picks (``<= open_.sum(1)``).

    Returns:
        ``(B, M)`` bool with exactly ``k[b]`` picks (all from ``open_``).
    """
    B, M, _ = x.shape
    A = anchor_ok.sum(1)  # (B,)
    k = k.to(x.device)
    base = torch.div(k, A.clamp_min(1), rounding_mode="floor")
    extra = k - base * A.clamp_min(1)
    picked = torch.zeros(B, M, dtype=torch.bool, device=x.device)
    for a in range(anchors.shape[1]):
        on = anchor_ok[:, a]
        quota = torch.where(on, base + (a < extra).long(), 0)  # (B,)
        sim = torch.bmm(x, anchors[:, a].unsqueeze(-1)).squeeze(-1).float()  # (B, M)
        picked = picked | ops.topk_mask(sim, quota, open_ & ~picked, largest=False)
    return picked


class DartCompletion(Completion):
    """Pre-LLM DART: the pivots' shares of ``K2``, least duplicated with each pivot in turn
    (pivots in descending ``phi``). A row without pivots uses its highest-``phi`` pool token as the
    one pivot and keeps it [ours]."""

    def complete(self, req: CompletionRequest) -> CompletionResult:
        x, pool, k2 = req.unit, req.pool, req.k2.to(req.pool.device)
        B, M, _ = x.shape
        no_piv = ~req.pivots.any(1) & (k2 > 0)  # (B,)
        seed = ops.topk_mask(req.scores, no_piv.long(), pool)  # (B, M) virtual pivot
        anchors_mask = req.pivots | seed
        order = torch.where(anchors_mask, req.scores.float(), float("-inf"))
        P = int(anchors_mask.sum(1).max()) if B else 0
        top = order.topk(P, dim=1) if P else None
        a_idx = top.indices if P else torch.zeros(B, 0, dtype=torch.long, device=x.device)
        a_ok = torch.isfinite(top.values) if P else torch.zeros(B, 0, dtype=torch.bool, device=x.device)
        picked = least_duplicated(x, ops.gather_rows(x, a_idx), a_ok, pool & ~seed, k2 - seed.sum(1))
        return CompletionResult(picked | seed)


class DartLlm(LlmPruner):
    """In-LLM DART at layer ``K`` (paper: 2): pivots are the ``image_pivots`` visual tokens and the
    ``text_pivots`` question tokens with the largest key norms at layer ``K - 1`` (L2 over all
    heads; the released code takes the L1 norm of the rotated keys, which changes with absolute
    positions, so a padded row would pick other pivots than the same prompt alone); the image
    pivots are kept, and the rest of the budget is shared among all pivots by
    :func:`least_duplicated` over the visual tokens' hidden states after the LLM's final norm
    (as the released code compares them)."""

    layer: int = Field(2, ge=1, description="K: the first decoder layer that sees the pruned sequence")
    image_pivots: int = Field(4, ge=0, description="visual pivot tokens (kept)")
    text_pivots: int = Field(4, ge=0, description="question-text pivot tokens")
    reads: ClassVar[frozenset[str]] = frozenset({"key_norms"})

    def schedule(self, num_layers: int) -> list[int]:
        return [self.layer]

    def select(self, req: LlmRequest) -> Tensor:
        N, M, D = req.hidden.shape
        k = req.keep.to(req.hidden.device)
        n_img = torch.minimum(torch.full_like(k, self.image_pivots), k)
        img_piv = ops.topk_mask(req.key_norms, n_img, req.valid)  # (N, M)
        n_txt = torch.minimum(torch.full_like(k, self.text_pivots), req.text_valid.sum(1))
        txt_piv = ops.topk_mask(req.text_key_norms, n_txt, req.text_valid)  # (N, T)
        x = ops.unit(req.norm(req.hidden))  # (N, M, D)
        t = ops.unit(req.norm(req.text_hidden))  # (N, T, D)
        i_idx, i_ok = ops.compact(img_piv)
        t_idx, t_ok = ops.compact(txt_piv)
        anchors = torch.cat([ops.gather_rows(x, i_idx), ops.gather_rows(t, t_idx)], 1)  # (N, A, D)
        ok = torch.cat([i_ok, t_ok], 1)
        picked = least_duplicated(x, anchors, ok, req.valid & ~img_piv, k - n_img)
        # a row without any pivot (both pivot counts 0, or no text) keeps its top key norms [ours]
        bare = ~ok.any(1)
        if bool(bare.any()):
            top = ops.topk_mask(req.key_norms, torch.where(bare, k - n_img, 0), req.valid & ~img_piv)
            picked = torch.where(bare.unsqueeze(1), top, picked)
        return picked | img_piv


@hookimpl
def register_completions(register):
    register("dart", DartCompletion)


@hookimpl
def register_llm_pruners(register):
    register("dart", DartLlm)
