"""Batched tensor kernels shared by the stages.

Pure functions, no module state, no Python loop over tokens or batch rows. Every function takes
a validity mask so that rows with different token counts share a batch; padding never wins a
selection. Ties are always broken towards the lower token index, so results are deterministic.

Shape letters: ``B`` batch, ``M`` tokens, ``N`` pool tokens, ``K`` selected/centres, ``D`` width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "unit",
    "norm_f32",
    "topk_mask",
    "mask_to_indices",
    "hash_uniform",
    "compact",
    "gather_rows",
    "flat_rows",
    "row_at",
    "accumulation_dtype",
    "cosine_matrix",
    "similarity_rows",
    "KMeansResult",
    "spherical_kmeans",
    "cluster_medoids",
    "greedy_max_min",
    "greedy_dpp_map",
    "bipartite_dedup",
    "lattice_mask",
    "argmax_low",
]

_M32 = 0xFFFFFFFF
#: scores closer than this many units of rounding (of the feature dtype) count as ties
TIE_ULPS = 8


def unit(x: Tensor, eps: float = 1e-12, norm: Tensor | None = None) -> Tensor:
    """L2-normalise the last dimension, accumulating the norm in float32; keeps ``x.dtype``.

    ``(..., D) -> (..., D)``. Zero vectors stay zero. ``norm``: ``norm_f32(x, keepdim=True)`` if the
    caller already has it.
    """
    norm = norm_f32(x, keepdim=True) if norm is None else norm  # (..., 1)
    return (x / norm.clamp_min(eps).to(x.dtype)).to(x.dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and products are accumulated in: float64 stays float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_f32(x: Tensor, keepdim: bool = False) -> Tensor:
    """L2 norm over the last dimension, accumulated in at least float32 (float64 stays float64)."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=keepdim, dtype=accumulation_dtype(x.dtype))


def topk_mask(score: Tensor, k: Tensor, valid: Tensor, largest: bool = True) -> Tensor:
    """Per-row top-``k`` as a boolean mask, ties broken towards the lower index.

    Args:
        score: ``(B, M)`` float scores (any float dtype; compared in float32).
        k: ``(B,)`` int64, how many to take per row; must not exceed the row's valid count.
        valid: ``(B, M)`` bool candidates. Only these can be chosen.
        largest: take the highest (``True``) or lowest (``False``) scores.

    Returns:
        ``(B, M)`` bool with exactly ``k[b]`` true entries in row ``b``, all within ``valid``.
    """
    B, M = score.shape
    s = score.float()
    if not largest:
        s = -s
    finite = torch.finfo(torch.float32)
    s = s.clamp(finite.min / 2, finite.max)  # valid -inf still beats padding
    s = s.masked_fill(~valid, finite.min)  # (B, M)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # (B, M) stable: index ties
    ranks = torch.arange(M, device=score.device).expand(B, M)  # (B, M)
    take = ranks < k.to(score.device).view(B, 1)  # (B, M) in rank space
    out = torch.zeros(B, M, dtype=torch.bool, device=score.device)
    return out.scatter(1, order, take) & valid


