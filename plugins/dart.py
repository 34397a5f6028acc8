"""DART (Wen et al., EMNLP 2025), reimplemented from the paper: keep the tokens least duplicated
with a few pivots.

- ``dart`` completion (pre-LLM): the pivots are the pipeline's (``feature-norm`` scoring with
  ``top-k``); the completion adds the pool tokens least similar to them.
- ``dart`` LLM pruner (layer 2): pivots are the tokens with the largest key norms (4 image +
  4 text tokens in the paper) at layer ``K - 1``; it needs no attention maps.

In both, each pivot in turn takes its share of the budget: the remaining tokens least
cosine-similar to it, so later pivots cannot take what earlier ones took.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenprune import hookimpl, ops
from tokenprune.stages import Completion, CompletionRequest, CompletionResult, LlmPruner, LlmRequest


def least_duplicated(x: Tensor, anchors: Tensor, anchor_ok: Tensor, open_: Tensor, k: Tensor) -> Tensor:
    """DART's duplication rule, batched over rows.

    Anchor ``a`` (in column order) takes ``floor(k / A) + (a < k mod A)`` of the still-open
    tokens with the lowest cosine similarity to it (ties to the lower index), ``A`` the row's
    anchor count. The loop runs over anchor ordinals, never over tokens or rows.

    Args:
        x: ``(B, M, D)`` unit vectors of the candidates.
        anchors: ``(B, A, D)`` unit vectors of the pivots; ``anchor_ok`` ``(B, A)`` bool.
        open_: ``(B, M)`` bool candidates. k: ``(B,)`` int64 picks (``<= open_.sum(1)``).

    Returns:
        ``(B, M)`` bool with exactly ``k[b]`` picks (all from ``open_``).
    """
    B, M, _ = x.shape
    A = anchor_ok.sum(1)  # (B,)
    k = k.to(x.device)
    base = torch.div(k, A.clamp_min(1), rounding_mode="floor")
    extra = k - base * A.clamp_min(1)
    picked = torch.zeros(B, M, dtype=torch.bool, device=x.device)
    for a in range(anchors.shape[1]):
        on = anchor_ok[:, a]
        quota = torch.where(on, base + (a < extra).long(), 0)  # (B,)
        sim = torch.bmm(x, anchors[:, a].unsqueeze(-1)).squeeze(-1).float()  # (B, M)
        picked = picked | ops.topk_mask(sim, quota, open_ & ~picked, largest=False)
    return picked


#: CPython's set table constants (Objects/setobject.c): slots probed linearly before a jump, the
#: perturbation shift, and the initial table size.
_LINEAR_PROBES, _PERTURB_SHIFT, _SET_MINSIZE = 9, 5, 8


def python_set_order(keys: Tensor, ok: Tensor) -> Tensor:
    """The order in which CPython iterates ``set(keys[b][ok[b]])``, batched: ``keys`` ``(N, A)``
    non-negative int64 in insertion order, distinct within a row; ``ok`` ``(N, A)`` bool, the
    keys inserted (the others are skipped).

    DART's released code visits its pivots as ``for item in list(set(image_indices +
    query_indices))``, so the order is that of CPython's hash table: small ints hash to
    themselves, a key lands at slot ``key & mask`` or the first free slot of CPython's probe
    sequence (9 linear probes when they fit, then ``i = 5 i + 1 + perturb``), the table grows
    from 8 slots when it is 3/5 full (rehashing in slot order), and iteration is slot order. This
    replays those insertions for all rows at once; the loops run over the ``A`` keys and their
    probes, never over rows.

    Returns:
        ``(N, A)`` int64: column ``j`` of the result is the column of ``keys`` visited ``j``-th;
        the invalid columns come last.
    """
    N, A = keys.shape
    dev = keys.device
    cap = _set_size(A)
    table = torch.full((N, cap), -1, dtype=torch.long, device=dev)  # column of keys held per slot
    mask = torch.full((N,), _SET_MINSIZE - 1, dtype=torch.long, device=dev)
    used = torch.zeros(N, dtype=torch.long, device=dev)
    for a in range(A):
        table = _set_insert(table, mask, keys[:, a], torch.full_like(used, a), ok[:, a])
        used = used + ok[:, a].long()
        grow = ok[:, a] & (used * 5 >= mask * 3)  # CPython: fill * 5 >= mask * 3 -> resize
        if bool(grow.any()):
            size = torch.full_like(mask, _SET_MINSIZE)
            for _ in range(cap.bit_length()):  # smallest power of two > used * 4
                size = torch.where(size <= used * 4, size * 2, size)
            table, mask = _set_rehash(table, mask, keys, grow, size - 1)
    cols = torch.where(table >= 0, table, A)  # (N, cap)
    pos = torch.arange(cap, device=dev).expand(N, cap)
    slot = torch.full((N, A + 1), cap, dtype=torch.long, device=dev).scatter_(1, cols, pos)[:, :A]
    return slot.argsort(dim=1, stable=True)


def _set_size(n: int) -> int:
    """Slots of a CPython set after ``n`` insertions of distinct keys."""
    size = _SET_MINSIZE
    for used in range(1, n + 1):
        if used * 5 >= (size - 1) * 3:
            size = _SET_MINSIZE
            while size <= used * 4:
                size *= 2
    return size


def _set_insert(table: Tensor, mask: Tensor, key: Tensor, value: Tensor, on: Tensor) -> Tensor:
    """Put ``value`` where CPython's probe sequence for ``key`` first finds a free slot (rows ``on``)."""
    N, cap = table.shape
    i = key & mask  # (N,)
    perturb = key.clone()
    todo = on.clone()
    span = torch.arange(_LINEAR_PROBES + 1, device=table.device)  # slot i, then 9 linear probes
    while bool(todo.any()):
        probe = i.unsqueeze(1) + span  # (N, 10)
        reach = (span == 0) | (i + _LINEAR_PROBES <= mask).unsqueeze(1)  # linear probes only if they fit
        free = reach & (table.gather(1, probe.clamp_max(cap - 1)) < 0)
        found = todo & free.any(1)
        at = i + free.long().argmax(1)  # first free slot
        table = table.scatter(1, torch.where(found, at, 0).unsqueeze(1),
                              torch.where(found, value, table[:, 0]).unsqueeze(1))
        todo = todo & ~found
        perturb = perturb >> _PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask
    return table


