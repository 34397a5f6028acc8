"""CLASP's batched spherical k-means and the pick of one token per cluster (eqs. 39-41), over
masked rows: what :class:`tokenprune_plugins.completion.ClaspCompletion` runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenprune.ops import TIE_ULPS, accumulation_dtype, gather_rows, norm_f32, unit

__all__ = ["KMeansResult", "spherical_kmeans", "centre_similarity", "cluster_argmax", "cluster_medoids"]


@dataclass(frozen=True)
class KMeansResult:
    """Output of :func:`spherical_kmeans`.

    Attributes:
        centres: ``(B, K, D)`` unit centres (zero rows for invalid centres).
        assign: ``(B, N)`` int64 cluster of each pool token; ``K`` on invalid pool slots.
        iterations: assignment steps run (each costs one ``(N, D) x (D, K)`` product per row).
        objective: ``(B, iterations)`` float32 trace of ``sum_t u_t . mu_{a_t}`` measured right
            after each assignment step, if requested, else ``None``.
        score: ``(B, N)`` similarity of each slot to its own (returned) centre.
    """

    centres: Tensor
    assign: Tensor
    iterations: int
    objective: Tensor | None = None
    score: Tensor | None = None


def _cluster_sums(x: Tensor, assign: Tensor, K: int) -> Tensor:
    """Per-cluster sums: ``x`` ``(B, N, D)``, ``assign`` ``(B, N)`` in ``0..K`` -> ``(B, K, D)``.

    Cluster ``K`` is a sink for invalid slots and is dropped. On the CPU this is an ``index_add_``
    (O(N D), deterministic); on CUDA ``index_add_`` uses float atomics whose order varies, so a
    one-hot batched product is used instead (deterministic, and on tensor cores).
    """
    B, N, D = x.shape
    if x.is_cuda:
        onehot = torch.nn.functional.one_hot(assign, K + 1)[..., :K].to(x.dtype)  # (B, N, K)
        return torch.bmm(onehot.transpose(1, 2), x)  # (B, K, N) @ (B, N, D) -> (B, K, D)
    flat = assign + torch.arange(B, device=x.device).view(B, 1) * (K + 1)  # (B, N) row offsets
    sums = torch.zeros(B * (K + 1), D, dtype=x.dtype, device=x.device)
    sums.index_add_(0, flat.reshape(-1), x.reshape(B * N, D))  # (B*(K+1), D)
    return sums.view(B, K + 1, D)[:, :K]


def spherical_kmeans(
    x: Tensor,
    valid: Tensor,
    seeds: Tensor,
    seed_valid: Tensor,
    iterations: int = 10,
    early_stop: bool = True,
    trace: bool = False,
    final_update: bool = True,
) -> KMeansResult:
    """Spherical k-means over unit vectors, initialised at given members, batched with masks.

    Assignment (CLASP eq. 39): ``a_t = argmax_k u_t . mu_k`` (ties to the lower ``k``). Update
    (eq. 40): ``mu_k = normalise(sum_{t in S_k} u_t)``; an empty cluster keeps its previous
    centre. Runs ``iterations`` rounds of assignment then update, or stops earlier
    (``early_stop``) once no assignment changes in any row (the centres are then already the
    normalised sums of their clusters). The returned centres are those of the returned clusters,
    and ``score`` is each slot's similarity to its own centre, which is what medoids (eq. 41) need:
    on convergence the last assignment step's products are those similarities already; when
    ``T`` runs out, one more product against the updated centres gives them (a product is
    cheaper than gathering an ``(N, D)`` centre per slot). Rows that converged earlier are at a
    fixed point, so extra rounds leave them as they were: a batched call equals the per-row calls.

    ``final_update=False`` skips the last round's update: the centres returned are the ones that
    produced the final assignment, and ``score`` comes from that assignment's products (the order
    tokenprune 0.1 used until the testbed v2 figures, kept to reproduce earlier figures).

    Args:
        x: ``(B, N, D)`` unit pool vectors (fp32/fp16/bf16; products run in this dtype).
        valid: ``(B, N)`` bool real pool slots.
        seeds: ``(B, K)`` int64 pool indices of the initial centres.
        seed_valid: ``(B, K)`` bool; row ``b`` uses its first ``K_b`` centres.
        iterations: maximum number of assignment steps ``T`` (>= 1).
        early_stop: stop when assignments no longer change.
        trace: also return the objective after each assignment step.
        final_update: update the centres after the last assignment (eq. 40 before eq. 41).

    Returns:
        :class:`KMeansResult`.
    """
    B, N, D = x.shape
    K = seeds.shape[1]
    if K == 0 or N == 0:  # nothing to cluster
        empty = torch.full((B, N), K, dtype=torch.int64, device=x.device)
        obj = torch.zeros(B, 0, device=x.device) if trace else None
        return KMeansResult(x.new_zeros(B, K, D), empty, 0, obj)
    mu = gather_rows(x, seeds) * seed_valid.unsqueeze(-1).to(x.dtype)  # (B, K, D)
    dead = ~seed_valid.unsqueeze(1)  # (B, 1, K) centre columns no row may join
    any_dead = not bool(seed_valid.all())
    joins = valid & seed_valid.any(1, keepdim=True)  # (B, N) a row without centres clusters nothing
    sink = torch.full_like(valid, K, dtype=torch.int64)  # (B, N)
    prev: Tensor | None = None
    objectives: list[Tensor] = []
    steps = 0
    converged = False
    T = max(1, iterations)
    for step in range(T):
        sims = torch.bmm(x, mu.transpose(1, 2))  # (B, N, D) @ (B, D, K) -> (B, N, K)
        if any_dead:
            sims = sims.masked_fill(dead, float("-inf"))
        best, assign = sims.max(-1)  # (B, N)
        assign = torch.where(joins, assign, sink)
        steps += 1
        if trace:
            objectives.append(best.float().masked_fill(~joins, 0).sum(1))  # (B,)
        converged = early_stop and prev is not None and torch.equal(assign, prev)
        if converged or (step == T - 1 and not final_update):
            break  # converged: the centres are already those of these clusters
        prev = assign
        mu = _update_centres(x, assign, mu)  # (B, K, D)
    if final_update and not converged:  # T ran out: score against the centres just updated
        sims = torch.bmm(x, mu.transpose(1, 2))  # (B, N, K), one product, as an assignment step
        best = sims.gather(2, assign.clamp_max(K - 1).unsqueeze(-1)).squeeze(-1)  # (B, N)
    obj = torch.stack(objectives, 1) if trace else None  # (B, T)
    return KMeansResult(centres=mu, assign=assign, iterations=steps, objective=obj, score=best)


def _update_centres(x: Tensor, assign: Tensor, mu: Tensor) -> Tensor:
    """Eq. 40: ``mu_k = normalise(sum_{t in S_k} u_t)``; an empty cluster keeps its centre."""
    sums = _cluster_sums(x, assign, mu.shape[1])  # (B, K, D)
    norm = norm_f32(sums, keepdim=True)  # (B, K, 1), once for the test and the division
    new = unit(sums, norm=norm)
    empty = norm == 0
    return torch.where(empty, mu, new) if bool(empty.any()) else new  # (B, K, D)


def centre_similarity(x: Tensor, km: KMeansResult) -> Tensor:
    """``(B, N)`` each slot's similarity to its own cluster's centre, ``u_t . mu_{a_t}``, in the
    accumulation dtype: the last assignment's products when they are current, else one gather."""
    acc = accumulation_dtype(x.dtype)
    if km.score is not None:
        return km.score.to(acc)
    K = km.centres.shape[1]
    own = gather_rows(km.centres, km.assign.clamp_max(max(K - 1, 0)))  # (B, N, D) centre of each slot
    return (x * own).sum(-1, dtype=acc)  # (B, N)


