"""VisionZip's contextual tokens (Yang et al., CVPR 2025), reimplemented from the paper.

VisionZip keeps *dominant* tokens, the top-k by [CLS] attention (in tokenprune: the
``cls-attention`` scorer with ``top-k`` pivots), and merges every other token into
``contextual`` tokens. This module is the second half, a completion stage.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

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

    ``released = True`` keeps what the authors' released code keeps: the [CLS] token is one of
    the ``floor(dominant_ratio R)`` dominant tokens, so the stage (with no pipeline pivots)
    takes one dominant patch fewer, ``R - floor(dominant_ratio R)`` contextual tokens as above,
    and the tower's [CLS] hidden state at ``cls_layer`` (projected) in the slot of the first
    pool token it does not keep: the earliest free slot of the image, where the released code
    puts the [CLS] (first in the image's tokens). LLaVA-1.5 only (one [CLS] per image).
    """

    metric: Literal["keys", "features"] = Field("keys", description="what similarity is measured on")
    key_layer: int = Field(-2, description="encoder layer whose attention keys are the metric")
    space: Space = Field("encoder", description="merge encoder features then project, or merge decoder features")
    released: bool = Field(False, description="the released selection: the [CLS] takes one dominant place "
                                              "(needs no pipeline pivots; the stage picks the dominant tokens)")
    dominant_ratio: float = Field(0.84375, gt=0, le=1, description="released = true: dominant tokens, [CLS] "
                                                                 "included, are floor(dominant_ratio R)")
    cls_layer: int = Field(-2, description="released = true: the hidden state whose [CLS] the LLM receives")
    permutation_invariant = False  # targets are spaced by token order

    def requirements(self, num_layers: int) -> Requirements:
        keys = frozenset() if self.metric == "features" else frozenset({normalize_layer(self.key_layer, num_layers)})
        cls = frozenset({normalize_layer(self.cls_layer, num_layers)}) if self.released else frozenset()
        return Requirements(attention_keys=keys, cls_token=cls)

    def complete(self, req: CompletionRequest) -> CompletionResult:
        if not self.released:
            is_target, merged = self._contextual(req, req.pool, req.k2.to(req.pool.device))
            return CompletionResult(is_target, merged_features(req, merged, is_target, self.space))
        return self._as_released(req)

    def _as_released(self, req: CompletionRequest) -> CompletionResult:
        if bool(req.pivots.any()):
            raise ValueError(
                "completion 'visionzip' with released = true picks the dominant tokens itself (the [CLS] is one "
                "of them, as in the released code): set [budget_policy] stage = \"fixed\", ratio = 0.0 "
                "(as specs/methods/visionzip-released.toml does)"
            )
        pool, R = req.pool, req.k2.to(req.pool.device)  # (B, M), (B,) the whole budget
        dominant = torch.floor(self.dominant_ratio * R.double() + 1e-6).long()  # (B,) [CLS] included
        has_cls = dominant > 0
        patches = ops.topk_mask(req.scores, dominant - has_cls.long(), pool)  # (B, M) dominant patches
        rest = pool & ~patches
        is_target, merged = self._contextual(req, rest, R - dominant)
        free = rest & ~is_target  # (B, M) pool tokens neither dominant nor contextual
        first = free.long().argmax(1)  # (B,) the earliest free slot
        slot = torch.nn.functional.one_hot(first, pool.shape[1]).bool() & (has_cls & free.any(1)).unsqueeze(1)
        cls = req.tokens.cls_feature(self.cls_layer)  # (B, Dv) encoder space
        if self.space == "decoder":
            cls = cls if req.tokens.project is None else req.tokens.project(cls.unsqueeze(1)).squeeze(1)
        merged[slot] = cls[slot.any(1)].to(merged.dtype)  # our own tensor: write the [CLS] rows in place
        at = is_target | slot
        return CompletionResult(patches | at, merged_features(req, merged, at, self.space, also=patches))

    def _contextual(self, req: CompletionRequest, pool: Tensor, k2: Tensor) -> tuple[Tensor, Tensor]:
        """``k2[b]`` contextual tokens from ``pool``: ``(B, M)`` bool targets and ``(B, M, F)`` the
        merged features at them (``space``; zeros elsewhere)."""
        B, M = pool.shape
        dev = pool.device
        metric = req.tokens.key_features(self.key_layer) if self.metric == "keys" else req.fused.encoder
        u = ops.unit(metric.to(dev))  # (B, M, Dk)
        index, ok = ops.compact(pool)  # (B, N) pool in order
        N = index.shape[1]
        n = ok.sum(1)  # (B,)
        step = torch.div(n, k2.clamp_min(1), rounding_mode="floor").clamp_min(1)  # (B,)
        K = int(k2.max()) if B else 0
        h = source(req, self.space)  # (B, M, F)
        if K == 0:
            return torch.zeros_like(pool), torch.zeros_like(h)
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
        F = h.shape[-1]
        acc = ops.accumulation_dtype(h.dtype)
        sums = torch.zeros(B, K + 1, F, dtype=acc, device=dev)
        sums.scatter_add_(1, group.unsqueeze(-1).expand(-1, -1, F), h.to(acc))
        counts = torch.zeros(B, K + 1, dtype=acc, device=dev).scatter_add_(1, group, member.to(acc))
        mean = sums[:, :K] / counts[:, :K].clamp_min(1).unsqueeze(-1)  # (B, K, F)
        ctx = ops.gather_rows(h, targets.clamp_max(M - 1)).to(acc) + mean  # (B, K, F)
        merged = torch.zeros(B, M + 1, F, dtype=h.dtype, device=dev)
        merged.scatter_(1, targets.unsqueeze(-1).expand(-1, -1, F), ctx.to(h.dtype))
        return is_target, merged[:, :M]


@hookimpl
def register_completions(register):
    register("visionzip", VisionZipContextual)