def _set_rehash(table: Tensor, mask: Tensor, keys: Tensor, grow: Tensor, new_mask: Tensor) -> tuple[Tensor, Tensor]:
    """CPython's resize for rows ``grow``: re-insert the held keys, in slot order, into an empty
    table of ``new_mask + 1`` slots."""
    fresh = torch.where(grow.unsqueeze(1), -1, table)
    for j in range(table.shape[1]):  # old slots in order (loop over slots, not rows)
        col = table[:, j]
        on = grow & (col >= 0) & (j <= mask)
        if bool(on.any()):
            key = keys.gather(1, col.clamp_min(0).unsqueeze(1)).squeeze(1)  # (N,) the key held there
            fresh = _set_insert(fresh, torch.where(grow, new_mask, mask), key, col, on)
    return fresh, torch.where(grow, new_mask, mask)


class DartCompletion(Completion):
    """Pre-LLM DART: the pivots' shares of ``K2``, least duplicated with each pivot in turn
    (pivots in descending ``phi``). A row without pivots uses its highest-``phi`` pool token as the
    one pivot and keeps it [ours]."""

    def complete(self, req: CompletionRequest) -> CompletionResult:
        x, pool, k2 = req.unit, req.pool, req.k2.to(req.pool.device)
        B, M, _ = x.shape
        no_piv = ~req.pivots.any(1) & (k2 > 0)  # (B,)
        seed = ops.topk_mask(req.scores, no_piv.long(), pool)  # (B, M) virtual pivot
        anchors_mask = req.pivots | seed
        order = torch.where(anchors_mask, req.scores.float(), float("-inf"))
        P = int(anchors_mask.sum(1).max()) if B else 0
        top = order.topk(P, dim=1)  # (B, P); P = 0 gives empty rows
        a_idx, a_ok = top.indices, torch.isfinite(top.values)
        picked = least_duplicated(x, ops.gather_rows(x, a_idx), a_ok, pool & ~seed, k2 - seed.sum(1))
        return CompletionResult(picked | seed)


