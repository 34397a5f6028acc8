"""The output contract of each stage kind, as checks that return the problem or ``None``.

The pipeline, the in-LLM site and the conformance kit (:mod:`tokenprune.testing`) run the same
checks; each kind's record in :data:`tokenprune.stages.KINDS` names its check. A check never
raises: the caller puts the stage's name in front of the problem (:func:`tokenprune.registry.stage_label`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection

import torch
from torch import Tensor

from .contract import Fused, Requirements, Routing, VisualTokens, normalize_layer

__all__ = ["check_routing", "check_fused", "check_scores", "check_mask", "check_pivot_ratio", "check_schedule",
           "first_non_finite", "non_finite_scores", "non_finite_signals"]

Problem = str | None


def check_routing(routing: object, prompts: int, classes: Collection[str]) -> Problem:
    """A router's answer: a :class:`Routing` with one class of ``classes`` per prompt."""
    if not isinstance(routing, Routing):
        return f"returned {type(routing).__name__}; expected a tokenprune.contract.Routing"
    if len(routing.classes) != prompts:
        return f"returned {len(routing.classes)} classes for {prompts} prompts"
    unknown = sorted(set(routing.classes) - set(classes))
    if unknown:
        return f"returned classes {unknown} that the class table does not have (it has {sorted(classes)})"
    conf = routing.confidence
    if conf.dtype != torch.float32 or bool(((conf < 0) | (conf > 1) | conf.isnan()).any()):
        return f"returned confidences {conf.tolist()} ({conf.dtype}); expected float32 in [0, 1]"
    return None


def check_fused(fused: object, batch: int, tokens: int) -> Problem:
    """A fusion's answer: encoder ``(B, M, Dv)`` and decoder ``(B, M, D)``; layer weights, when
    given, rows that sum to 1."""
    if not isinstance(fused, Fused):
        return f"returned {type(fused).__name__}; expected a tokenprune.contract.Fused"
    for name in ("encoder", "decoder"):
        t = getattr(fused, name)
        if t.dim() != 3 or t.shape[:2] != (batch, tokens):
            return f"returned {name} of shape {tuple(t.shape)}; expected ({batch}, {tokens}, ·)"
    if fused.alpha is not None and not math.isclose(float(fused.alpha.sum(-1).mean()), 1.0, abs_tol=1e-4):
        return "returned layer weights alpha whose rows do not sum to 1"
    return None


def check_scores(phi: object, valid: Tensor) -> Problem:
    """A scorer's answer: ``(B, M)`` float32. (Finite on real tokens is checked apart, by
    :func:`non_finite_scores`: NaN scores usually come from NaN inputs, a ``ValueError``.)"""
    if not isinstance(phi, Tensor) or phi.shape != valid.shape or phi.dtype != torch.float32:
        got = f"{tuple(phi.shape)} {phi.dtype}" if isinstance(phi, Tensor) else type(phi).__name__
        return f"returned {got}; expected {tuple(valid.shape)} float32"
    return None


def first_non_finite(valid: Tensor, *values: Tensor) -> tuple[int, int, int] | None:
    """``(row, token, count)`` of the first real token (``valid`` ``(B, M)``) whose values in any
    of ``values`` (each ``(B, M, ...)``) hold NaN or inf, and how many real tokens do; ``None``
    when all are finite. One reduction per tensor on the happy path."""
    bad = torch.zeros_like(valid)
    for t in values:
        flat = t if t.dim() == 2 else t.sum(tuple(range(2, t.dim())), dtype=torch.float32)
        bad |= ~torch.isfinite(flat) & valid  # (B, M); inf/NaN survive the sum
    if not bool(bad.any()):
        return None
    b, m = bad.nonzero()[0].tolist()
    return b, m, int(bad.sum())


def non_finite_scores(phi: Tensor, valid: Tensor) -> Problem:
    """Scores on real tokens that are NaN or inf."""
    found = first_non_finite(valid, phi)
    if found is None:
        return None
    b, m, n = found
    return (f"gave a non-finite score (NaN or inf) at row {b}, token {m} ({n} real tokens in the "
            "batch): check what it reads (attention maps, keys, text embedding) for NaN/inf")


