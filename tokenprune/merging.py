"""Merged features for merge-based completions (VisionZip, PruMerge+, pooling).

A merge produces new features for some kept tokens. Published methods merge either in the
encoder's space and then project (VisionZip, PruMerge+: the merged token goes through the
projector like any other) or in the decoder's space (pooling baselines pool the projected
features). :func:`merged_features` does either and returns the ``(B, M, D)`` decoder-space
tensor that :class:`tokenprune.stages.CompletionResult` carries.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import ops
from .stages import CompletionRequest

Space = Literal["encoder", "decoder"]


def source(req: CompletionRequest, space: Space) -> Tensor:
    """The features a merge averages: ``(B, M, Dv)`` fused encoder features or ``(B, M, D)``
    decoder features."""
    return req.fused.encoder if space == "encoder" else req.fused.decoder


def merged_features(req: CompletionRequest, merged: Tensor, at: Tensor, space: Space,
                    also: Tensor | None = None) -> Tensor:
    """Decoder-space features with ``merged`` written at the ``at`` tokens, for
    :class:`~tokenprune.stages.CompletionResult`.

    Args:
        req: the completion request.
        merged: ``(B, M, Dv)`` (``space="encoder"``) or ``(B, M, D)`` merged features; only rows
            at ``at`` are read.
        at: ``(B, M)`` bool tokens that carry merged features.
        space: where ``merged`` lives. Encoder features are projected with ``tokens.project``
            (only the ``at`` rows, gathered first).
        also: ``(B, M)`` bool other tokens the completion keeps with their own features.

    Returns:
        ``(B, M, D)`` in the decoder features' dtype: ``merged`` (projected) at ``at``, the fused
        decoder features at ``also``. In encoder space the other rows are left uninitialised: the
        pipeline reads a completion's features only at the tokens it keeps, so the ``(B, M, D)``
        decoder tensor is never copied whole.
    """
    dec = req.fused.decoder  # (B, M, D)
    if space == "decoder":
        return torch.where(at.unsqueeze(-1), merged.to(dec.dtype), dec)
    project = req.tokens.project
    if project is None and merged.shape[-1] != dec.shape[-1]:
        raise ValueError(
            f"merging in encoder space needs the projector: encoder width {merged.shape[-1]} differs "
            f"from decoder width {dec.shape[-1]} and VisualTokens.project is None; pass project=..., "
            "or set the stage's space = \"decoder\""
        )
    index, ok = ops.compact(at)  # (B, K)
    rows = ops.gather_rows(merged, index)  # (B, K, Dv)
    out = rows if project is None else project(rows)  # (B, K, D)
    B, M, D = dec.shape
    full = dec.new_empty(B * M, D)  # only kept rows are ever read
    full.index_copy_(0, ops.flat_rows(index, M)[ok], out[ok].to(dec.dtype))
    if also is not None and bool(also.any()):
        own, own_ok = ops.compact(also & ~at)  # (B, A)
        full.index_copy_(0, ops.flat_rows(own, M)[own_ok], ops.gather_rows(dec, own)[own_ok])
    return full.view(B, M, D)
