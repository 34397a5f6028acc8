"""Batched tensor kernels shared by the stages.

Pure functions, no module state, no Python loop over tokens or batch rows. Every function takes
a validity mask so that rows with different token counts share a batch; padding never wins a
selection. Ties are always broken towards the lower token index, so results are deterministic.

Shape letters: ``B`` batch, ``M`` tokens, ``N`` pool tokens, ``K`` selected/centres, ``D`` width.
"""

from __future__ import annotations

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


def argmax_low(score: Tensor, dtype: torch.dtype) -> Tensor:
    """Row-wise argmax where scores within ``TIE_ULPS`` units of rounding of ``dtype`` of the
    maximum tie, and ties go to the lowest index. ``(B, M) -> (B,)``."""
    top = score.amax(1, keepdim=True)  # (B, 1)
    tol = TIE_ULPS * torch.finfo(dtype).eps * top.abs().clamp_min(1).nan_to_num(0.0)
    return (score >= top - tol).int().argmax(1)  # first true = lowest index


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
