"""Average pooling of the token grid (the 2x2 / 3x3 pooling baselines).

Pooling decides its own token count: one token per ``window x window`` cell of the grid
(``ceil(H/w) * ceil(W/w)``, e.g. 144 for 2x2 and 64 for 3x3 of LLaVA-1.5's 24 x 24), so the
pipeline keeps exactly that many and rejects any other budget (:meth:`fixed_budget`).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from tokenprune import hookimpl, ops
from tokenprune.contract import VisualTokens
from tokenprune.merging import Space, merged_features, source
from tokenprune.stages import Completion, CompletionRequest, CompletionResult


def windows(positions: Tensor, valid: Tensor, window: int) -> tuple[Tensor, int]:
    """``(B, M)`` int64 window id of each token (``-1`` on padding) and the id count ``W``.

    Window ``(r // w, c // w)`` gets id ``(r // w) * ceil(C / w) + c // w`` with ``C`` the widest
    row's column count, so ids are comparable across rows of one batch.
    """
    pos = positions.long()  # (B, M, 2)
    cols = int(pos[..., 1].masked_fill(~valid, 0).max()) + 1 if valid.any() else 1
    rows = int(pos[..., 0].masked_fill(~valid, 0).max()) + 1 if valid.any() else 1
    per_row = -(-cols // window)
    wid = torch.div(pos[..., 0], window, rounding_mode="floor") * per_row + torch.div(pos[..., 1], window, rounding_mode="floor")
    return wid.masked_fill(~valid, -1), (-(-rows // window)) * per_row


class Pool(Completion):
    """Average each ``window x window`` cell into one token.

    **Position rule:** the pooled token sits at the cell's first valid token in index order (its
    top-left token on a raster grid), so the LLM sees it at that token's 1-D position or M-RoPE
    row/column. Its feature is the mean of the cell's valid tokens in ``space`` (default:
    decoder space, i.e. pooling the projected features as the published baselines do).
    Use it with no pivots (``fixed`` ratio 0) and no budget.
    """

    window: int = Field(2, ge=1, description="cell side in tokens (2 = 2x2 pooling)")
    space: Space = Field("decoder", description="pool decoder features, or encoder features then project")
    permutation_invariant = False

    def _positions(self, tokens: VisualTokens) -> Tensor:
        if tokens.positions is None:
            raise ValueError("completion 'pool' needs token positions: pass VisualTokens(positions=(B, M, 2)); "
                             "adapters supply them")
        return tokens.positions

    def _cells(self, tokens: VisualTokens, valid: Tensor) -> tuple[Tensor, Tensor, int]:
        wid, W = windows(self._positions(tokens).to(valid.device), valid, self.window)  # (B, M)
        B, M = valid.shape
        first = torch.full((B, W + 1), M, dtype=torch.long, device=valid.device)
        idx = torch.arange(M, device=valid.device).expand(B, M)
        first = first.scatter_reduce(1, torch.where(valid, wid, W), idx, reduce="amin")[:, :W]  # (B, W)
        return wid, first, W

    def fixed_budget(self, tokens: VisualTokens) -> Tensor:
        _, first, _ = self._cells(tokens, tokens.valid())
        return (first < tokens.shape[1]).sum(1)  # (B,) non-empty cells

    def complete(self, req: CompletionRequest) -> CompletionResult:
        valid = req.valid
        B, M = valid.shape
        wid, first, W = self._cells(req.tokens, valid)
        rep = torch.zeros(B, M + 1, dtype=torch.bool, device=valid.device)
        rep.scatter_(1, first, True)
        rep = rep[:, :M] & valid  # (B, M) one per non-empty cell
        h = source(req, self.space)  # (B, M, F)
        F = h.shape[-1]
        acc = ops.accumulation_dtype(h.dtype)
        g = torch.where(valid, wid, W)  # (B, M)
        sums = torch.zeros(B, W + 1, F, dtype=acc, device=h.device).scatter_add_(1, g.unsqueeze(-1).expand(-1, -1, F), h.to(acc))
        cnt = torch.zeros(B, W + 1, dtype=acc, device=h.device).scatter_add_(1, g, valid.to(acc))
        mean = sums / cnt.clamp_min(1).unsqueeze(-1)  # (B, W + 1, F)
        per_token = mean.gather(1, g.unsqueeze(-1).expand(-1, -1, F))  # (B, M, F) each token's cell mean
        return CompletionResult(rep, merged_features(req, per_token.to(h.dtype), rep, self.space))


@hookimpl
def register_completions(register):
    register("pool", Pool)
