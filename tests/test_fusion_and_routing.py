"""Fusion against a stacked reference, layer requirements, and the two routers."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, clasp_spec, make_tokens
from hypothesis import given
from hypothesis import strategies as st
from tokenprune_plugins.fusion import ClassAdaptiveFusion, MeanFusion
from tokenprune_plugins.routers import EmbeddingRouter, KeywordRouter

import tokenprune as tp
from tokenprune.classes import CLASSES, STRATEGIES, ClassTable


def _hand_alpha(cells, L: int, min_weight: float) -> torch.Tensor:
    """softmax(tau w_c) per cell (eqs. 25-26), weights below ``min_weight`` dropped (the largest
    kept) and the row renormalised: ``(len(cells), L)``."""
    rows = torch.stack([torch.softmax(cell.temperature * cell.row(L), 0) for cell in cells])
    if min_weight:
        rows = torch.where((rows >= min_weight) | (rows == rows.amax(-1, keepdim=True)), rows, 0.0)
        rows = rows / rows.sum(-1, keepdim=True)
    return rows


@given(B=st.integers(1, 4), M=st.integers(1, 20), L=st.integers(1, 8), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(DTYPES), min_weight=st.sampled_from([0.0, 1e-3, 0.05]))
def test_class_adaptive_fusion_equals_stacked_reference(device, B, M, L, seed, dtype, min_weight):
    tokens = make_tokens(B, M, L=L, dtype=dtype, device=device, seed=seed)
    table = ClassTable.default()
    routing = KeywordRouter().route(tokens.prompts)
    fusion = ClassAdaptiveFusion(min_weight=min_weight)
    fused = fusion.fuse(tokens, routing, table)
    # reference: softmax(tau w_c) per sample, stack all L layers, weighted sum (eqs. 25-26)
    rows = _hand_alpha([table.classes[c] for c in routing.classes], L, min_weight)  # (B, L)
    stacked = torch.stack([tokens.layers[l].double().cpu() for l in range(1, L + 1)], 1)  # (B, L, M, Dv)
    ref = torch.einsum("bl,blmd->bmd", rows.double(), stacked)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert torch.allclose(fused.encoder.double().cpu(), ref, atol=tol, rtol=tol)
    assert torch.allclose(fused.alpha, rows.float(), atol=1e-6)
    assert torch.allclose(fused.alpha.sum(-1), torch.ones(B), atol=1e-6) and (fused.alpha >= 0).all()
    assert fused.encoder.dtype == dtype and fused.decoder.dtype == dtype
    assert fused.feed_llm
    # before the budgets are known, a banded table needs the layers of every cell the rows may use
    cells = [cell for c in routing.classes for cell in (table.classes[c], *table.classes[c].bands)]
    every = _hand_alpha(cells, L, min_weight)  # (cells, L)
    req = fusion.requirements(routing, table, L)
    assert req.layers == {l + 1 for l in range(L) if bool((every[:, l] > 0).any())}


def test_fusion_never_stacks_layers(monkeypatch):
    tokens = make_tokens(2, 8, L=6)
    calls = []
    real = torch.stack
    def spy(tensors, *a, **k):
        if any(t.dim() >= 3 for t in tensors):  # (B, M, Dv) feature maps
            calls.append(len(tensors))
        return real(tensors, *a, **k)

    monkeypatch.setattr(torch, "stack", spy)
    for fusion in (ClassAdaptiveFusion(), MeanFusion()):
        fusion.fuse(tokens, KeywordRouter().route(tokens.prompts), ClassTable.default())
    assert calls == []


def test_strategies_run_shallow_to_deep():
    peaks = [int(tp.classes.strategy_row(s, 24).argmax()) for s in STRATEGIES]
    assert peaks == sorted(peaks) and peaks[0] < 8 and peaks[-1] == 23
    rows = {c: {"strategy": "C", "pivot_ratio": 0.5} for c in tp.CLASSES}
    rows["scene"] = {"strategy": "E", "pivot_ratio": 0.5}
    rows["ocr"] = {"strategy": "A", "pivot_ratio": 0.5}
    table = ClassTable.model_validate({"classes": rows})
    alpha = table.alpha(("scene", "ocr", "counting"), 24, min_weight=1e-3)
    argmax = alpha.argmax(-1).tolist()
    assert argmax[1] < argmax[2] < argmax[0] == 23


KEYWORD_CASES = {
    "What number is written in the box?": "ocr",
    "Read the word on the sign.": "ocr",
    "How many red triangles are there?": "counting",
    "Count the circles.": "counting",
    "Is the star left of the circle?": "spatial",
    "What is above the square?": "spatial",
    "What color is the square?": "attribute",
    "Which shape is purple?": "attribute",
    "Is there a green hexagon?": "existence",
    "Are there any stars?": "existence",
    "What kind of background is this?": "scene",
    "Describe the scene.": "scene",
    "What is the sum of the two digits?": "reasoning",
    "Are there more circles than squares?": "reasoning",
    "Hello.": "general",
}


def test_keyword_router():
    r = KeywordRouter().route(list(KEYWORD_CASES))
    assert dict(zip(KEYWORD_CASES, r.classes, strict=True)) == KEYWORD_CASES
    assert r.confidence.dtype == torch.float32 and ((r.confidence >= 0) & (r.confidence <= 1)).all()
    assert float(r.confidence[-1]) == 0.0


def test_keyword_router_rejects_bad_rules():
    with pytest.raises(ValueError, match="unknown classes"):
        KeywordRouter(keywords={"colour": ("red",)})
    with pytest.raises(ValueError, match="bad regular expression"):
        KeywordRouter(keywords={"ocr": ("(",)})


# Held-out prompts: none of them is an exemplar, and they avoid the exemplars' wording.
EMBEDDING_CASES = {
    "What is the text printed on the t-shirt?": "ocr",
    "How many horses are standing in the field?": "counting",
    "Is the bowl placed to the right of the laptop?": "spatial",
    "What colour are the curtains?": "attribute",
    "Is there a bird in this photograph?": "existence",
    "Was this picture taken at a beach or in a city?": "scene",
}


def test_embedding_router_with_real_minilm():
    r = EmbeddingRouter().route(list(EMBEDDING_CASES))
    assert dict(zip(EMBEDDING_CASES, r.classes, strict=True)) == EMBEDDING_CASES
    assert ((r.confidence > 0) & (r.confidence <= 1)).all()
    assert set(r.classes) <= set(CLASSES)


def test_embedding_router_margin_falls_back_to_general():
    r = EmbeddingRouter(min_margin=2.0).route(["How many cats?"])
    assert r.classes == ("general",)


def test_routing_happens_per_sample_in_a_batch():
    spec = clasp_spec()
    tokens = make_tokens(3, 12)
    tokens = tp.VisualTokens(**{**tokens.__dict__, "prompts": ["How many dogs?", "What is this place?",
                                                             "Read the label."]})
    sel = tp.Pipeline(spec)(tokens, budget=10)
    assert sel.routing.classes == ("counting", "scene", "ocr")
    table = spec.class_table
    assert sel.pivot_ratio.tolist() == pytest.approx([table.classes[c].pivot_ratio for c in sel.routing.classes])