def mask_to_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Turn a ``(B, M)`` keep mask into sorted indices.

    Returns:
        ``indices`` ``(B, K)`` int64 with ``K = max_b count_b``, ascending per row, ``-1`` after the
        row's count; and ``counts`` ``(B,)`` int64.
    """
    B, M = mask.shape
    counts = mask.sum(1)  # (B,)
    K = int(counts.max()) if B else 0
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :K]  # kept first, in order
    slot = torch.arange(K, device=mask.device).expand(B, K)  # (B, K)
    return torch.where(slot < counts.view(B, 1), order, -1), counts


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixing function on int64 tensors holding values in ``[0, 2**32)``.

    (The "lowbias32" constants of Chris Wellons' hash-prospector.) The same bits on every device.
    """
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def hash_uniform(seed: int, keys: Tensor, num: int) -> Tensor:
    """Counter-based uniform numbers in ``[0, 1)``: entry ``(b, t)`` depends only on
    ``(seed, keys[b], t)``.

    So a batched call equals the per-sample calls, and CPU and CUDA agree bit for bit.

    Args:
        seed: the stage's seed.
        keys: ``(B,)`` int64 per-sample keys.
        num: ``M``, numbers per row.

    Returns:
        ``(B, M)`` float32.
    """
    base = _hash32(torch.full_like(keys, seed & _M32) ^ _hash32(keys & _M32) ^ ((keys >> 32) & _M32))
    t = torch.arange(num, device=keys.device, dtype=torch.int64)  # (M,)
    h = _hash32(base.view(-1, 1) + _hash32(t * 0x9E3779B9 + 0x632BE5AB).view(1, -1))  # (B, M)
    return (h >> 8).float() * (1.0 / (1 << 24))  # 24 random bits: exact in float32


