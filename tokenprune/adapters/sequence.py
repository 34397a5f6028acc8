"""Batched sequence surgery: drop columns of a left-padded batch and left-pad it again."""

from __future__ import annotations

import torch
from torch import Tensor


def left_pack(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Right-align each row's kept columns, in order, in a batch as long as the longest row.

    Args:
        keep: ``(B, S)`` bool, the columns to keep.

    Returns:
        ``src`` ``(B, S')`` int64, the source column of each output slot (0 on padding), and
        ``valid`` ``(B, S')`` bool, false on the left padding. ``S' = max_b keep[b].sum()``.
    """
    B, S = keep.shape
    counts = keep.sum(1)  # (B,)
    width = int(counts.max()) if B else 0
    rank = keep.long().cumsum(1) - 1  # (B, S) rank among kept columns
    dest = rank + (width - counts).unsqueeze(1)  # (B, S)
    dest = torch.where(keep, dest, width)  # dropped columns -> a spare slot
    src = torch.zeros(B, width + 1, dtype=torch.long, device=keep.device)
    cols = torch.arange(S, device=keep.device).expand(B, S)
    src.scatter_(1, dest, cols)
    valid = torch.arange(width, device=keep.device) >= (width - counts).unsqueeze(1)  # (B, S')
    return src[:, :width].masked_fill(~valid, 0), valid


def take(x: Tensor, src: Tensor, valid: Tensor, fill: int | float, dim: int = -1) -> Tensor:
    """Gather ``x``'s sequence axis (``dim``, the last by default) at ``src``, ``fill`` on padding.

    ``x`` is ``(B, S)`` or ``(R, B, S)`` (M-RoPE rows); ``src``/``valid`` are ``(B, S')``.
    """
    if x.dim() == 2:
        return x.gather(1, src).masked_fill(~valid, fill)
    R = x.shape[0]
    idx = src.unsqueeze(0).expand(R, -1, -1)  # (R, B, S')
    return x.gather(2, idx).masked_fill(~valid.unsqueeze(0), fill)


def pad_flat(flat: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``flat`` ``(sum(counts), ...)`` into zero-padded rows ``(N, max(counts), ...)``.

    Returns the padded tensor and its ``(N, max)`` validity mask.
    """
    N = counts.shape[0]
    width = int(counts.max()) if N else 0
    starts = counts.cumsum(0) - counts  # (N,)
    local = torch.arange(width, device=flat.device)
    valid = local < counts.to(flat.device).unsqueeze(1)  # (N, W)
    index = (starts.to(flat.device).unsqueeze(1) + local).masked_fill(~valid, 0)  # (N, W)
    out = flat.index_select(0, index.flatten()).view(N, width, *flat.shape[1:])
    mask = valid.view(N, width, *([1] * (flat.dim() - 1)))
    return out.masked_fill(~mask, 0), valid
