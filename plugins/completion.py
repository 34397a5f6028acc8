"""Completion stages: fill the remaining ``K2`` of the budget.

- ``clasp``: CLASP stage 4 (eqs. 36-41): pivot-relative redundancy, bottom-K2 seeding,
  spherical k-means, medoids with fill.
- ``none``: no completion rule; the next-highest saliency (with top-k pivots: top-R of ``phi``).
- ``random``: seeded uniform choice.
- ``grid``: tokens nearest a uniform spatial lattice.
- ``divprune``: greedy max-min diversity (DivPrune, Alvar et al., CVPR 2025), reimplemented
  from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenprune import hookimpl, ops
from tokenprune.stages import Completion, CompletionRequest, CompletionResult

from .greedy import greedy_max_min
from .kmeans import KMeansResult, centre_similarity, cluster_argmax, cluster_medoids, spherical_kmeans


@dataclass(frozen=True)
class ClaspPlan:
    """CLASP completion's intermediate results, over the tokens (for tests and plots).

    Attributes:
        pool: ``(B, M)`` bool pool ``U = V \\ P``.
        rho: ``(B, M)`` pivot-relative redundancy (0 for rows without pivots; meaningless
            outside the pool).
        seeds: ``(B, M)`` bool seed set ``C0``.
        kmeans: the clustering (``assign`` is ``K2max`` outside the pool).
        medoids: ``(B, K2max)`` token index of each cluster's medoid (``M`` = empty cluster).
        chosen: ``(B, M)`` bool completion set (medoids + fill).
    """

    pool: Tensor
    rho: Tensor
    seeds: Tensor
    kmeans: KMeansResult
    medoids: Tensor
    chosen: Tensor


class ClaspCompletion(Completion):
    """Redundancy-aware coverage (CLASP eqs. 36-41).

    1. ``rho_t = max_{j in P} u_t . u_j`` for ``t in U`` (one batched product + row max).
    2. Seeds ``C0 = BottomK2{rho_t}`` (ties to the lower index), the minimiser of
       ``D(C|P) = sum_{t in C} rho_t``. Rows without pivots: seeds every ``floor(|U|/K2)``-th pool
       token ([ours], ``spread_without_pivots``).
    3. Spherical k-means over ``U`` with ``K2`` centres from the seeds, at most ``iterations``
       steps, stopping early when assignments stop changing; empty clusters keep their centre.
    4. Keep each cluster's medoid ``argmax_{t in S_k} u_t . mu_k`` (rounding-level ties to the
       lower ``rho``, then the lower index [ours]); if fewer than ``K2`` distinct tokens result,
       fill with the lowest-``rho`` pool tokens not yet kept ([ours]).
       ``representative = "novel"`` ([ours]) keeps instead each cluster's member least redundant
       with the pivots, ``argmin_{t in S_k} rho_t`` (rounding-level ties to the higher
       ``u_t . mu_k``, then the lower index); a medoid is a cluster's most typical token, so at
       4-8 clusters a small distinct region (the testbed's number box) absorbed into a large
       cluster is never kept. Rows without pivots keep medoids.

    The work runs on the full ``(B, M, D)`` feature tensor with the pool as a mask, so the pool
    is never copied out; pivots and seeds (``K`` rows each) are gathered.
    """

    iterations: int = Field(10, ge=1, le=1000, description="maximum k-means iterations T")
    early_stop: bool = Field(True, description="stop when no assignment changes")
    spread_without_pivots: bool = Field(
        True, description="with K1 = 0, seed every floor(|U|/K2)-th token instead of the first K2"
    )
    medoid_centres: Literal["updated", "assigning"] = Field(
        "updated", description="medoids (eq. 41) against the centres updated from the final clusters (eq. 40, "
        "as the paper orders them) or 'assigning': against the centres that made the final assignment "
        "(tokenprune's order before the testbed v2 figures)"
    )

    representative: Literal["medoid", "novel"] = Field(
        "medoid", description="the token kept from each cluster: 'medoid' (eq. 41, the paper), or 'novel' "
        "([ours]): the member least redundant with the pivots (lowest rho), so a small distinct region "
        "absorbed into a large cluster is kept instead of the cluster's most typical token; rows without "
        "pivots keep medoids"
    )

    def plan(self, req: CompletionRequest, trace: bool = False) -> ClaspPlan:
        x = req.unit  # (B, M, D)
        B, M, D = x.shape
        pool = req.pool  # (B, M)
        acc = ops.accumulation_dtype(x.dtype)
        # 1. redundancy against the pivots (eq. 36)
        p_index, p_ok = ops.compact(req.pivots)  # (B, P)
        has_pivots = p_ok.any(1)  # (B,)
        if p_index.shape[1] > 0:
            piv = ops.gather_rows(x, p_index)  # (B, P, D)
            sims = torch.bmm(x, piv.transpose(1, 2))  # (B, M, D) @ (B, D, P) -> (B, M, P)
            rho = sims.masked_fill(~p_ok.unsqueeze(1), float("-inf")).amax(-1).to(acc)  # (B, M)
            rho = torch.where(has_pivots.unsqueeze(1), rho, 0.0)
        else:
            rho = torch.zeros(B, M, device=x.device, dtype=acc)
        # 2. seeding (eqs. 37-38)
        k2 = req.k2.to(x.device)
        seeds = ops.topk_mask(rho, k2, pool, largest=False)  # (B, M) bottom-K2
        if self.spread_without_pivots and not bool(has_pivots.all()):
            u_index, u_ok = ops.compact(pool)  # (B, N) pool tokens in order
            N = u_index.shape[1]
            step = torch.div(u_ok.sum(1), k2.clamp_min(1), rounding_mode="floor").clamp_min(1)  # (B,)
            j = torch.arange(N, device=x.device).expand(B, N)  # (B, N) seed ordinal
            at = u_index.gather(1, (j * step.view(B, 1)).clamp_max(max(N - 1, 0)))  # (B, N)
            spread = torch.zeros(B, M + 1, dtype=torch.bool, device=x.device)
            spread.scatter_(1, torch.where(j < k2.view(B, 1), at, M), True)
            seeds = torch.where(has_pivots.unsqueeze(1), seeds, spread[:, :M] & pool)
        seed_index, seed_ok = ops.compact(seeds)  # (B, K2max)
        # 3. spherical k-means over the pool (eqs. 39-40, T rounds)
        km = spherical_kmeans(x, pool, seed_index, seed_ok, self.iterations, self.early_stop, trace,
                                  final_update=self.medoid_centres == "updated")
        # 4. medoids (eq. 41), then fill to exactly K2
        med = self._representatives(x, pool, km, rho, has_pivots)  # (B, K2max), M = none
        chosen = torch.zeros(B, M + 1, dtype=torch.bool, device=x.device).scatter_(1, med, True)[:, :M]
        missing = k2 - chosen.sum(1)  # (B,)
        chosen = chosen | ops.topk_mask(rho, missing, pool & ~chosen, largest=False)
        return ClaspPlan(pool, rho, seeds, km, med, chosen)

    def _representatives(self, x: Tensor, pool: Tensor, km: KMeansResult, rho: Tensor, has_pivots: Tensor) -> Tensor:
        """``(B, K2max)`` the token each cluster keeps: its medoid (eq. 41), or with ``novel`` its
        lowest-``rho`` member (ties to the more typical, then the lower index) in rows with pivots;
        medoids are computed only for the rows that keep them."""
        K = km.centres.shape[1]
        if self.representative == "medoid" or not bool(has_pivots.any()):
            return cluster_medoids(x, pool, km, tiebreak=rho)
        fit = centre_similarity(x, km)  # (B, M)
        novel = cluster_argmax(-rho, pool, km.assign, K, x.dtype, tiebreak=-fit)
        if bool(has_pivots.all()):
            return novel
        medoid = cluster_argmax(fit, pool, km.assign, K, x.dtype, tiebreak=rho)
        return torch.where(has_pivots.unsqueeze(1), novel, medoid)

    def complete(self, req: CompletionRequest) -> CompletionResult:
        return CompletionResult(self.plan(req).chosen)


class NoCompletion(Completion):
    """No coverage rule: the ``K2`` highest-saliency pool tokens (with ``top-k`` pivots the whole
    selection is the top-R by ``phi``)."""

    def complete(self, req: CompletionRequest) -> CompletionResult:
        return CompletionResult(ops.topk_mask(req.scores, req.k2, req.pool))


class RandomCompletion(Completion):
    """Seeded uniform choice from the pool; row ``b`` depends only on ``(seed, sample_keys[b])``."""

    seed: int = Field(0, description="random seed")
    permutation_invariant = False

    def complete(self, req: CompletionRequest) -> CompletionResult:
        B, M = req.pool.shape
        r = ops.hash_uniform(self.seed, req.tokens.keys(), M)  # (B, M)
        return CompletionResult(ops.topk_mask(r, req.k2, req.pool))


class GridCompletion(Completion):
    """Tokens nearest a uniform lattice over the image.

    Row ``b`` lays ``n_r x n_c >= K2`` cell centres over the bounding box of its token positions
    (``n_r ~ sqrt(K2 H / W)``), takes ``K2`` of them evenly in raster order, and keeps the pool
    token nearest each (ties to the lower index). Lattice points that share a nearest token are
    filled by the pool tokens closest to any lattice point. Needs ``tokens.positions``.
    """

    permutation_invariant = False

    def complete(self, req: CompletionRequest) -> CompletionResult:
        pos = req.tokens.positions
        if pos is None:
            raise ValueError(
                "completion 'grid' needs token positions: pass VisualTokens(positions=(B, M, 2)) "
                "(tokenprune.grid_positions(h, w) builds them); adapters supply them"
            )
        return CompletionResult(ops.lattice_mask(pos, req.valid, req.pool, req.k2))


class DivPruneCompletion(Completion):
    """Greedy max-min diversity over cosine distance (DivPrune's MMDP solver), continuing from
    the pivots; with no pivots the first pick is the most isolated token, as in the paper."""

    init_isolated: bool = Field(True, description="with no pivots, start from the most isolated token")

    def complete(self, req: CompletionRequest) -> CompletionResult:
        isolated = self.init_isolated and not bool(req.pivots.any(1).all())  # the first pick reads all of it
        gram, x = req.similarity_or_unit(int(req.k2.max()), force=True if isolated else None)
        return CompletionResult(greedy_max_min(x, req.pool, req.pivots, req.k2, self.init_isolated, gram))


@hookimpl
def register_completions(register):
    register("clasp", ClaspCompletion)
    register("none", NoCompletion)
    register("random", RandomCompletion)
    register("grid", GridCompletion)
    register("divprune", DivPruneCompletion)
