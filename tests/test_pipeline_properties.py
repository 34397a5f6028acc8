"""Invariants of every pipeline, over random shapes, budgets, ratios, dtypes and devices."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import DTYPES, batches, clasp_spec, make_tokens, permute, row, snapshot
from hypothesis import assume, example, given
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune.contract import Provenance

# Each entry swaps stages of specs/clasp.toml; () is CLASP itself.
VARIANTS = {
    "clasp": {},
    "fusion=single-layer": {"fusion": {"stage": "single-layer", "layer": -2}},
    "fusion=mean": {"fusion": {"stage": "mean"}},
    "scoring=random": {"scoring": {"stage": "random", "seed": 3}},
    "scoring=feature-norm": {"scoring": {"stage": "feature-norm"}},
    "scoring=received-attention": {"scoring": {"stage": "received-attention", "layer": 3}},
    "scoring=text-similarity": {"scoring": {"stage": "text-similarity"}},
    "completion=none": {"completion": {"stage": "none"}},
    "completion=random": {"completion": {"stage": "random", "seed": 5}},
    "completion=grid": {"completion": {"stage": "grid"}},
    "completion=divprune": {"completion": {"stage": "divprune"}},
    "completion=visionzip": {"completion": {"stage": "visionzip", "key_layer": 3}},
    "completion=vispruner": {"completion": {"stage": "vispruner", "per_round": 3}},
    "completion=dpp": {"completion": {"stage": "dpp"}},
    "completion=dart": {"completion": {"stage": "dart"}},
    "completion=prumerge+": {"completion": {"stage": "prumerge+", "key_layer": 3, "neighbours": 4}},
    "policy=fixed-0.3": {"budget_policy": {"stage": "fixed", "ratio": 0.3}},
    "router=embedding": {"router": {"stage": "embedding"}},
}
PERMUTATION_INVARIANT = [
    "clasp", "fusion=mean", "scoring=feature-norm", "scoring=text-similarity",
    "completion=none", "completion=divprune", "completion=dpp", "completion=dart", "completion=vispruner",
]


def _reference_topk(phi: torch.Tensor, valid: torch.Tensor, k: int) -> set[int]:
    """Hand-built: sort valid tokens by (-phi, index) and take the first k."""
    idx = [i for i in range(phi.shape[0]) if valid[i]]
    return set(sorted(idx, key=lambda i: (-float(phi[i]), i))[:k])


def _run(spec, tokens, budget):
    return tp.Pipeline(spec)(tokens, budget=budget)


@pytest.mark.parametrize("variant", list(VARIANTS))
@given(case=batches(), dtype=st.sampled_from(DTYPES))
def test_selection_contract(variant, device, case, dtype):
    """Exact budget; unique sorted in-range non-padding indices; pivots = top-K1 by phi and are
    kept; provenance counts; alpha a distribution; inputs untouched; deterministic."""
    spec = clasp_spec(**VARIANTS[variant])
    tokens = make_tokens(case["B"], case["M"], dtype=dtype, device=device, seed=case["seed"],
                         valid_counts=case["valid_counts"])
    before, originals = snapshot(tokens)
    sel = _run(spec, tokens, case["budget"])
    for old, new in zip(before, originals, strict=True):
        assert torch.equal(old, new), "an input tensor was modified"
    again = _run(spec, tokens, case["budget"])
    assert torch.equal(sel.indices, again.indices) and torch.equal(sel.provenance, again.provenance)

    B, M = case["B"], case["M"]
    valid = tokens.valid().cpu()
    R = tp.resolve_budget(case["budget"], valid.sum(1))
    routing = dataclasses.replace(tp.Pipeline(spec).route(tokens.prompts), budgets=R)  # bands read R
    fused = spec.fusion.fuse(tokens, routing, spec.class_table)
    phi = spec.scoring.score(tokens, fused).cpu()
    a = spec.budget_policy.pivot_ratio(routing, spec.class_table).double()
    for b in range(B):
        kept = sel.row(b).cpu()
        assert len(kept) == int(R[b]) == min(int(valid[b].sum()), int(R[b]))
        assert torch.equal(kept, torch.sort(kept).values) and len(set(kept.tolist())) == len(kept)
        assert all(0 <= i < M and valid[b, i] for i in kept.tolist())
        prov = sel.provenance[b, : len(kept)].cpu()
        assert (sel.provenance[b, len(kept):] == Provenance.PAD).all()
        pivots = set(kept[prov == Provenance.PIVOT].tolist())
        k1 = math.floor(float(a[b]) * int(R[b]) + 1e-6)
        assert len(pivots) == k1
        assert pivots == _reference_topk(phi[b], valid[b], k1)
        assert int((prov == Provenance.COMPLETION).sum()) == int(R[b]) - k1
    if sel.alpha is not None:
        assert (sel.alpha >= 0).all()
        assert torch.allclose(sel.alpha.sum(-1), torch.ones(B), atol=1e-5)
    if sel.features is not None:
        assert sel.features.shape[:2] == sel.indices.shape and sel.features.dtype == dtype


@pytest.mark.parametrize("variant", list(VARIANTS))
@given(case=batches(max_B=3), dtype=st.sampled_from(DTYPES))
def test_batch_independence(variant, device, case, dtype):
    """Row b of a batched call equals the call on sample b alone."""
    spec = clasp_spec(**VARIANTS[variant])
    tokens = make_tokens(case["B"], case["M"], dtype=dtype, device=device, seed=case["seed"],
                         valid_counts=case["valid_counts"])
    budget = case["budget"]
    sel = _run(spec, tokens, budget)
    for b in range(case["B"]):
        one = _run(spec, row(tokens, b), budget if isinstance(budget, int) else [budget[b]])
        assert torch.equal(sel.row(b), one.row(0))
        assert torch.equal(sel.provenance[b, : int(sel.counts[b])], one.provenance[0, : int(one.counts[0])])


@pytest.mark.parametrize("variant", PERMUTATION_INVARIANT)
@given(case=batches(max_B=2, min_M=2), perm_seed=st.integers(0, 2**31 - 1))
# more picks than the features' rank: the DPP's gains fall to the float32 noise of its Gram matrix
@example(case={"B": 1, "M": 20, "valid_counts": [20], "seed": 0, "budget": 18}, perm_seed=0)
def test_permutation_equivariance(variant, device, case, perm_seed):
    """Permuting the tokens permutes the selection (float64, so no rounding ties)."""
    spec = clasp_spec(**VARIANTS[variant])
    tokens = make_tokens(case["B"], case["M"], dtype=torch.float64, device=device, seed=case["seed"],
                         valid_counts=case["valid_counts"])
    R = tp.resolve_budget(case["budget"], tokens.valid().sum(1))
    routing = dataclasses.replace(tp.Pipeline(spec).route(tokens.prompts), budgets=R.cpu())  # bands read R
    a = spec.budget_policy.pivot_ratio(routing, spec.class_table)
    assume(bool((torch.floor(a.to(R.device) * R + 1e-6) >= 1).all()))  # seeding by order needs K1 = 0
    perm = torch.randperm(case["M"], generator=torch.Generator().manual_seed(perm_seed))
    sel = _run(spec, tokens, case["budget"])
    sel_p = _run(spec, permute(tokens, perm), case["budget"])
    for b in range(case["B"]):
        mapped = sorted(perm[sel_p.row(b).cpu()].tolist())
        assert mapped == sel.row(b).tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
@given(case=batches(max_B=3), extra=st.integers(0, 5))
def test_budget_at_least_valid_keeps_all(variant, device, case, extra):
    spec = clasp_spec(**VARIANTS[variant])
    tokens = make_tokens(case["B"], case["M"], device=device, seed=case["seed"],
                         valid_counts=case["valid_counts"])
    sel = _run(spec, tokens, case["M"] + extra)
    assert torch.equal(sel.token_mask(case["M"]), tokens.valid())


@given(case=batches(), dtype=st.sampled_from(DTYPES))
def test_ratio_one_is_pure_top_r(device, case, dtype):
    """a = 1: every kept token is a pivot and the set is the top-R by phi."""
    spec = clasp_spec(budget_policy={"stage": "fixed", "ratio": 1.0})
    tokens = make_tokens(case["B"], case["M"], dtype=dtype, device=device, seed=case["seed"],
                         valid_counts=case["valid_counts"])
    sel = _run(spec, tokens, case["budget"])
    valid = tokens.valid()
    R = tp.resolve_budget(case["budget"], valid.sum(1))
    top = tp.ops.topk_mask(tokens.signal("cls_attention", 3), R, valid)
    assert torch.equal(sel.token_mask(case["M"]), top)
    assert ((sel.provenance == Provenance.PIVOT) | (sel.provenance == Provenance.PAD)).all()


@pytest.mark.parametrize("completion", ["clasp", "none", "random", "grid", "divprune"])
@given(case=batches(), dtype=st.sampled_from(DTYPES))
def test_ratio_zero_is_pure_completion(completion, device, case, dtype):
    """a = 0: no pivots; the result is exactly the completion stage's choice from all tokens."""
    spec = clasp_spec(budget_policy={"stage": "fixed", "ratio": 0.0}, completion={"stage": completion})
    tokens = make_tokens(case["B"], case["M"], dtype=dtype, device=device, seed=case["seed"],
                         valid_counts=case["valid_counts"])
    sel = _run(spec, tokens, case["budget"])
    assert ((sel.provenance == Provenance.COMPLETION) | (sel.provenance == Provenance.PAD)).all()
    valid = tokens.valid()
    R = tp.resolve_budget(case["budget"], valid.sum(1))
    routing = dataclasses.replace(tp.Pipeline(spec).route(tokens.prompts), budgets=R.cpu())  # bands read R
    fused = spec.fusion.fuse(tokens, routing, spec.class_table)
    phi = spec.scoring.score(tokens, fused)
    req = tp.stages.CompletionRequest(phi, torch.zeros_like(valid), R, valid, tokens, fused)
    if torch.equal(R, valid.sum(1)):
        expected = valid
    else:
        expected = spec.completion.complete(req).mask
    assert torch.equal(sel.token_mask(case["M"]), expected)