def compact(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the true entries of each row, in order, left-aligned.

    Returns:
        ``index`` ``(B, N)`` int64 with ``N = max_b count_b`` (padding slots point at index 0) and
        ``valid`` ``(B, N)`` bool.
    """
    idx, _ = mask_to_indices(mask)
    return idx.clamp_min(0), idx >= 0


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows of each sample: ``x`` ``(B, M, ...)``, ``index`` ``(B, N)`` int64 in ``[0, M)`` ->
    ``(B, N, ...)``.

    One ``index_select`` over the flattened batch, which copies whole rows; ``torch.gather``
    with an index expanded over ``D`` is several times slower on the CPU.
    """
    B, M = x.shape[:2]
    flat = flat_rows(index, M).reshape(-1)  # (B*N,)
    return x.reshape(B * M, *x.shape[2:]).index_select(0, flat).view(B, index.shape[1], *x.shape[2:])


def flat_rows(index: Tensor, M: int) -> Tensor:
    """``(B, K)`` token indices into ``(B, M, ...)`` -> the same rows of its ``(B * M, ...)`` view."""
    return index + torch.arange(index.shape[0], device=index.device).view(-1, 1) * M


def row_at(x: Tensor, j: Tensor) -> Tensor:
    """Row ``j[b]`` of each sample: ``x`` ``(B, M, ...)``, ``j`` ``(B,)`` int64 -> ``(B, ...)``.

    The greedy solvers read one row per pick; advanced indexing ``x[arange(B), j]`` costs about
    a thousand times more than this ``index_select`` on a busy 2-core CPU.
    """
    return gather_rows(x, j.view(-1, 1)).squeeze(1)


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


def cluster_medoids(x: Tensor, valid: Tensor, km: KMeansResult, tiebreak: Tensor | None = None) -> Tensor:
    """The member of each cluster closest to its centre: ``argmax_{t in S_k} u_t . mu_k``.

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
    B, N, D = x.shape
    K = km.centres.shape[1]
    if K == 0:
        return torch.zeros(B, 0, dtype=torch.int64, device=x.device)
    acc = accumulation_dtype(x.dtype)
    if km.score is not None:  # the last assignment's products are current
        score = km.score.to(acc)
    else:
        own = gather_rows(km.centres, km.assign.clamp_max(K - 1))  # (B, N, D) centre of each slot
        score = (x * own).sum(-1, dtype=acc)  # (B, N)
    score = score.masked_fill(~valid, float("-inf"))
    best = torch.full((B, K + 1), float("-inf"), device=x.device, dtype=acc)
    best.scatter_reduce_(1, km.assign, score, reduce="amax")  # (B, K+1)
    top = best.gather(1, km.assign)  # (B, N) best score of each slot's cluster
    tol = TIE_ULPS * torch.finfo(x.dtype).eps * top.abs().clamp_min(1)  # rounding-level ties
    is_best = valid & (score >= top - tol)  # (B, N)
    if tiebreak is not None:
        tb = torch.where(is_best, tiebreak.to(acc), float("inf"))  # (B, N)
        low = torch.full((B, K + 1), float("inf"), device=x.device, dtype=acc)
        low.scatter_reduce_(1, km.assign, tb, reduce="amin")  # (B, K+1)
        is_best = is_best & (tb == low.gather(1, km.assign))
    pos = torch.arange(N, device=x.device).expand(B, N)
    cand = torch.where(is_best, pos, N)  # (B, N)
    med = torch.full((B, K + 1), N, dtype=torch.int64, device=x.device)
    med.scatter_reduce_(1, km.assign, cand, reduce="amin")  # (B, K+1)
    return med[:, :K]


def argmax_low(score: Tensor, dtype: torch.dtype) -> Tensor:
    """Row-wise argmax where scores within ``TIE_ULPS`` units of rounding of ``dtype`` of the
    maximum tie, and ties go to the lowest index. ``(B, M) -> (B,)``."""
    top = score.amax(1, keepdim=True)  # (B, 1)
    tol = TIE_ULPS * torch.finfo(dtype).eps * top.abs().clamp_min(1).nan_to_num(0.0)
    return (score >= top - tol).int().argmax(1)  # first true = lowest index


def _vectors_or_matrix(x: Tensor | None, gram: Tensor | None, solver: str) -> Tensor:
    """Whichever of the unit vectors ``x`` and their similarity matrix ``gram`` a greedy solver was
    given (``x`` when both are), or a clear error when neither is."""
    given = x if x is not None else gram
    if given is None:
        raise ValueError(f"{solver} needs the unit vectors x or their similarity matrix gram")
    return given


def greedy_max_min(
    x: Tensor | None, candidates: Tensor, selected: Tensor, k: Tensor, init_isolated: bool = True,
    gram: Tensor | None = None,
) -> Tensor:
    """Greedy max-min diversity (the MMDP heuristic of DivPrune, Alvar et al., CVPR 2025).

    Cosine distance ``d(i, j) = 1 - u_i . u_j``. Each step adds the candidate whose minimum
    distance to the selected set is largest (rounding-level ties to the lower index, see
    :func:`argmax_low`). If a row starts with an
    empty selected set, its first pick is the candidate whose minimum distance to all other
    candidates is largest (``init_isolated``; this needs the row's full ``M x M`` similarity), or
    the lowest-index candidate otherwise.

    The loop runs over the ``max_b k_b`` *picks*, never over tokens or rows: each pick reads one
    row of the similarity matrix, or is one batched ``(B, M, D) x (B, D)`` product without it.

    Args:
        x: ``(B, M, D)`` unit vectors; not read when ``gram`` is given (may then be ``None``).
        candidates: ``(B, M)`` bool tokens that may be added.
        selected: ``(B, M)`` bool tokens already kept (e.g. pivots); they count for distances.
        k: ``(B,)`` int64 picks per row (``<=`` the row's candidate count).
        init_isolated: start a row without selected tokens from its most isolated candidate.
        gram: optional ``(B, M, M)`` cosine similarity matrix (:func:`similarity_rows`).

    Returns:
        ``(B, M)`` bool mask of the picked tokens (disjoint from ``selected``).
    """
    B, M = candidates.shape
    dev = candidates.device
    k = k.to(dev)
    steps = int(k.max()) if B else 0
    any_sel = selected.any(1)  # (B,)
    tie = _vectors_or_matrix(x, gram, "greedy_max_min").dtype
    if gram is None:
        assert x is not None
        isolated = init_isolated and not bool(any_sel.all())  # the first pick reads the whole matrix
        gram = similarity_rows(x, steps, force=True if isolated else None)
    full = None if gram is None else gram.float()
    neg_inf = torch.tensor(float("-inf"), device=dev)
    # max similarity of each token to the selected set (min distance = 1 - it)
    max_sim = torch.full((B, M), float("-inf"), device=dev)  # (B, M)
    if bool(any_sel.any()):
        sel_idx, sel_ok = compact(selected)  # (B, S)
        if full is not None:
            sims = gather_rows(full, sel_idx).transpose(1, 2)  # (B, M, S) columns of the selected
        else:
            assert x is not None
            sims = torch.bmm(x, gather_rows(x, sel_idx).transpose(1, 2)).float()  # (B, M, S)
        max_sim = sims.masked_fill(~sel_ok.unsqueeze(1), float("-inf")).amax(-1)  # (B, M)
    first_score: Tensor | None = None
    if not bool(any_sel.all()):
        if init_isolated:
            both = candidates.unsqueeze(1) & candidates.unsqueeze(2)
            eye = torch.eye(M, dtype=torch.bool, device=dev)
            assert full is not None  # an isolated start asks similarity_rows for the whole matrix
            nearest = full.masked_fill(~both | eye, float("-inf")).amax(-1)  # (B, M) closest other
            first_score = torch.where(candidates, -nearest, neg_inf)  # most isolated first
        else:
            first_score = torch.where(candidates, 0.0, neg_inf).expand(B, M)
    # gain of each candidate: its distance to the selected set (-max_sim), -inf once picked or closed
    gain = torch.where(candidates, -max_sim, neg_inf)  # (B, M)
    if first_score is not None:  # rows with nothing selected start from first_score
        gain = torch.where(any_sel.view(B, 1), gain, first_score)
    picked = torch.zeros(B, M, dtype=torch.bool, device=dev)
    ragged = not bool((k == steps).all())  # rows that stop early need masking
    for step in range(steps):
        choice = argmax_low(gain, tie).view(B, 1)  # (B, 1)
        if full is not None:
            new = row_at(full, choice.view(B))  # (B, M)
        else:
            assert x is not None  # no matrix: the vectors were given
            new = torch.bmm(x, row_at(x, choice.view(B)).unsqueeze(-1)).squeeze(-1).float()  # (B, M)
        if ragged:
            active = (step < k).view(B, 1)  # (B, 1)
            picked.scatter_(1, choice, picked.gather(1, choice) | active)
            new = torch.where(active, new, float("-inf"))
        else:
            picked.scatter_(1, choice, True)
        if step == 0 and first_score is not None:  # a fresh row's distances start at its first pick
            max_sim = torch.where(any_sel.view(B, 1), torch.maximum(max_sim, new), new)
            gain = torch.where(candidates & ~picked, -max_sim, neg_inf)
            continue
        gain = torch.minimum(gain, -new)  # a finished row's new is -inf: its gains stay
        closed = torch.where(active, float("-inf"), gain.gather(1, choice)) if ragged else float("-inf")
        gain.scatter_(1, choice, closed)
    return picked


#: feature tensors larger than this (bytes) are not re-read once per pick: the greedy solvers
#: compute the similarity matrix once instead (one GEMM; each pick then reads one of its rows).
GRAM_BYTES = 64 * 2**20
#: below :data:`GRAM_BYTES`, the similarity matrix still pays once a row takes at least
#: ``M / GRAM_PICKS_PER_TOKEN`` picks: the GEMM costs ``2 M^2 D`` flops, the per-pick products
#: re-read ``M D`` values per pick, so the matrix wins once ``picks > 2 M / (bytes * balance)``,
#: with the CPU's balance of about 8-12 flops per byte of memory traffic (measured on 2 cores:
#: the crossover is 32 picks at M = 576 and about 200 at M = 2880, D = 4096, fp32).
GRAM_PICKS_PER_TOKEN = 1 / 16


def similarity_rows(x: Tensor, picks: int | None = None, force: bool | None = None) -> Tensor | None:
    """The ``(B, M, M)`` cosine similarity matrix of the rows of ``x`` (:func:`cosine_matrix`) when
    re-reading the features once per pick would cost more, else ``None``: when ``x`` would not
    stay in cache (:data:`GRAM_BYTES`), or on the CPU when a row takes ``picks >= M / 16``
    (:data:`GRAM_PICKS_PER_TOKEN`). ``force`` overrides. ``x`` need not be normalised."""
    big = x.numel() * x.element_size() > GRAM_BYTES
    many = picks is not None and not x.is_cuda and picks >= GRAM_PICKS_PER_TOKEN * x.shape[1]
    if force is False or (force is None and not (big or many)):
        return None
    return cosine_matrix(x)


def cosine_matrix(x: Tensor) -> Tensor:
    """``(B, M, M)`` cosine similarity of the rows of ``x`` ``(B, M, D)``, in ``x``'s dtype: one
    product of the raw features scaled by their inverse norms, so no normalised copy of ``x`` is
    made (fp16 is normalised first: its products of raw features could overflow). Zero rows give 0."""
    if x.dtype == torch.float16:
        u = unit(x)
        return torch.bmm(u, u.transpose(1, 2))
    inv = 1.0 / norm_f32(x).clamp_min(1e-12)  # (B, M)
    g = torch.bmm(x, x.transpose(1, 2)).float()  # (B, M, M)
    return (g * inv.unsqueeze(2) * inv.unsqueeze(1)).to(x.dtype)


def greedy_dpp_map(x: Tensor | None, quality: Tensor, candidates: Tensor, selected: Tensor, k: Tensor,
                   eps: float = 1e-10, gram: Tensor | None = None) -> Tensor:
    """Greedy MAP inference for a DPP with kernel ``L_ij = q_i (u_i . u_j) q_j``, batched.

    The fast incremental-Cholesky form of Chen, Zhang & Zhou (NeurIPS 2018): each pick adds the
    candidate with the largest conditional variance ``d_i^2`` (the gain in ``log det L_S``), then
    updates every ``d_i^2`` with one new Cholesky row. Tokens already in ``selected`` (pivots)
    are conditioned on first, so the result is the greedy MAP of the DPP conditioned on them.
    ``L`` is never materialised: row ``j`` is ``q_j q * (x @ x_j)``, one ``(B, M, D) x (B, D)``
    product per pick. The loop runs over picks, never over tokens or rows.

    When a row's kernel is exhausted (more picks than the feature rank: every ``d_i^2`` at or below
    the noise floor, ``max_i L_ii * M * machine epsilon`` of the dtype the similarities were computed
    in, as numpy's matrix rank does; float32 for a ``gram`` from :func:`cosine_matrix`, and never
    below ``eps``), the remaining picks go to the highest-quality candidates [ours]: below the floor,
    the gains are rounding noise and would depend on the tokens' order. Ties go to the lower index.

    Args:
        x: ``(B, M, D)`` unit vectors; not read when ``gram`` is given (may then be ``None``).
        quality: ``(B, M)`` float ``q > 0``.
        candidates: ``(B, M)`` bool tokens that may be picked.
        selected: ``(B, M)`` bool tokens already in the set (disjoint from ``candidates``).
        k: ``(B,)`` int64 picks per row (``<=`` the row's candidate count).
        gram: optional ``(B, M, M)`` cosine similarity matrix (:func:`similarity_rows`): each pick
            then reads one row of it instead of a ``(B, M, D)`` product.

    Returns:
        ``(B, M)`` bool mask of the picked tokens.
    """
    B, M = candidates.shape
    dev = candidates.device
    tie = _vectors_or_matrix(x, gram, "greedy_dpp_map").dtype
    acc = accumulation_dtype(tie)
    G: Tensor | None = None
    xf: Tensor | None = None
    if gram is not None:
        G = gram.to(acc)
        sq = G.diagonal(dim1=1, dim2=2)  # (B, M) u_i . u_i
    else:
        assert x is not None
        xf = x.to(acc)
        sq = (xf * xf).sum(-1)  # (B, M)
    q = quality.to(acc)  # (B, M)
    d2 = q * q * sq  # (B, M) diag of L
    precision = acc if G is None else (torch.float16 if gram is not None and gram.dtype == torch.float16 else torch.float32)
    floor = (d2.masked_fill(~(candidates | selected), 0).amax(1) * M * torch.finfo(precision).eps).clamp_min(eps)  # (B,)
    fixed_index, fixed_ok = compact(selected)  # (B, P)
    P = fixed_index.shape[1]
    k = k.to(dev)
    steps = int(k.max()) if B else 0
    C = torch.zeros(B, P + steps, M, dtype=acc, device=dev)  # Cholesky rows
    picked = torch.zeros(B, M, dtype=torch.bool, device=dev)

    base = torch.arange(B, device=dev) * M  # (B,) row offsets into the flattened (B * M, ...) views
    Gf = None if G is None else G.reshape(B * M, M)

    def add(j: Tensor, on: Tensor, t: int) -> None:  # j (B,) token, on (B,) rows that take it
        flat = base + j  # (B,)
        d2j = d2.view(-1).index_select(0, flat)  # (B,)
        if Gf is not None:
            sim = Gf.index_select(0, flat)  # (B, M)
        else:
            assert xf is not None
            sim = torch.bmm(xf, xf.view(B * M, -1).index_select(0, flat).unsqueeze(-1)).squeeze(-1)  # (B, M)
        Lj = q.view(-1).index_select(0, flat).unsqueeze(1) * q * sim  # (B, M) row j of L
        if t:
            cj = C[:, :t].gather(2, j.view(B, 1, 1).expand(B, t, 1))  # (B, t, 1) Cholesky column j
            Lj = Lj - torch.bmm(cj.transpose(1, 2), C[:, :t]).squeeze(1)  # (B, M)
        live = on & (d2j > floor)  # (B,) an exhausted kernel (or a finished row) adds no information
        e = Lj * (live.to(acc) / d2j.clamp_min(eps).sqrt()).unsqueeze(1)  # (B, M), zero where not live
        C[:, t] = e
        d2.addcmul_(e, e, value=-1)

    for t in range(P):  # condition on the already-selected tokens
        add(fixed_index[:, t], fixed_ok[:, t], t)
    qmax = q.masked_fill(~candidates, 0).amax(1, keepdim=True).clamp_min(eps)
    fallback = (-2.0 + q / qmax).masked_fill(~candidates, float("-inf"))  # in [-2, -1]: below any real gain
    d2.masked_fill_(~candidates, float("-inf"))  # only candidates can win; a pick is closed the same way
    for step in range(steps):
        gain = torch.where(d2 > floor.unsqueeze(1), d2, fallback)  # (B, M)
        choice = argmax_low(gain, tie).view(B, 1)  # (B, 1)
        active = (step < k).view(B, 1)  # a row stays inactive once its picks are done
        picked.scatter_(1, choice, picked.gather(1, choice) | active)
        add(choice.view(B), active.view(B), P + step)
        d2.scatter_(1, choice, float("-inf"))
        fallback.scatter_(1, choice, float("-inf"))
    return picked


#: :func:`bipartite_dedup` keeps its similarity matrix in memory up to this many bytes
DEDUP_GRAM_BYTES = 2**30


def bipartite_dedup(x: Tensor, keep: Tensor, target: Tensor, per_round: int, order_by: Tensor | None = None) -> Tensor:
    """Iterative duplicate removal by bipartite matching (VisPruner's diverse-token rule).

    The remaining tokens of a row form a sequence, initially ``keep`` sorted by ``order_by``
    descending (VisPruner: [CLS] attention; index order when ``None``). Each round splits the
    sequence into set A (even ordinals) and set B (odd ordinals), scores every token of A by its
    highest cosine similarity to B, drops the ``r = min(per_round, remaining - target)`` highest
    scores of A, and continues with the sequence ``[A's survivors by descending score, B]``, as
    the released code does. Rounds repeat until ``target[b]`` tokens remain.

    The similarity matrix of the kept tokens is computed once (up to :data:`DEDUP_GRAM_BYTES`;
    beyond, each round multiplies its own ``A x B`` block, which bounds memory); each round reads
    its A rows (``index_select``) and their B columns (``gather``, 2.5x faster on the CPU than one
    three-index lookup), so a round costs ``O(N^2)`` lookups, not ``O(N^2 D)`` products. Rounds
    work on the live prefix of the sequences, which shrinks by ``per_round`` each round. The loop
    runs over rounds (about ``(M - target) / per_round``), never over tokens or rows.

    Args:
        x: ``(B, M, D)`` unit vectors.
        keep: ``(B, M)`` bool starting set.
        target: ``(B,)`` int64 tokens to end with (``<= keep.sum(1)``).
        per_round: most tokens removed per row per round (8 in the released code).
        order_by: ``(B, M)`` scores that order the starting sequence, or ``None``.

    Returns:
        ``(B, M)`` bool, a subset of ``keep`` with exactly ``target[b]`` tokens in row ``b``.
    """
    B, M, _ = x.shape
    dev = x.device
    target = target.to(dev)
    idx, ok = compact(keep)  # (B, N) tokens in index order
    N = idx.shape[1]
    if N == 0:
        return keep.clone()
    xs = gather_rows(x, idx).to(accumulation_dtype(x.dtype))  # (B, N, D)
    # the matrix once (faster at every size measured, 13.8 s vs 21.1 s of per-round products at
    # B = 8, M = 2880), unless it would take more than DEDUP_GRAM_BYTES of memory
    gram = torch.bmm(xs, xs.transpose(1, 2)) if B * N * N * xs.element_size() <= DEDUP_GRAM_BYTES else None
    if order_by is not None:
        key = order_by.float().gather(1, idx).masked_fill(~ok, float("-inf"))
        order = torch.sort(key, dim=1, descending=True, stable=True).indices  # (B, N) slots of the sequence
    else:
        order = torch.arange(N, device=dev).expand(B, N).clone()
    n = ok.sum(1)  # (B,) sequence length
    while True:
        n_a = (n + 1) // 2  # |A|
        r = torch.clamp(torch.minimum(torch.minimum(n - target, n_a), torch.full_like(n, per_round)), min=0)  # (B,)
        if not bool(r.any()):
            break
        W = int(n.max())  # the live prefix: rounds shrink with the sequences, as the released code's do
        order = order[:, :W]
        NA, NB = (W + 1) // 2, W // 2
        ja, jb = torch.arange(NA, device=dev), torch.arange(NB, device=dev)
        a, b = order[:, 0::2], order[:, 1::2]  # (B, NA), (B, NB)
        a_ok = 2 * ja < n.unsqueeze(1)
        b_ok = 2 * jb + 1 < n.unsqueeze(1)
        if gram is not None:  # rows, then columns of the matrix
            sim = gather_rows(gram, a).gather(2, b.unsqueeze(1).expand(B, NA, NB))  # (B, NA, NB)
        else:
            sim = torch.bmm(gather_rows(xs, a), gather_rows(xs, b).transpose(1, 2))  # (B, NA, NB)
        if NB:
            score = sim.masked_fill(~b_ok.unsqueeze(1), float("-inf")).amax(-1)  # (B, NA)
        else:
            score = torch.zeros(B, NA, device=dev)
        score = torch.where(b_ok.any(1, keepdim=True), score, 0.0)  # a lone token: nothing to match
        score = score.masked_fill(~a_ok, float("-inf"))
        a_sorted = a.gather(1, torch.sort(score, dim=1, descending=True, stable=True).indices)
        survivors = a_sorted.gather(1, (ja.unsqueeze(0) + r.unsqueeze(1)).clamp_max(NA - 1))  # (B, NA)
        s_ok = ja < (n_a - r).unsqueeze(1)
        dest_a = torch.where(s_ok, ja.expand(B, NA), W)  # survivors first
        dest_b = torch.where(b_ok, (n_a - r).unsqueeze(1) + jb, W)  # then B
        new = torch.zeros(B, W + 1, dtype=order.dtype, device=dev)
        new.scatter_(1, dest_a, survivors)
        new.scatter_(1, dest_b, b)
        order = new[:, :W]
        n = n - r
    slot_ok = torch.arange(order.shape[1], device=dev) < n.unsqueeze(1)  # (B, W) live sequence entries
    chosen = torch.zeros(B, N + 1, dtype=torch.bool, device=dev)
    chosen.scatter_(1, torch.where(slot_ok, order, N), True)
    out = torch.zeros(B, M + 1, dtype=torch.bool, device=dev)
    out.scatter_(1, torch.where(chosen[:, :N] & ok, idx, M), True)
    return out[:, :M]


def lattice_mask(positions: Tensor, valid: Tensor, pool: Tensor, k: Tensor) -> Tensor:
    """Pool tokens nearest a uniform lattice over each row's image (the ``grid`` completion and
    PruMerge+'s spatially uniform extras).

    Row ``b`` lays ``n_r x n_c >= k`` cell centres over the bounding box of its valid token
    positions (``n_r ~ sqrt(k H / W)``), takes ``k`` of them evenly in raster order, and keeps the
    pool token nearest each (ties to the lower index). Lattice points that share a nearest token
    are filled by the pool tokens closest to any lattice point.

    Args:
        positions: ``(B, M, 2)`` (row, col). valid, pool: ``(B, M)`` bool. k: ``(B,)`` int64.

    Returns:
        ``(B, M)`` bool with exactly ``k[b]`` pool tokens in row ``b``.
    """
    B, M = pool.shape
    dev = pool.device
    pos = positions.to(dev).float()  # (B, M, 2)
    k2 = k.to(dev)
    big = torch.tensor(float("inf"), device=dev)
    lo = torch.where(valid.unsqueeze(-1), pos, big).amin(1)  # (B, 2)
    hi = torch.where(valid.unsqueeze(-1), pos, -big).amax(1)  # (B, 2)
    span = (hi - lo + 1).clamp_min(1)  # (B, 2) rows, cols
    kf = k2.clamp_min(1).double()
    n_r = torch.round(torch.sqrt(kf * span[:, 0].double() / span[:, 1].double())).clamp(1).long()
    n_r = torch.minimum(n_r, k2.clamp_min(1))
    n_c = torch.ceil(kf / n_r.double()).long()  # (B,)
    K = int(k2.max()) if B else 0
    if K == 0:
        return torch.zeros(B, M, dtype=torch.bool, device=dev)
    j = torch.arange(K, device=dev).expand(B, K)  # (B, K) lattice ordinal
    q = torch.div(j * (n_r * n_c).view(B, 1), k2.clamp_min(1).view(B, 1), rounding_mode="floor")
    r, c = torch.div(q, n_c.view(B, 1), rounding_mode="floor"), q % n_c.view(B, 1)
    pts = torch.stack(
        [lo[:, :1] + (r + 0.5) * span[:, :1] / n_r.view(B, 1),
         lo[:, 1:] + (c + 0.5) * span[:, 1:] / n_c.view(B, 1)], -1
    )  # (B, K, 2)
    d = torch.cdist(pts, pos)  # (B, K, M)
    d = d.masked_fill(~pool.unsqueeze(1), float("inf"))
    nearest = d.argmin(-1)  # (B, K) first min = lower index
    on = j < k2.view(B, 1)
    hit = torch.zeros(B, M + 1, dtype=torch.bool, device=dev)
    hit.scatter_(1, torch.where(on, nearest, M), True)
    chosen = hit[:, :M] & pool
    closeness = -d.masked_fill(~on.unsqueeze(-1), float("inf")).amin(1)  # (B, M)
    chosen = chosen | topk_mask(closeness, k2 - chosen.sum(1), pool & ~chosen)
    return chosen
