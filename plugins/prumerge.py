"""PruMerge+ (Shang et al., ICCV 2025), reimplemented from the paper, with an exact budget.

PruMerge keeps the tokens whose [CLS] attention is an outlier (interquartile-range rule) and
merges the pruned tokens into them by key similarity; PruMerge+ adds spatially uniform tokens so
that coverage does not depend on the outliers alone. The published method picks its own token
count (about 5.5 % + uniform extras to about 25 %); here the count is the budget: outliers first
(the highest-attention ones if there are more than the budget), then uniform extras up to the
budget. Use it with ``cls-attention`` scoring and no pivots (``fixed`` ratio 0).
"""

from __future__ import annotations

import torch
from pydantic import Field

from tokenprune import hookimpl, ops
from tokenprune.contract import Requirements, normalize_layer
from tokenprune.merging import Space, merged_features, source
from tokenprune.stages import Completion, CompletionRequest, CompletionResult


def iqr_outliers(phi: torch.Tensor, valid: torch.Tensor, whisker: float = 1.5) -> torch.Tensor:
    """``(B, M)`` bool: valid tokens with ``phi > Q3 + whisker * (Q3 - Q1)`` of their row
    (quantiles over the row's valid tokens, linear interpolation)."""
    x = phi.float().masked_fill(~valid, float("nan"))
    q1 = torch.nanquantile(x, 0.25, dim=1, keepdim=True)
    q3 = torch.nanquantile(x, 0.75, dim=1, keepdim=True)
    return valid & (phi.float() > q3 + whisker * (q3 - q1))


class PruMergePlus(Completion):
    """Outliers + uniform extras, then key-kNN merging.

    1. Outliers: pool tokens above ``Q3 + 1.5 IQR`` of ``phi`` (:func:`iqr_outliers`); at most
       ``K2``, the highest ``phi`` first.
    2. Extras: the rest of ``K2`` from the remaining pool, nearest a uniform lattice
       (:func:`tokenprune.ops.lattice_mask`).
    3. Merge: each kept token ``i`` takes its ``neighbours`` most key-similar *pruned* tokens
       ``N(i)`` (attention keys of ``key_layer``, cosine) and becomes the ``phi``-weighted mean
       ``(phi_i h_i + sum_{j in N(i)} phi_j h_j) / (phi_i + sum phi_j)``; a pruned token may
       feed several kept tokens. The merged token stays at the kept token's position.
    """

    neighbours: int = Field(32, ge=0, description="pruned tokens merged into each kept token")
    key_layer: int = Field(-2, description="encoder layer whose attention keys measure similarity")
    whisker: float = Field(1.5, gt=0, description="IQR multiple above Q3 that makes an outlier")
    space: Space = Field("encoder", description="merge encoder features then project, or decoder features")
    permutation_invariant = False  # uniform extras depend on positions

    def requirements(self, num_layers: int) -> Requirements:
        return Requirements(attention_keys=frozenset({normalize_layer(self.key_layer, num_layers)}))

    def complete(self, req: CompletionRequest) -> CompletionResult:
        pos = req.tokens.positions
        if pos is None:
            raise ValueError("completion 'prumerge+' needs token positions for its uniform extras: pass "
                             "VisualTokens(positions=(B, M, 2)); adapters supply them")
        pool, k2 = req.pool, req.k2.to(req.pool.device)
        B, M = pool.shape
        out = iqr_outliers(req.scores, req.valid, self.whisker) & pool
        n_out = torch.minimum(out.sum(1), k2)
        chosen = ops.topk_mask(req.scores, n_out, out)  # (B, M)
        chosen = chosen | ops.lattice_mask(pos, req.valid, pool & ~chosen, k2 - n_out)
        kept = chosen | req.pivots
        # key-kNN merge into every kept token
        u = ops.unit(req.tokens.key_features(self.key_layer).to(pool.device))  # (B, M, Dk)
        pruned = req.valid & ~kept
        kk = min(self.neighbours, M)
        h = source(req, self.space)  # (B, M, F)
        acc = ops.accumulation_dtype(h.dtype)
        w = req.scores.to(acc).clamp_min(0)  # (B, M) attention weights
        num = h.to(acc) * w.unsqueeze(-1)  # (B, M, F)
        den = w.clone()  # (B, M)
        if kk > 0 and bool(pruned.any()):
            sim = torch.bmm(u, u.transpose(1, 2)).float()  # (B, M, M)
            sim = sim.masked_fill(~pruned.unsqueeze(1), float("-inf"))
            top = sim.topk(kk, dim=-1)  # (B, M, kk) per token: its nearest pruned tokens
            ok = torch.isfinite(top.values)  # rows with fewer than kk pruned tokens
            nb = top.indices  # (B, M, kk)
            wn = torch.where(ok, w.gather(1, nb.flatten(1)).view(B, M, kk), 0.0)  # (B, M, kk)
            hn = ops.gather_rows(h.to(acc), nb.flatten(1)).view(B, M, kk, -1)  # (B, M, kk, F)
            num = num + (hn * wn.unsqueeze(-1)).sum(2)
            den = den + wn.sum(-1)
        mean = torch.where(den.unsqueeze(-1) > 0, num / den.clamp_min(1e-12).unsqueeze(-1), h.to(acc))
        return CompletionResult(chosen, merged_features(req, mean.to(h.dtype), chosen, self.space))


@hookimpl
def register_completions(register):
    register("prumerge+", PruMergePlus)
