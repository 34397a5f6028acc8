"""Greedy subset selection over similarities, batched over rows with masks: DivPrune's max-min
diversity (:func:`greedy_max_min`) and CDPruner's DPP MAP (:func:`greedy_dpp_map`). The loops run
over picks, never over tokens or rows."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenprune.ops import accumulation_dtype, argmax_low, compact, gather_rows, row_at, similarity_rows

__all__ = ["greedy_max_min", "greedy_dpp_map"]


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