def test_fused_features_reach_the_llm_only_when_the_fusion_feeds_it():
    """``feed = "llm"`` (the paper): the kept tokens carry the fused features; ``feed =
    "selection"`` (specs/clasp.toml): they carry none, so the LLM reads its own layer."""
    spec = clasp_spec()
    tokens = make_tokens(2, 10, seed=1)
    fusion = spec.resolved()["fusion"]
    paper = spec.replace(fusion={**fusion, "feed": "llm"})
    sel = _run(paper, tokens, 4)
    routing = dataclasses.replace(tp.Pipeline(paper).route(tokens.prompts), budgets=torch.full((2,), 4))
    fused = paper.fusion.fuse(tokens, routing, paper.class_table)
    assert torch.allclose(sel.features, sel.gather(fused.decoder))
    own = _run(spec.replace(fusion={**fusion, "feed": "selection"}), tokens, 4)
    assert own.features is None and torch.equal(own.indices, sel.indices)


# -- stages that fix their own count, and the in-LLM pruners ----------------------------------
@pytest.mark.parametrize("window", [1, 2, 3])
@given(case=batches(max_B=3, max_M=30), dtype=st.sampled_from(DTYPES), cols=st.integers(1, 6))
def test_pool_contract(window, device, case, dtype, cols):
    """One token per non-empty cell, at the cell's first valid token; inputs untouched; batched
    rows equal solo rows; merged features in the input dtype."""
    M = case["M"]
    grid = (math.ceil(M / cols), cols) if M % cols == 0 else (M, 1)
    spec = tp.load_spec("specs/methods/pool-2x2.toml").replace(completion={"stage": "pool", "window": window})
    tokens = make_tokens(case["B"], M, dtype=dtype, device=device, seed=case["seed"],
                         valid_counts=case["valid_counts"], grid=grid)
    before, originals = snapshot(tokens)
    sel = _run(spec, tokens, None)
    for old, new in zip(before, originals, strict=True):
        assert torch.equal(old, new)
    valid = tokens.valid().cpu()
    pos = tokens.positions.cpu().long()
    for b in range(case["B"]):
        cells: dict[tuple[int, int], int] = {}
        for i in range(M):  # by hand: first valid token of each cell
            if valid[b, i]:
                cells.setdefault((int(pos[b, i, 0]) // window, int(pos[b, i, 1]) // window), i)
        assert sel.row(b).tolist() == sorted(cells.values())
        one = _run(spec, row(tokens, b), None)
        assert torch.equal(one.row(0), sel.row(b))
    if sel.features is not None:
        assert sel.features.dtype == dtype


@pytest.mark.parametrize("pruner", ["fastv", "pyramid-drop", "dart"])
@given(N=st.integers(1, 4), M=st.integers(1, 30), T=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(DTYPES), data=st.data())
def test_llm_pruner_select_contract(pruner, device, N, M, T, seed, dtype, data):
    """Exactly keep[n] valid tokens per image; rows independent; inputs untouched."""
    from tokenprune.stages import LlmRequest

    stage = tp.load_spec("specs/clasp.toml").replace(llm={"stage": pruner}).llm
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(N, M, generator=g) < 0.8
    valid[:, 0] = True
    keep = torch.tensor([data.draw(st.integers(0, int(valid[n].sum()))) for n in range(N)])
    D = 8
    req = LlmRequest(
        layer=2, step=0, hidden=torch.randn(N, M, D, generator=g).to(device, dtype), valid=valid.to(device),
        keep=keep.to(device), attention=torch.rand(N, M, generator=g).to(device),
        key_norms=torch.rand(N, M, generator=g).to(device), text_hidden=torch.randn(N, T, D, generator=g).to(device, dtype),
        text_valid=torch.ones(N, T, dtype=torch.bool, device=device), text_key_norms=torch.rand(N, T, generator=g).to(device),
        norm=lambda h: h,
    )
    snap = [t.clone() for t in (req.hidden, req.attention, req.key_norms, req.text_hidden)]
    got = stage.select(req)
    assert got.shape == (N, M) and got.dtype == torch.bool
    assert not bool((got & ~req.valid).any()) and got.sum(1).tolist() == keep.tolist()
    for old, new in zip(snap, (req.hidden, req.attention, req.key_norms, req.text_hidden), strict=True):
        assert torch.equal(old, new)
    for n in range(N):
        one = LlmRequest(2, 0, req.hidden[n : n + 1], req.valid[n : n + 1], req.keep[n : n + 1],
                         req.attention[n : n + 1], req.key_norms[n : n + 1], req.text_hidden[n : n + 1],
                         req.text_valid[n : n + 1], req.text_key_norms[n : n + 1], req.norm)
        assert torch.equal(stage.select(one)[0], got[n])
