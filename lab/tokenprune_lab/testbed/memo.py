"""Each image through the vision tower once per evaluation, not once per run.

``evaluate`` answers every batch with every run (the unpruned model, then each variant at each
budget), and a pruned forward runs the tower again each time. The v2 tower (DINOv2 ViT-S/14)
costs about 0.3 s per image on two CPU cores, so an evaluation of 40 runs would spend hours
recomputing identical features. :func:`memoized_tower` patches *this instance's* tower so that an
image it has seen with the same arguments is answered from memory:

- the key of an image row is its pixels' digest and the call's keyword arguments, except which
  hidden states are asked for: a row is computed with *every* hidden state, so one row serves a
  fusion over layers 9-12, another over layers 2-5 and the unpruned forward, and each call gets
  back the states it asked for (the others ``None``, as the tower itself answers);
- a row keeps the attention records the capture kernel appended (:mod:`tokenprune.adapters.capture`)
  per set of records the active recorder wanted, so a run that captures [CLS] attention at layer
  11 never replays a row computed without it; a call without a recorder reuses any row;
- a call computes only its missing rows, in one sub-batch, then replays outputs and records, so
  adapters see exactly what the tower returns and records;
- the memory holds at most ``capacity`` rows (least recently used go first).

**Timing.** A replayed row costs almost nothing, so a run that finds its images in memory would
look faster than one that computed them, and a run whose capture records are new (CLASP's [CLS]
attention) would pay the tower that the others skip. The yielded ``stats`` therefore keep two
clocks: ``tower_seconds``, the wall time actually spent in the tower's ``forward`` (computing and
replaying), and ``charged_seconds``, what the rows served would have cost: each row remembers its
share of the sub-batch that computed it. A timed forward reports ``elapsed - tower_seconds +
charged_seconds`` (:func:`tower_cost`), i.e. as if it had run the tower itself.

Rows are computed in smaller batches than the caller's, so values can differ from an unmemoized
call in the last float bits (matmul blocking); ``tests/test_testbed.py`` checks that an evaluation
with and without the memo gives the same predictions. Leaving the ``with`` block restores the
instance's own ``forward``.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from tokenprune.adapters import capture

__all__ = ["memoized_tower", "tower_cost"]

#: the clock of the timing statistics (a test may replace it)
clock = time.perf_counter


def _key(row: Tensor) -> bytes:
    return hashlib.blake2b(row.detach().contiguous().cpu().numpy().tobytes(), digest_size=16).digest()


def _call_key(kwargs: dict[str, Any]) -> tuple:
    """The keyword arguments that change what the tower computes (every hidden state is always
    computed, so which ones are returned is not part of the key)."""
    return tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k != "output_hidden_states"))


def _wanted() -> frozenset | None:
    """What the active capture recorder wants, ``None`` without one, or ``"uncacheable"``."""
    rec = capture._RECORDER.get()
    if rec is None:
        return None
    if rec.query_weights is not None:
        return "uncacheable"  # text-weighted records depend on the prompt, not the image
    return frozenset(rec.wanted.values())


@contextlib.contextmanager
def memoized_tower(model, capacity: int = 128) -> Iterator[dict[str, int]]:
    """Within the block, ``model.model.vision_tower`` answers seen images from memory. Yields a
    dict counting ``hits`` and ``misses`` (image rows), and the ``tower_seconds`` and
    ``charged_seconds`` clocks (see the module's "Timing")."""
    tower = model.model.vision_tower
    had_own = "forward" in tower.__dict__
    original = tower.forward
    store: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
    stats = {"hits": 0, "misses": 0, "tower_seconds": 0.0, "charged_seconds": 0.0}

    def forward(pixel_values: Tensor, *args, **kwargs):
        t0 = clock()
        try:
            return served(pixel_values, *args, **kwargs)
        finally:
            stats["tower_seconds"] += clock() - t0

    def served(pixel_values: Tensor, *args, **kwargs):
        wanted = _wanted()
        if args or wanted == "uncacheable":
            t0 = clock()
            out = original(pixel_values, *args, **kwargs)
            stats["charged_seconds"] += clock() - t0
            return out
        call = _call_key(kwargs)
        keys = [(_key(pixel_values[i]), call) for i in range(pixel_values.shape[0])]
        todo, seen = [], set()
        for i, k in enumerate(keys):  # each missing image once, even if it repeats in the batch
            if not _serves(store.get(k), wanted) and k not in seen:
                seen.add(k)
                todo.append(i)
        if todo:
            _compute(original, pixel_values, kwargs, todo, keys, store, wanted)
        stats["misses"] += len(todo)
        stats["hits"] += len(keys) - len(todo)
        rows = [store[k] for k in keys]
        stats["charged_seconds"] += sum(r["seconds"] for r in rows)
        for k in keys:
            store.move_to_end(k)
        while len(store) > capacity:
            store.popitem(last=False)
        asked = kwargs.get("output_hidden_states", getattr(tower.config, "output_hidden_states", False))
        return _assemble(rows, asked, wanted)

    tower.forward = forward
    try:
        yield stats
    finally:
        if had_own:
            tower.forward = original
        else:
            del tower.forward


def _serves(row: dict[str, Any] | None, wanted: frozenset | None) -> bool:
    return row is not None and (wanted is None or wanted in row["records"])


def _compute(original, pixel_values: Tensor, kwargs: dict, todo: list[int], keys: list, store: OrderedDict,
             wanted: frozenset | None) -> None:
    rec = capture._RECORDER.get()
    before = {k: len(v) for k, v in rec.records.items()} if rec is not None else {}
    t0 = clock()
    out = original(pixel_values[todo], **{**kwargs, "output_hidden_states": True})
    if pixel_values.is_cuda:
        torch.cuda.synchronize(pixel_values.device)  # the row's cost, not its launch
    share = (clock() - t0) / len(todo)  # (s) each row's part of the sub-batch
    added: dict[tuple, list[Tensor]] = {}
    if rec is not None:
        for k, v in rec.records.items():
            added[k] = v[before.get(k, 0):]
            del v[before.get(k, 0):]  # replayed from the rows below, in the caller's order
    for j, i in enumerate(todo):
        row = store.get(keys[i]) or {"records": {}}
        row.update(
            last_hidden_state=out.last_hidden_state[j],
            pooler_output=None if out.pooler_output is None else out.pooler_output[j],
            hidden_states=tuple(h[j] for h in out.hidden_states),
            type=type(out),
            seconds=share,
        )
        if wanted is not None:
            row["records"][wanted] = {k: [t[j] for t in v] for k, v in added.items()}
        store[keys[i]] = row


@contextlib.contextmanager
def tower_cost(stats: dict[str, float] | None) -> Iterator[dict[str, float]]:
    """Time a block under :func:`memoized_tower`'s ``stats`` (``None``: no memo). Yields a dict
    whose ``seconds``, set on exit, is the block's wall time with the tower counted as if it had
    run: ``elapsed - tower_seconds + charged_seconds`` over the block."""
    out = {"seconds": 0.0}
    before = dict(stats) if stats is not None else None
    t0 = clock()
    try:
        yield out
    finally:
        out["seconds"] = clock() - t0
        if stats is not None:
            out["seconds"] += (stats["charged_seconds"] - before["charged_seconds"]
                               - (stats["tower_seconds"] - before["tower_seconds"]))


def _selected(asked: Any, count: int) -> set[int]:
    """Which of ``count`` hidden states a call's ``output_hidden_states`` asks for."""
    if isinstance(asked, (list, tuple)):
        return {i % count for i in asked}
    return set(range(count)) if asked else set()


def _assemble(rows: list[dict[str, Any]], asked: Any, wanted: frozenset | None):
    first = rows[0]
    stack = lambda xs: torch.stack(xs)  # noqa: E731
    keep = _selected(asked, len(first["hidden_states"]))
    hidden = tuple(stack([r["hidden_states"][n] for r in rows]) if n in keep else None
                   for n in range(len(first["hidden_states"]))) if keep else None
    out = first["type"](last_hidden_state=stack([r["last_hidden_state"] for r in rows]),
                        pooler_output=None if first["pooler_output"] is None else
                        stack([r["pooler_output"] for r in rows]),
                        hidden_states=hidden)
    rec = capture._RECORDER.get()
    if rec is not None:
        records = first["records"][wanted]
        for k, calls in records.items():
            for n in range(len(calls)):
                rec.records.setdefault(k, []).append(stack([r["records"][wanted][k][n] for r in rows]))
    return out
