"""Saliency scorers ``phi`` (CLASP stage 3's attention source, [ours]) and alternatives."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenprune import hookimpl, ops
from tokenprune.contract import Fused, Requirements, VisualTokens, normalize_layer
from tokenprune.stages import Scorer


class ClsAttention(Scorer):
    """[CLS]-to-patch attention at one encoder layer, averaged over heads (VisionZip/VisPruner's
    signal; the default for towers with a [CLS] token)."""

    layer: int = Field(-2, description="encoder hidden-state index whose attention is read")

    def requirements(self, num_layers: int) -> Requirements:
        return Requirements(cls_attention=frozenset({normalize_layer(self.layer, num_layers)}))

    def score(self, tokens: VisualTokens, fused: Fused) -> Tensor:
        return tokens.signal("cls_attention", self.layer)  # (B, M)


class ReceivedAttention(Scorer):
    """Mean attention each patch receives from the patches at one layer, averaged over heads
    (the default for towers without [CLS]: SigLIP, Qwen)."""

    layer: int = Field(-2, description="encoder hidden-state index whose attention is read")

    def requirements(self, num_layers: int) -> Requirements:
        return Requirements(received_attention=frozenset({normalize_layer(self.layer, num_layers)}))

    def score(self, tokens: VisualTokens, fused: Fused) -> Tensor:
        return tokens.signal("received_attention", self.layer)  # (B, M)


class TextSimilarity(Scorer):
    """Cosine between each token's decoder-space feature ``u_t`` and the prompt's mean embedding
    (CDPruner-style instruction relevance)."""

    def requirements(self, num_layers: int) -> Requirements:
        return Requirements(text_embedding=True)

    def score(self, tokens: VisualTokens, fused: Fused) -> Tensor:
        if tokens.text_embedding is None:
            raise KeyError(
                "scorer 'text-similarity' needs the prompt's mean embedding in decoder space: pass "
                "VisualTokens(text_embedding=(B, D) tensor), or apply the pipeline through an adapter"
            )
        x = fused.decoder  # (B, M, D), not normalised: the product is divided by the norms instead
        t = ops.unit(tokens.text_embedding.to(device=x.device, dtype=x.dtype))  # (B, D)
        if t.shape[-1] != x.shape[-1]:
            raise ValueError(
                f"text_embedding has width {t.shape[-1]} but decoder features have {x.shape[-1]}"
            )
        if x.dtype == torch.float16:  # raw fp16 products could overflow
            x = ops.unit(x)
        dots = torch.bmm(x, t.unsqueeze(-1)).squeeze(-1)  # (B, M, D) @ (B, D, 1) -> (B, M)
        return (dots / ops.norm_f32(x).clamp_min(1e-12)).float()


class FeatureNorm(Scorer):
    """L2 norm of each token's feature (a cheap attention-free saliency proxy)."""

    space: Literal["decoder", "encoder"] = Field("decoder", description="which fused features to measure")

    def score(self, tokens: VisualTokens, fused: Fused) -> Tensor:
        x = fused.decoder if self.space == "decoder" else fused.encoder
        return ops.norm_f32(x).float()  # (B, M)


class RandomScore(Scorer):
    """Seeded uniform scores; row ``b`` depends only on ``(seed, sample_keys[b], token)``."""

    seed: int = Field(0, description="random seed")
    permutation_invariant = False  # draws are tied to token positions

    def score(self, tokens: VisualTokens, fused: Fused) -> Tensor:
        B, M = tokens.shape
        return ops.hash_uniform(self.seed, tokens.keys(), M)  # (B, M)


class NoScore(Scorer):
    """No pivot signal: ``phi = 0`` for every token. The default of a spec without ``[scoring]``
    (pooling, random, DivPrune...), whose budget policy gives no pivots; a pipeline refuses
    pivots chosen from it."""

    gives_signal = False

    def score(self, tokens: VisualTokens, fused: Fused) -> Tensor:
        B, M = tokens.shape
        return torch.zeros(B, M, dtype=torch.float32, device=tokens.reference.device)  # (B, M)


@hookimpl
def register_scorers(register):
    register("cls-attention", ClsAttention)
    register("received-attention", ReceivedAttention)
    register("text-similarity", TextSimilarity)
    register("feature-norm", FeatureNorm)
    register("random", RandomScore)
    register("none", NoScore)
