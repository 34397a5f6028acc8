"""Each image through the vision tower once per evaluation, not once per run.

``evaluate`` answers every batch with every run (the unpruned model, then each variant at each
budget), and a pruned forward runs the tower again each time. The v2 tower (DINOv2 ViT-S/14)
costs about 0.3 s per image on two CPU cores, so an evaluation of 40 runs would spend hours
recomputing identical features. :func:`memoized_tower` patches *this instance's* tower so that an
image it has seen with the same arguments is answered from memory:

- the key of an image row is its pixels' digest, the call's keyword arguments, and what the
  active capture recorder wants (:mod:`tokenprune.adapters.capture`), so a run that captures
  [CLS] attention at layer 11 never reuses a row computed without it;
- a call computes only its new rows, in one sub-batch, and stores per row the outputs *and* the
  attention records the capture kernel appended, then replays both, so adapters see exactly what
  the tower returns and records;
- the memory holds at most ``capacity`` rows (least recently used go first).

Rows are computed in smaller batches than the caller's, so values can differ from an unmemoized
call in the last float bits (matmul blocking); ``tests/test_testbed.py`` checks that an evaluation
with and without the memo gives the same predictions. Leaving the ``with`` block restores the
instance's own ``forward``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..adapters import capture

__all__ = ["memoized_tower"]


def _key(row: Tensor) -> bytes:
    return hashlib.blake2b(row.detach().contiguous().cpu().numpy().tobytes(), digest_size=16).digest()


def _call_key(kwargs: dict[str, Any]) -> tuple:
    rec = capture._RECORDER.get()
    wanted = frozenset(rec.wanted.values()) if rec is not None else frozenset()
    if rec is not None and rec.query_weights is not None:
        return ("uncacheable",)  # text-weighted records depend on the prompt, not the image
    return tuple(sorted((k, repr(v)) for k, v in kwargs.items())), wanted


@contextlib.contextmanager
def memoized_tower(model, capacity: int = 128) -> Iterator[dict[str, int]]:
    """Within the block, ``model.model.vision_tower`` answers seen images from memory. Yields a
    dict counting ``hits`` and ``misses`` (image rows)."""
    tower = model.model.vision_tower
    had_own = "forward" in tower.__dict__
    original = tower.forward
    store: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
    stats = {"hits": 0, "misses": 0}

    def forward(pixel_values: Tensor, *args, **kwargs):
        call = _call_key(kwargs)
        if args or call == ("uncacheable",):
            return original(pixel_values, *args, **kwargs)
        keys = [(_key(pixel_values[i]), call) for i in range(pixel_values.shape[0])]
        todo, seen = [], set()
        for i, k in enumerate(keys):  # each new image once, even if it repeats in the batch
            if k not in store and k not in seen:
                seen.add(k)
                todo.append(i)
        if todo:
            _compute(original, pixel_values, kwargs, todo, keys, store)
        stats["misses"] += len(todo)
        stats["hits"] += len(keys) - len(todo)
        rows = [store[k] for k in keys]
        for k in keys:
            store.move_to_end(k)
        while len(store) > capacity:
            store.popitem(last=False)
        return _assemble(rows)

    tower.forward = forward
    try:
        yield stats
    finally:
        if had_own:
            tower.forward = original
        else:
            del tower.forward


def _compute(original, pixel_values: Tensor, kwargs: dict, todo: list[int], keys: list, store: OrderedDict) -> None:
    rec = capture._RECORDER.get()
    before = {k: len(v) for k, v in rec.records.items()} if rec is not None else {}
    out = original(pixel_values[todo], **kwargs)
    added: dict[tuple, list[Tensor]] = {}
    if rec is not None:
        for k, v in rec.records.items():
            added[k] = v[before.get(k, 0):]
            del v[before.get(k, 0):]  # replayed from the rows below, in the caller's order
    for j, i in enumerate(todo):
        store[keys[i]] = {
            "last_hidden_state": out.last_hidden_state[j],
            "pooler_output": None if out.pooler_output is None else out.pooler_output[j],
            "hidden_states": None if out.hidden_states is None else
            tuple(None if h is None else h[j] for h in out.hidden_states),
            "records": {k: [t[j] for t in v] for k, v in added.items()},
            "type": type(out),
        }


def _assemble(rows: list[dict[str, Any]]):
    first = rows[0]
    stack = lambda xs: torch.stack(xs)  # noqa: E731
    hidden = None
    if first["hidden_states"] is not None:
        hidden = tuple(None if h is None else stack([r["hidden_states"][n] for r in rows])
                       for n, h in enumerate(first["hidden_states"]))
    out = first["type"](last_hidden_state=stack([r["last_hidden_state"] for r in rows]),
                        pooler_output=None if first["pooler_output"] is None else
                        stack([r["pooler_output"] for r in rows]),
                        hidden_states=hidden)
    rec = capture._RECORDER.get()
    if rec is not None:
        for k, calls in first["records"].items():
            for n in range(len(calls)):
                rec.records.setdefault(k, []).append(stack([r["records"][k][n] for r in rows]))
    return out
