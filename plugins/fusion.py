"""Layer fusion (CLASP stage 1, eqs. 25-27) and its alternatives.

All fusions accumulate in place over the layer list: the ``L`` hidden states are never stacked.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenprune import hookimpl
from tokenprune.classes import ClassTable
from tokenprune.contract import Fused, Requirements, Routing, VisualTokens, normalize_layer
from tokenprune.stages import Fusion

Feed = Literal["llm", "selection"]


def _project(tokens: VisualTokens, fused: Tensor) -> Tensor:
    """``z~ = f_proj(z-bar)``: the caller's precomputed projection, the projector, or identity."""
    if tokens.projected is not None:
        return tokens.projected
    if tokens.project is not None:
        return tokens.project(fused)
    return fused


def _weighted_sum(tokens: VisualTokens, layers: list[int], weights: Tensor) -> Tensor:
    """``sum_l w[:, l] * h_l`` over the given layers, in place, in the input dtype.

    ``weights`` is ``(B, len(layers))`` float32; returns ``(B, M, Dv)``.
    """
    ref = tokens.reference
    B = ref.shape[0]
    out = torch.zeros_like(ref)  # (B, M, Dv)
    w = weights.to(device=ref.device, dtype=ref.dtype)  # (B, n)
    for j, layer in enumerate(layers):  # loop over layers (<= L), never over tokens
        out.addcmul_(tokens.layer(layer), w[:, j].view(B, 1, 1))  # (B, M, Dv)
    return out


class ClassAdaptiveFusion(Fusion):
    """CLASP: ``alpha = softmax(tau w_c)`` from the routed class's table row, ``z-bar_t =
    sum_l alpha_l z_t^(l)``, ``z~_t = f_proj(z-bar_t)``.

    Layers whose weight is below ``min_weight`` for every row of the batch are neither requested
    from the encoder nor read ([ours]; rows are renormalised).
    """

    min_weight: float = Field(1e-3, ge=0, lt=1, description="layer weights below this are dropped")
    feed: Feed = Field("llm", description="'llm': the LLM receives the fused features (paper); "
                                          "'selection': they only steer selection")

    def _alpha(self, routing: Routing, table: ClassTable, num_layers: int) -> Tensor:
        return table.alpha(routing.classes, num_layers, self.min_weight, routing.budgets)  # (B, L)

    def requirements(self, routing: Routing, table: ClassTable, num_layers: int) -> Requirements:
        alpha = self._alpha(routing, table, num_layers)
        if routing.budgets is None and table.has_bands:  # the budgets are not known yet: every band's layers
            B = len(routing.classes)
            alpha = torch.cat([alpha, *(table.alpha(routing.classes, num_layers, self.min_weight,
                                                    torch.full((B,), edge)) for edge in table.band_edges())])
        used = (alpha > 0).any(0).nonzero().flatten() + 1  # column l-1 -> hidden state l
        return Requirements(layers=frozenset(used.tolist()))

    def fuse(self, tokens: VisualTokens, routing: Routing, table: ClassTable) -> Fused:
        L = tokens.num_layers
        alpha = self._alpha(routing, table, L)  # (B, L)
        cols = (alpha > 0).any(0).nonzero().flatten().tolist()
        fused = _weighted_sum(tokens, [c + 1 for c in cols], alpha[:, cols])  # (B, M, Dv)
        return Fused(fused, _project(tokens, fused), alpha, self.feed == "llm")


class SingleLayerFusion(Fusion):
    """One encoder layer, unchanged (LLaVA's default is -2, the penultimate layer)."""

    layer: int = Field(-2, description="hidden-state index (0 = embeddings, negative from the end)")
    feed: Feed = Field("selection", description="whether the LLM receives these features")

    def requirements(self, routing: Routing, table: ClassTable, num_layers: int) -> Requirements:
        return Requirements(layers=frozenset({normalize_layer(self.layer, num_layers)}))

    def fuse(self, tokens: VisualTokens, routing: Routing, table: ClassTable) -> Fused:
        h = tokens.layer(self.layer)  # (B, M, Dv), shared, never written to
        B = h.shape[0]
        alpha = torch.zeros(B, tokens.num_layers)
        li = normalize_layer(self.layer, tokens.num_layers)
        if li > 0:
            alpha[:, li - 1] = 1.0
        return Fused(h, _project(tokens, h), alpha if li > 0 else None, self.feed == "llm")


class MeanFusion(Fusion):
    """Uniform average of encoder layers ``first..last`` (inclusive)."""

    first: int = Field(1, description="first hidden-state index averaged")
    last: int = Field(-1, description="last hidden-state index averaged")
    feed: Feed = Field("selection", description="whether the LLM receives these features")

    def _range(self, num_layers: int) -> list[int]:
        a, b = normalize_layer(self.first, num_layers), normalize_layer(self.last, num_layers)
        if a > b:
            raise ValueError(f"mean fusion: first layer {a} comes after last layer {b}")
        return list(range(a, b + 1))

    def requirements(self, routing: Routing, table: ClassTable, num_layers: int) -> Requirements:
        return Requirements(layers=frozenset(self._range(num_layers)))

    def fuse(self, tokens: VisualTokens, routing: Routing, table: ClassTable) -> Fused:
        L = tokens.num_layers
        layers = self._range(L)
        B = tokens.shape[0]
        w = torch.full((B, len(layers)), 1.0 / len(layers))
        fused = _weighted_sum(tokens, layers, w)  # (B, M, Dv)
        alpha = torch.zeros(B, L)
        cols = [li - 1 for li in layers if li > 0]
        alpha[:, cols] = 1.0 / len(layers)
        return Fused(fused, _project(tokens, fused), alpha if len(cols) == len(layers) else None,
                     self.feed == "llm")


@hookimpl
def register_fusions(register):
    register("class-adaptive", ClassAdaptiveFusion)
    register("single-layer", SingleLayerFusion)
    register("mean", MeanFusion)