class DartLlm(LlmPruner):
    """In-LLM DART at layer ``K`` (paper: 2): pivots are the ``image_pivots`` visual tokens and the
    ``text_pivots`` question tokens with the largest key norms at layer ``K - 1``; the image
    pivots are kept, and the rest of the budget is shared among all pivots by
    :func:`least_duplicated` over the visual tokens' hidden states after the LLM's final norm
    (as the released code compares them).

    Two modes (``docs/methods.md`` lists the differences):

    - ``released = False`` (tokenprune): the L2 key norm over all heads (rotation-invariant, so a
      left-padded row picks what the same prompt alone picks), exactly ``R`` tokens kept, pivots
      visited image pivots first, then text pivots, each in token order.
    - ``released = True``: what the authors' released code keeps on the same inputs: the L1 norm
      of the rotated keys; every pivot takes ``floor(R / (image_pivots + text_pivots))`` tokens
      and the image pivots are kept besides, so ``image_pivots + A floor(R / A)`` tokens remain
      (68 at R = 64 with 4 + 4 pivots); pivots visited in the order CPython iterates the set of
      their sequence indices (:func:`python_set_order`). Its key norms depend on absolute
      positions, so a left-padded row may pick other pivots than the same prompt alone.
    """

    layer: int = Field(2, ge=1, description="K: the first decoder layer that sees the pruned sequence")
    image_pivots: int = Field(4, ge=0, description="visual pivot tokens (kept)")
    text_pivots: int = Field(4, ge=0, description="question-text pivot tokens")
    released: bool = Field(False, description="select as the authors' released code does (L1 norm of rotated "
                                              "keys, image_pivots + A floor(R / A) tokens, set-order pivots)")
    reads: ClassVar[frozenset[str]] = frozenset({"key_norms"})
    #: pivots share the budget in token order (and, as released, in set order of the indices)
    permutation_invariant: ClassVar[bool] = False

    @property
    def key_norm(self) -> Literal["l2", "l1-rotated"]:
        """The key norm the site records for :meth:`select`."""
        return "l1-rotated" if self.released else "l2"

    def schedule(self, num_layers: int) -> list[int]:
        return [self.layer]

    def keep_counts(self, total: Tensor, budget: Tensor, steps: int) -> list[Tensor]:
        if not self.released:
            return super().keep_counts(total, budget, steps)
        A = max(self.image_pivots + self.text_pivots, 1)
        kept = self.image_pivots + A * torch.div(budget, A, rounding_mode="floor")  # (N,)
        return [torch.where(budget >= total, total, torch.minimum(kept, total))]

    def select(self, req: LlmRequest) -> Tensor:
        N, M, D = req.hidden.shape
        k = req.keep.to(req.hidden.device)
        n_img = torch.minimum(torch.full_like(k, self.image_pivots), k)
        n_txt = torch.minimum(torch.full_like(k, self.text_pivots), req.text_valid.sum(1))
        if self.released:  # by descending norm: the released list is image_indices + query_indices
            i_idx, i_ok = _top_columns(req.read("key_norms"), n_img, req.valid, self.image_pivots)  # (N, Pi)
            t_idx, t_ok = _top_columns(req.read("text_key_norms"), n_txt, req.text_valid, self.text_pivots)  # (N, Pt)
        else:  # each kind's pivots in token order
            i_idx, i_ok = ops.compact(ops.topk_mask(req.read("key_norms"), n_img, req.valid))
            t_idx, t_ok = ops.compact(ops.topk_mask(req.read("text_key_norms"), n_txt, req.text_valid))
        img_piv = torch.zeros(N, M + 1, dtype=torch.bool, device=k.device)
        img_piv = img_piv.scatter_(1, torch.where(i_ok, i_idx, M), True)[:, :M]  # (N, M)
        x = ops.unit(req.norm(req.hidden))  # (N, M, D)
        t = ops.unit(req.norm(req.text_hidden))  # (N, T, D)
        anchors = torch.cat([ops.gather_rows(x, i_idx), ops.gather_rows(t, t_idx)], 1)  # (N, A, D)
        ok = torch.cat([i_ok, t_ok], 1)  # (N, A)
        if self.released:  # the released loop visits set(image_indices + query_indices)
            if req.index is None or req.text_index is None:
                raise ValueError("dart released = true needs LlmRequest.index and text_index (the tokens' "
                                 "indices in their prompts); the in-LLM site supplies them")
            seq = torch.cat([req.index.gather(1, i_idx), req.text_index.gather(1, t_idx)], 1)  # (N, A)
            order = python_set_order(seq, ok)  # (N, A)
            anchors, ok = ops.gather_rows(anchors, order), ok.gather(1, order)
        picked = least_duplicated(x, anchors, ok, req.valid & ~img_piv, k - n_img)
        # a row without any pivot (both pivot counts 0, or no text) keeps its top key norms [ours]
        bare = ~ok.any(1)
        if bool(bare.any()):
            top = ops.topk_mask(req.read("key_norms"), torch.where(bare, k - n_img, 0), req.valid & ~img_piv)
            picked = torch.where(bare.unsqueeze(1), top, picked)
        return picked | img_piv


def _top_columns(score: Tensor, n: Tensor, valid: Tensor, most: int) -> tuple[Tensor, Tensor]:
    """The ``n[b]`` highest-scoring valid columns of each row, best first (ties to the lower
    column): ``(B, most)`` int64 indices and ``(B, most)`` bool."""
    B, M = score.shape
    most = min(most, M)
    key = score.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :most]  # (B, most)
    ok = torch.arange(most, device=score.device).expand(B, most) < n.view(B, 1)
    return order, ok


@hookimpl
def register_completions(register):
    register("dart", DartCompletion)


@hookimpl
def register_llm_pruners(register):
    register("dart", DartLlm)