def check_mask(mask: object, keep: Tensor, allowed: Tensor) -> Problem:
    """A selection, completion or in-LLM answer: a bool mask of ``allowed``'s shape with exactly
    ``keep[b]`` true entries in row ``b``, all inside ``allowed``."""
    if not isinstance(mask, Tensor) or mask.shape != allowed.shape or mask.dtype != torch.bool:
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        return f"returned {got}; expected {tuple(allowed.shape)} bool"
    if bool((mask & ~allowed).any()):
        rows = (mask & ~allowed).any(1).nonzero().flatten().tolist()
        return f"chose tokens outside its candidates (padding, or already-kept tokens) in rows {rows}"
    counts = mask.sum(1)
    if not torch.equal(counts, keep.to(mask.device)):
        return f"chose {counts.tolist()} tokens per row; the budget asks for {keep.tolist()}"
    return None


def check_schedule(schedule: list[int], num_layers: int) -> Problem:
    """An in-LLM stage's schedule for an LLM of ``num_layers`` decoder layers: strictly ascending
    layers ``K`` in ``1..num_layers - 1``."""
    if not schedule:
        return "returned an empty schedule; it must name at least one layer"
    if any(not 1 <= k < num_layers for k in schedule):
        return (f"prunes before decoder layers {schedule}, but this LLM has {num_layers} layers: each K must be in "
                f"1..{num_layers - 1}; set [llm] layer(s) for this model")
    if any(b <= a for a, b in itertools.pairwise(schedule)):
        return f"returned layers {schedule}; they must be strictly ascending"
    return None


def check_pivot_ratio(ratio: object, batch: int) -> Problem:
    """A budget policy's answer: ``(B,)`` ratios in ``[0, 1]``."""
    if not isinstance(ratio, Tensor) or ratio.shape != (batch,) or not ratio.dtype.is_floating_point \
            or bool(((ratio < 0) | (ratio > 1) | ratio.isnan()).any()):
        got = ratio.tolist() if isinstance(ratio, Tensor) else type(ratio).__name__
        return f"returned {got}; expected {batch} float ratios in [0, 1]"
    return None


def non_finite_signals(tokens: VisualTokens, need: Requirements) -> str | None:
    """The first attention map, key set, [CLS] state or text embedding that ``need`` names and
    that holds NaN or inf on a real token, as a problem naming the signal, the layer, the row and
    the token; ``None`` when all are finite. One reduction per signal."""
    valid = tokens.valid()
    tables = [("cls_attention", tokens.cls_attention, need.cls_attention),
              ("received_attention", tokens.received_attention, need.received_attention),
              ("attention_keys", tokens.attention_keys, need.attention_keys)]
    for name, table, layers in tables:
        for key, value in table.items():
            layer = normalize_layer(key, tokens.num_layers)
            if layer not in layers:
                continue
            per_token = value if name == "attention_keys" else (value.sum(1) if value.dim() == 3 else value)
            if (found := first_non_finite(valid, per_token)) is not None:
                b, m, n = found
                return (f"{name} at encoder layer {layer} is not finite (NaN or inf) at row {b}, token {m} "
                        f"({n} real tokens in the batch)")
    rows = torch.ones(valid.shape[0], 1, dtype=torch.bool, device=valid.device)
    cls_layers = {normalize_layer(k, tokens.num_layers): v for k, v in tokens.cls_token.items()}
    pooled = [(f"cls_token at encoder layer {layer}", v) for layer, v in cls_layers.items() if layer in need.cls_token]
    if need.text_embedding and tokens.text_embedding is not None:
        pooled.append(("text_embedding", tokens.text_embedding))
    for name, value in pooled:  # (B, D): one vector per row
        if (found := first_non_finite(rows, value.unsqueeze(1))) is not None:
            return f"{name} is not finite (NaN or inf) at row {found[0]}"
    return None