def cluster_argmax(score: Tensor, valid: Tensor, assign: Tensor, K: int, tie_dtype: torch.dtype,
                   tiebreak: Tensor | None = None) -> Tensor:
    """The member of each cluster with the highest ``score``. Scores within ``TIE_ULPS`` units of
    rounding of ``tie_dtype`` of the best tie, and go to the member with the lower ``tiebreak``,
    then to the lower pool index. Empty clusters give none.

    Args:
        score: ``(B, N)`` per-slot score, higher wins.
        valid: ``(B, N)`` bool real pool slots.
        assign: ``(B, N)`` int64 cluster of each slot, ``K`` on invalid slots.
        K: the number of clusters.
        tie_dtype: the dtype whose rounding makes two scores a tie (the features').
        tiebreak: optional ``(B, N)`` float secondary key, lower wins.

    Returns:
        ``(B, K)`` int64 pool index of each cluster's pick, ``N`` for an empty or invalid cluster.
    """
    B, N = score.shape
    if K == 0:
        return torch.zeros(B, 0, dtype=torch.int64, device=score.device)
    score = score.masked_fill(~valid, float("-inf"))
    best = torch.full((B, K + 1), float("-inf"), device=score.device, dtype=score.dtype)
    best.scatter_reduce_(1, assign, score, reduce="amax")  # (B, K+1)
    top = best.gather(1, assign)  # (B, N) best score of each slot's cluster
    tol = TIE_ULPS * torch.finfo(tie_dtype).eps * top.abs().clamp_min(1)  # rounding-level ties
    is_best = valid & (score >= top - tol)  # (B, N)
    if tiebreak is not None:
        tb = torch.where(is_best, tiebreak.to(score.dtype), float("inf"))  # (B, N)
        low = torch.full((B, K + 1), float("inf"), device=score.device, dtype=score.dtype)
        low.scatter_reduce_(1, assign, tb, reduce="amin")  # (B, K+1)
        is_best = is_best & (tb == low.gather(1, assign))
    pos = torch.arange(N, device=score.device).expand(B, N)
    cand = torch.where(is_best, pos, N)  # (B, N)
    pick = torch.full((B, K + 1), N, dtype=torch.int64, device=score.device)
    pick.scatter_reduce_(1, assign, cand, reduce="amin")  # (B, K+1)
    return pick[:, :K]


def cluster_medoids(x: Tensor, valid: Tensor, km: KMeansResult, tiebreak: Tensor | None = None) -> Tensor:
    """The member of each cluster closest to its centre: ``argmax_{t in S_k} u_t . mu_k``
    (:func:`cluster_argmax` of :func:`centre_similarity`).

    Ties (a two-member cluster always ties: ``u_1 . (u_1 + u_2) = u_2 . (u_1 + u_2)``), meaning
    scores within ``TIE_ULPS`` units of rounding of the best, go to the member with the lower
    ``tiebreak`` value, then to the lower pool index. Empty clusters
    give no medoid.

    Args:
        x: ``(B, N, D)`` unit pool vectors.
        valid: ``(B, N)`` bool real pool slots.
        km: the clustering.
        tiebreak: optional ``(B, N)`` float secondary key, lower wins (CLASP passes ``rho``).

    Returns:
        ``(B, K)`` int64 pool index of each cluster's medoid, ``N`` for an empty or invalid cluster.
    """
    K = km.centres.shape[1]
    if K == 0:
        return torch.zeros(x.shape[0], 0, dtype=torch.int64, device=x.device)
    return cluster_argmax(centre_similarity(x, km), valid, km.assign, K, x.dtype, tiebreak)
