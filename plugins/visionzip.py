"""VisionZip's contextual tokens (Yang et al., CVPR 2025), reimplemented from the paper.

VisionZip keeps *dominant* tokens, the top-k by [CLS] attention (in tokenprune: the
``cls-attention`` scorer with ``top-k`` pivots), and merges every other token into
``contextual`` tokens. This module is the second half, a completion stage.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tokenprune import hookimpl, ops
from tokenprune.contract import Requirements, normalize_layer
from tokenprune.merging import Space, merged_features, source
from tokenprune.stages import Completion, CompletionRequest, CompletionResult


class VisionZipContextual(Completion):
    """Merge the non-dominant tokens into exactly ``K2`` contextual tokens.

    1. The pool ``U`` (valid, not dominant) in index order has ``N`` tokens. Targets are the
       pool tokens at ordinals ``0, s, 2s, ...`` (the first ``K2``), ``s = max(1, N // K2)``.
    2. Every other pool token joins the target whose key is most cosine-similar to its own
       (``metric = "keys"``: the attention keys of ``key_layer`` averaged over heads; ties to
       the earlier target).
    3. A contextual token is ``h_target + mean(h_members)``, or ``h_target`` when nobody joined,
       as in the released code. ``h`` are the fused encoder features (the tower's feature
       layer with ``single-layer`` fusion), and the sum is projected like any other token
       (``space = "encoder"``).

    **Position rule:** a contextual token sits at its target's position, so the LLM sees it in
    the target's slot (its 1-D position, or M-RoPE row/column for Qwen).
    """

    metric: Literal["keys", "features"] = Field("keys", description="what similarity is measured on")
    key_layer: int = Field(-2, description="encoder layer whose attention keys are the metric")
    space: Space = Field("encoder", description="merge encoder features then project, or merge decoder features")
    permutation_invariant = False  # targets are spaced by token order

    def requirements(self, num_layers: int) -> Requirements:
        if self.metric == "features":
            return Requirements()
        return Requirements(attention_keys=frozenset({normalize_layer(self.key_layer, num_layers)}))

    def complete(self, req: CompletionRequest) -> CompletionResult:
        pool, k2 = req.pool, req.k2.to(req.pool.device)
        B, M = pool.shape
        dev = pool.device
        metric = req.tokens.key_features(self.key_layer) if self.metric == "keys" else req.fused.encoder
        u = ops.unit(metric.to(dev))  # (B, M, Dk)
        index, ok = ops.compact(pool)  # (B, N) pool in order
        N = index.shape[1]
        n = ok.sum(1)  # (B,)
        step = torch.div(n, k2.clamp_min(1), rounding_mode="floor").clamp_min(1)  # (B,)
        K = int(k2.max())
        j = torch.arange(K, device=dev).expand(B, K)  # (B, K) target ordinal
        t_ok = j < k2.view(B, 1)
        t_ord = (j * step.view(B, 1)).clamp_max(max(N - 1, 0))  # (B, K) ordinal in the pool
        targets = torch.where(t_ok, index.gather(1, t_ord), M)  # (B, K) token index, M = none
        is_target = torch.zeros(B, M + 1, dtype=torch.bool, device=dev).scatter_(1, targets, True)[:, :M]
        # 2. assign every other pool token to its most similar target
        tu = ops.gather_rows(u, targets.clamp_max(M - 1))  # (B, K, Dk)
        sim = torch.bmm(u, tu.transpose(1, 2)).float()  # (B, M, K)
        sim = sim.masked_fill(~t_ok.unsqueeze(1), float("-inf"))
        group = sim.argmax(-1)  # (B, M) first max = earlier target
        member = pool & ~is_target
        group = torch.where(member, group, K)  # non-members -> spare group
        # 3. h_target + mean(h_members), at the targets
        h = source(req, self.space)  # (B, M, F)
        F = h.shape[-1]
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        sums = torch.zeros(B, K + 1, F, dtype=acc, device=dev)
        sums.scatter_add_(1, group.unsqueeze(-1).expand(-1, -1, F), h.to(acc))
        counts = torch.zeros(B, K + 1, dtype=acc, device=dev).scatter_add_(1, group, member.to(acc))
        mean = sums[:, :K] / counts[:, :K].clamp_min(1).unsqueeze(-1)  # (B, K, F)
        ctx = ops.gather_rows(h, targets.clamp_max(M - 1)).to(acc) + mean  # (B, K, F)
        merged = torch.zeros(B, M + 1, F, dtype=h.dtype, device=dev)
        merged = merged.scatter(1, targets.unsqueeze(-1).expand(-1, -1, F), ctx.to(h.dtype))[:, :M]
        return CompletionResult(is_target, merged_features(req, merged, is_target, self.space))


@hookimpl
def register_completions(register):
    register("visionzip", VisionZipContextual)
