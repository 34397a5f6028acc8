"""What each published method's paper states, pinned on small hand-made inputs.

VisionZip, VisPruner, CDPruner's DPP, DART, PruMerge+ and pooling, each against a reference
written out by hand here (loops over tokens are fine in a reference).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import make_tokens
from hypothesis import given
from hypothesis import strategies as st
from tokenprune_plugins import greedy, vispruner

import tokenprune as tp
from tokenprune import ops
from tokenprune.contract import Provenance

METHODS = "specs/methods"


def _tokens(B=1, M=16, grid=(4, 4), seed=0, L=24, **kw):
    return make_tokens(B, M, L=L, grid=grid, seed=seed, dtype=torch.float64, **kw)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# -- VisionZip ------------------------------------------------------------------------------------
@given(seed=st.integers(0, 10_000), R=st.integers(2, 16), M=st.integers(4, 30))
def test_visionzip_keeps_top_cls_and_merges_the_rest_into_exactly_contextual_groups(seed, R, M):
    R = min(R, M)
    spec = tp.load_spec(f"{METHODS}/visionzip.toml")
    tokens = _tokens(M=M, grid=(M, 1), seed=seed)
    sel = tp.Pipeline(spec)(tokens, budget=R)
    dominant = math.floor(0.84375 * R + 1e-6)
    contextual = R - dominant
    cls = tokens.signal("cls_attention", -2)[0]
    kept = sel.row(0).tolist()
    prov = sel.provenance[0, : len(kept)].tolist()
    # dominant = top-k [CLS] attention (ties to the lower index), by hand
    top = sorted(range(M), key=lambda i: (-float(cls[i]), i))[:dominant]
    assert sorted(i for i, p in zip(kept, prov, strict=True) if p == Provenance.PIVOT) == sorted(top)
    # contextual targets: every step-th remaining token, by hand
    rest = [i for i in range(M) if i not in top]
    step = max(1, len(rest) // contextual) if contextual else 1
    targets = [rest[j * step] for j in range(contextual)]
    assert sorted(i for i, p in zip(kept, prov, strict=True) if p == Provenance.COMPLETION) == sorted(targets)
    if not contextual:
        return
    # every other token joins its most key-similar target: exactly `contextual` groups
    keys = _unit(tokens.key_features(-2)[0])
    groups = {t: [] for t in targets}
    for i in rest:
        if i not in targets:
            best = max(range(contextual), key=lambda j: (float(keys[i] @ keys[targets[j]]), -j))
            groups[targets[best]].append(i)
    assert sum(len(g) for g in groups.values()) + len(targets) + len(top) == M
    if sel.features is None:  # the whole pool is kept (R = M): nothing to merge, own features
        assert len(targets) == len(rest)
        return
    # merged feature at the target's slot: project(h_target + mean(h_members)), encoder space
    h = tokens.layer(-2)[0]
    feats = sel.features[0]
    for t, members in groups.items():
        merged = h[t] + (h[members].mean(0) if members else 0)
        want = tokens.project(merged[None])[0]
        slot = kept.index(t)
        torch.testing.assert_close(feats[slot], want, atol=1e-9, rtol=1e-9)
    # dominant tokens carry their own (unmerged) features
    own = tokens.project(h[None])[0]
    for i, p in zip(kept, prov, strict=True):
        if p == Provenance.PIVOT:
            torch.testing.assert_close(feats[kept.index(i)], own[i])


def _visionzip_as_released(tokens, R, dominant_ratio=0.84375):
    """VisionZip's released selection on one image, written out from its behaviour: [CLS] + the
    top ``floor(ratio R) - 1`` patches by [CLS] attention (summed over heads) are dominant; the
    other patches, in index order, give ``R - floor(ratio R)`` targets every ``n // c``-th; each
    remaining patch joins its most key-similar target (first on ties); a contextual token is
    ``h_target + mean(h_members)``. Returns (dominant patch indices, {target: feature}, [CLS] feature),
    features projected."""
    dominant = math.floor(dominant_ratio * R + 1e-6)
    attn = tokens.cls_attention[23][0].sum(0)  # (M,) summed over heads, as released
    M = attn.shape[0]
    top = sorted(sorted(range(M), key=lambda i: (-float(attn[i]), i))[: dominant - 1])
    rest = [i for i in range(M) if i not in top]
    c = R - dominant
    step = max(1, len(rest) // c)
    targets = [rest[j] for j in range(0, len(rest), step)][:c]
    keys = _unit(tokens.key_features(-2)[0])
    members = {t: [] for t in targets}
    for i in rest:
        if i not in targets:
            sims = [float(keys[i] @ keys[t]) for t in targets]
            members[targets[sims.index(max(sims))]].append(i)
    h = tokens.layer(-2)[0]
    ctx = {t: tokens.project((h[t] + (h[m].mean(0) if m else 0))[None])[0] for t, m in members.items()}
    return top, ctx, tokens.project(tokens.cls_feature(-2)[0][None])[0]


@given(seed=st.integers(0, 10_000), R=st.integers(2, 14), M=st.integers(16, 30))
def test_visionzip_released_keeps_what_the_released_code_keeps(seed, R, M):
    """The [CLS] takes one dominant place; the LLM receives it in the earliest free slot."""
    from dataclasses import replace

    spec = tp.load_spec(f"{METHODS}/visionzip-released.toml")
    base = _tokens(M=M, grid=(M, 1), seed=seed)
    cls = torch.randn(1, base.reference.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tokens = replace(base, cls_token={23: cls})
    sel = tp.Pipeline(spec)(tokens, budget=R)
    top, ctx, cls_feat = _visionzip_as_released(tokens, R)
    kept = sel.row(0).tolist()
    slot = min(i for i in range(M) if i not in top and i not in ctx)
    assert kept == sorted(top + list(ctx) + [slot]) and len(kept) == R
    feats = sel.features[0]
    own = tokens.project(tokens.layer(-2))[0]
    for i in top:
        torch.testing.assert_close(feats[kept.index(i)], own[i])
    for t, f in ctx.items():
        torch.testing.assert_close(feats[kept.index(t)], f)
    torch.testing.assert_close(feats[kept.index(slot)], cls_feat)


def test_visionzip_released_refuses_pivots_and_towers_without_a_cls_token():
    from tiny_models import build

    spec = tp.load_spec(f"{METHODS}/visionzip-released.toml")
    with pytest.raises(ValueError, match="ratio = 0.0"):
        tp.Pipeline(spec.replace(budget_policy={"stage": "fixed", "ratio": 0.5}))(
            tp.contract.VisualTokens(**{**_tokens().__dict__, "cls_token": {23: torch.zeros(1, 8, dtype=torch.float64)}}),
            budget=8)
    from dataclasses import replace

    with pytest.raises(KeyError, match=r"\[CLS\] hidden state"):
        tp.Pipeline(spec)(replace(_tokens(), cls_token={}), budget=8)
    with pytest.raises(ValueError, match="no \\[CLS\\] token per image"):
        tp.apply(build("llava-next"), spec)


def test_visionzip_without_keys_says_how_to_supply_them():
    spec = tp.load_spec(f"{METHODS}/visionzip.toml")
    tokens = _tokens()
    bare = tp.VisualTokens(layers=tokens.layers, num_layers=24, cls_attention=tokens.cls_attention,
                           project=tokens.project, prompts=["What is it?"])
    with pytest.raises(KeyError, match="attention keys at encoder layer 23"):
        tp.Pipeline(spec)(bare, budget=8)


# -- CDPruner's conditional DPP ------------------------------------------------------------------
def _logdet(L, S):
    if not S:
        return 0.0
    sub = L[list(S)][:, list(S)]
    return float(torch.logdet(sub))


def _naive_greedy(L, k, fixed=()):
    """Greedy MAP by explicit determinants: add the item with the largest log det."""
    S = list(fixed)
    out = []
    for _ in range(k):
        cands = [i for i in range(L.shape[0]) if i not in S]
        best = max(cands, key=lambda i: (_logdet(L, S + [i]), -i))
        S.append(best)
        out.append(best)
    return sorted(out)


@given(seed=st.integers(0, 10_000), M=st.integers(2, 9), D=st.integers(9, 12), k=st.integers(1, 5),
       n_fixed=st.integers(0, 2))
def test_dpp_fast_greedy_equals_determinant_greedy(seed, M, D, k, n_fixed):
    """The incremental-Cholesky greedy picks what explicit log-determinants pick (full rank)."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, M - n_fixed)
    if k < 1:
        return
    x = _unit(torch.randn(1, M, D, generator=g, dtype=torch.float64))
    q = torch.rand(1, M, generator=g, dtype=torch.float64) + 0.5
    L = q[0, :, None] * (x[0] @ x[0].T) * q[0, None, :]
    fixed = list(range(n_fixed))
    sel = torch.zeros(1, M, dtype=torch.bool)
    sel[0, fixed] = True
    got = greedy.greedy_dpp_map(x, q, ~sel, sel, torch.tensor([k]))
    assert got[0].nonzero().flatten().tolist() == _naive_greedy(L, k, fixed)


def test_dpp_greedy_matches_brute_force_map_on_tiny_kernels():
    """On kernels where greedy is exact (orthogonal groups, quality-ordered), the greedy set is
    the brute-force argmax of det(L_S) over all subsets of size k."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        M, D, k = 6, 6, 3
        basis = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
        owner = torch.randint(0, 3, (M,), generator=g)  # 3 groups of identical directions
        x = basis[owner][None]  # (1, M, D): duplicates inside a group, orthogonal across
        q = torch.rand(1, M, generator=g, dtype=torch.float64) + 0.1
        L = q[0, :, None] * (x[0] @ x[0].T) * q[0, None, :]
        k = min(k, len(set(owner.tolist())))
        best = max(itertools.combinations(range(M), k), key=lambda S: (_logdet(L, list(S)) if torch.det(L[list(S)][:, list(S)]) > 1e-12 else -1e9, [-i for i in S]))
        got = greedy.greedy_dpp_map(x, q, torch.ones(1, M, dtype=torch.bool), torch.zeros(1, M, dtype=torch.bool),
                                 torch.tensor([k]))
        assert got[0].nonzero().flatten().tolist() == sorted(best), trial


@given(seed=st.integers(0, 10_000), M=st.integers(2, 9), k=st.integers(1, 4))
def test_dpp_as_released_equals_the_released_rule_written_out(seed, M, k):
    """released = True: quality = min-max of the *negated* relevance plus 1e-6, linear (the
    released code's exp line is commented out), then greedy MAP, by explicit determinants."""
    from tokenprune_plugins.cdpruner import ConditionalDPP

    from tokenprune.stages import CompletionRequest

    g = torch.Generator().manual_seed(seed)
    k = min(k, M)
    x = _unit(torch.randn(1, M, 12, generator=g, dtype=torch.float64))
    phi = torch.rand(1, M, generator=g, dtype=torch.float64)
    rel = -phi[0]
    q = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    L = q[:, None] * (x[0] @ x[0].T) * q[None, :]
    want = _naive_greedy(L, k)
    tokens = tp.VisualTokens(layers={1: x}, num_layers=1)
    valid = torch.ones(1, M, dtype=torch.bool)
    req = CompletionRequest(phi, torch.zeros(1, M, dtype=torch.bool), torch.tensor([k]), valid, tokens, tp.Fused(x, x), x)
    assert ConditionalDPP(released=True).complete(req).mask[0].nonzero().flatten().tolist() == want
    paper = ConditionalDPP().complete(req).mask[0].nonzero().flatten().tolist()
    r = (phi[0] - phi[0].min()) / (phi[0].max() - phi[0].min())
    q = torch.exp(0.5 * r)  # theta = 0.5: alpha = 0.5
    assert paper == _naive_greedy(q[:, None] * (x[0] @ x[0].T) * q[None, :], k)


def test_dpp_relevance_trade_off():
    """theta = 0 ignores relevance; with duplicated features, a high theta keeps the relevant copy."""
    x = _unit(torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64))
    spec = tp.load_spec(f"{METHODS}/cdpruner.toml")
    tokens = tp.VisualTokens(layers={2: x}, num_layers=2, text_embedding=torch.tensor([[0.2, 1.0]], dtype=torch.float64),
                            prompts=["Which?"])
    # relevance = cosine to the text: token 2 most relevant, tokens 0/1 tie
    for theta, want in ((0.0, [0]), (0.9, [2])):
        s = spec.replace(completion={"stage": "dpp", "theta": theta}, fusion={"stage": "single-layer", "layer": -1, "feed": "selection"})
        assert tp.Pipeline(s)(tokens, budget=1).row(0).tolist() == want
    # two picks never take both duplicates
    assert tp.Pipeline(spec.replace(fusion={"stage": "single-layer", "layer": -1, "feed": "selection"}))(
        tokens, budget=2).row(0).tolist() in ([0, 2], [1, 2])


# -- VisPruner --------------------------------------------------------------------------------------
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), M=st.integers(12, 60))
def test_vispruner_rounds_pick_the_same_from_the_matrix_or_per_round_products(seed, B, M):
    """A similarity matrix too big for memory makes each round multiply its own block: the same
    tokens either way (float64, distinct features)."""
    g = torch.Generator().manual_seed(seed)
    x = _unit(torch.randn(B, M, 8, generator=g, dtype=torch.float64))
    keep = torch.rand(B, M, generator=g) < 0.8
    target = (keep.sum(1) // 3).clamp_min(1)
    order = torch.rand(B, M, generator=g)
    cached = vispruner.bipartite_dedup(x, keep, target, 4, order_by=order)
    saved = vispruner.DEDUP_GRAM_BYTES
    try:
        vispruner.DEDUP_GRAM_BYTES = 0
        per_round = vispruner.bipartite_dedup(x, keep, target, 4, order_by=order)
    finally:
        vispruner.DEDUP_GRAM_BYTES = saved
    assert torch.equal(cached, per_round)


def test_vispruner_removes_exact_duplicates_before_distinct_tokens():
    """Four distinct directions, each present twice (neighbours, so the copies fall in opposite
    halves): one round of four removals leaves one of each."""
    basis = torch.eye(4, dtype=torch.float64)
    order = [0, 0, 1, 1, 2, 2, 3, 3]
    x = basis[order][None]  # (1, 8, 4)
    keep = torch.ones(1, 8, dtype=torch.bool)
    got = vispruner.bipartite_dedup(x, keep, torch.tensor([4]), per_round=4)[0]
    assert sorted(order[i] for i in got.nonzero().flatten().tolist()) == [0, 1, 2, 3]


def _vispruner_by_hand(x, keep, target, per_round, order_by):
    """The released algorithm on Python lists, one row."""
    seq = sorted([i for i in range(len(keep)) if keep[i]], key=lambda i: (-float(order_by[i]), i))
    while len(seq) > target:
        a, b = seq[0::2], seq[1::2]
        r = min(per_round, len(seq) - target, len(a))
        score = {i: max((float(x[i] @ x[j]) for j in b), default=0.0) for i in a}
        a_sorted = sorted(a, key=lambda i: -score[i])  # stable: ties keep A's order
        seq = a_sorted[r:] + b
    return sorted(seq)


@given(seed=st.integers(0, 10_000), M=st.integers(1, 40), per_round=st.integers(1, 9), data=st.data())
def test_vispruner_equals_the_released_algorithm_by_hand(seed, M, per_round, data):
    g = torch.Generator().manual_seed(seed)
    B = 2
    x = _unit(torch.randn(B, M, 5, generator=g, dtype=torch.float64))
    keep = torch.rand(B, M, generator=g) < 0.8
    keep[:, 0] = True
    order_by = torch.rand(B, M, generator=g, dtype=torch.float64)
    target = torch.tensor([data.draw(st.integers(0, int(keep[b].sum()))) for b in range(B)])
    got = vispruner.bipartite_dedup(x, keep, target, per_round, order_by=order_by)
    for b in range(B):
        want = _vispruner_by_hand(x[b], keep[b].tolist(), int(target[b]), per_round, order_by[b])
        assert got[b].nonzero().flatten().tolist() == want


def test_vispruner_one_round_by_hand():
    g = torch.Generator().manual_seed(3)
    x = _unit(torch.randn(1, 7, 5, generator=g, dtype=torch.float64))
    keep = torch.ones(1, 7, dtype=torch.bool)
    got = vispruner.bipartite_dedup(x, keep, torch.tensor([5]), per_round=2)[0]
    A, Bset = [0, 2, 4, 6], [1, 3, 5]
    dup = {a: max(float(x[0, a] @ x[0, b]) for b in Bset) for a in A}
    drop = sorted(A, key=lambda a: (-dup[a], a))[:2]
    assert got.nonzero().flatten().tolist() == [i for i in range(7) if i not in drop]


# -- DART -------------------------------------------------------------------------------------------
def test_dart_each_pivot_takes_its_share_of_the_least_similar_tokens():
    spec = tp.load_spec(f"{METHODS}/dart.toml")
    tokens = _tokens(M=24, grid=(4, 6), seed=5)
    R = 16
    sel = tp.Pipeline(spec)(tokens, budget=R)
    pipe = tp.Pipeline(spec)
    routing = pipe.route(tokens.prompts)
    fused = spec.fusion.fuse(tokens, routing, spec.class_table)
    phi = spec.scoring.score(tokens, fused)[0]
    u = _unit(fused.decoder[0])
    P = math.floor(0.0625 * R + 1e-6)
    pivots = sorted(range(24), key=lambda i: (-float(phi[i]), i))[:P]
    left = [i for i in range(24) if i not in pivots]
    base, extra = divmod(R - P, P)
    chosen = list(pivots)
    for a, p in enumerate(pivots):  # pivots in descending phi
        quota = base + (a < extra)
        take = sorted(left, key=lambda i: (float(u[i] @ u[p]), i))[:quota]
        chosen += take
        left = [i for i in left if i not in take]
    assert sel.row(0).tolist() == sorted(chosen)


# -- PruMerge+ ---------------------------------------------------------------------------------------
def test_prumerge_plus_keeps_iqr_outliers_then_uniform_extras_and_merges_by_hand():
    M = 36
    tokens = _tokens(M=M, grid=(6, 6), seed=7)
    cls = torch.full((1, 1, M), 0.01, dtype=torch.float64)
    cls[0, 0, [5, 17, 30]] = torch.tensor([0.4, 0.3, 0.2], dtype=torch.float64)  # three outliers
    cls = cls + 0.001 * torch.arange(M, dtype=torch.float64)  # no ties
    tokens = tp.VisualTokens(**{**tokens.__dict__, "cls_attention": {23: cls}})
    spec = tp.load_spec(f"{METHODS}/prumerge-plus.toml").replace(
        completion={"stage": "prumerge+", "neighbours": 3, "key_layer": -2})
    sel = tp.Pipeline(spec)(tokens, budget=8)
    kept = sel.row(0).tolist()
    phi = cls[0, 0]
    q1, q3 = torch.quantile(phi, 0.25), torch.quantile(phi, 0.75)
    outliers = [i for i in range(M) if phi[i] > q3 + 1.5 * (q3 - q1)]
    assert set(outliers) == {5, 17, 30} and set(outliers) <= set(kept)
    # the other 5 are the pool tokens nearest a uniform lattice
    extras = [i for i in kept if i not in outliers]
    pool = torch.ones(1, M, dtype=torch.bool)
    pool[0, outliers] = False
    lattice = ops.lattice_mask(tokens.positions, torch.ones(1, M, dtype=torch.bool), pool, torch.tensor([5]))
    assert extras == lattice[0].nonzero().flatten().tolist()
    assert len({i // 6 for i in extras}) == 2 and len({i % 6 for i in extras}) >= 3  # 2 x 3 lattice
    # merge: phi-weighted mean of the kept token and its 3 most key-similar pruned tokens
    keys = _unit(tokens.key_features(-2)[0])
    pruned = [i for i in range(M) if i not in kept]
    h = tokens.layer(-2)[0]
    for slot, i in enumerate(kept):
        nb = sorted(pruned, key=lambda j: (-float(keys[i] @ keys[j]), j))[:3]
        w = torch.stack([phi[j] for j in [i] + nb])
        merged = (w[:, None] * h[[i] + nb]).sum(0) / w.sum()
        torch.testing.assert_close(sel.features[0, slot], tokens.project(merged[None])[0])


# -- pooling ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window,grid,want", [(2, (4, 4), [0, 2, 8, 10]), (3, (5, 5), [0, 3, 15, 18]),
                                              (2, (3, 5), [0, 2, 4, 10, 12, 14])])
def test_pool_keeps_one_token_per_cell_at_its_top_left_with_the_cell_mean(window, grid, want):
    M = grid[0] * grid[1]
    tokens = _tokens(M=M, grid=grid, seed=1)
    spec = tp.load_spec(f"{METHODS}/pool-2x2.toml").replace(completion={"stage": "pool", "window": window})
    sel = tp.Pipeline(spec)(tokens)
    assert sel.row(0).tolist() == want
    dec = tokens.project(tokens.layer(-2))[0]  # (M, D)
    for slot, i in enumerate(want):
        r0, c0 = divmod(i, grid[1])
        cell = [r * grid[1] + c for r in range(r0, min(r0 + window, grid[0])) for c in range(c0, min(c0 + window, grid[1]))]
        torch.testing.assert_close(sel.features[0, slot], dec[cell].mean(0))


def test_pool_counts_on_llava_grid_and_clear_errors():
    tokens = make_tokens(2, 576, L=24, grid=(24, 24))
    for window, n in ((2, 144), (3, 64)):
        spec = tp.load_spec(f"{METHODS}/pool-{window}x{window}.toml")
        assert tp.Pipeline(spec)(tokens).counts.tolist() == [n, n]
        with pytest.raises(ValueError, match="decides how many tokens"):
            tp.Pipeline(spec)(tokens, budget=100)
        with pytest.raises(ValueError, match="ratio = 0.0"):
            tp.Pipeline(spec.replace(budget_policy={"stage": "fixed", "ratio": 0.5}))(tokens)


# -- image down-sampling ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava-dinov2"])
def test_downsample_feeds_the_resized_images_tokens_in_the_first_slots(family):
    """Also on a tower whose ``image_size`` (98) is not the input's (56), like testbed v2's DINOv2."""
    import torch.nn.functional as F
    from tiny_models import IMG, batch, build, samples
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    m = build(family)
    inp = batch(m, family, samples(family, 2, seed=5))
    spec = tp.load_spec(f"{METHODS}/downsample.toml")
    with torch.no_grad():
        with tp.apply(m, spec, budget=10) as h:  # floor(sqrt(10)) = 3: a 3x3-patch image
            got = m(**inp).logits
            assert h.last.kept.tolist() == [9, 9] and h.last.total.tolist() == [16, 16]
        for b in range(2):
            keep = inp["attention_mask"][b].bool()
            ids = inp["input_ids"][b, keep]
            img = (ids == IMG).nonzero().flatten()
            cols = torch.tensor(sorted(set(range(len(ids))) - set(img[9:].tolist())))
            small = F.interpolate(inp["pixel_values"][b : b + 1], size=(42, 42), mode="bicubic", antialias=True,
                                  align_corners=False)
            feats = m.model.get_image_features(pixel_values=small, vision_feature_layer=-2,
                                               vision_feature_select_strategy="default", interpolate_pos_encoding=True,
                                               return_dict=True).pooler_output[0]
            ref = m(input_ids=ids[cols][None], attention_mask=torch.ones(1, len(cols), dtype=torch.long),
                    position_ids=cols[None], mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[feats])})
            src = h.last.source[b]
            torch.testing.assert_close(got[b][src >= 0], ref.logits[0])


def test_downsample_errors_name_the_fix():
    from tiny_models import build

    spec = tp.load_spec(f"{METHODS}/downsample.toml")
    with pytest.raises(ValueError, match="max_pixels"):
        tp.apply(build("qwen2-vl"), spec)
    with pytest.raises(ValueError, match="LLaVA-1.5 only"):
        tp.apply(build("llava-next"), spec)
    with pytest.raises(ValueError, match="use one of them"):
        spec.replace(llm={"stage": "fastv"})


# -- through a real model ---------------------------------------------------------------------------
def test_adapter_captures_the_keys_visionzip_reads():
    """The keys VisionZip merges by are layer -2's attention keys, averaged over heads, [CLS] dropped."""
    from tiny_models import batch, build, samples

    m = build("llava")
    inp = batch(m, "llava", samples("llava", 2, seed=1))
    spec = tp.load_spec(f"{METHODS}/visionzip.toml")
    seen = {}
    orig = spec.completion.__class__.complete

    def spy(self, req):
        seen["keys"] = req.tokens.key_features(-2)
        return orig(self, req)

    tower = m.model.vision_tower
    with torch.no_grad():
        hs = tower(inp["pixel_values"], output_hidden_states=True).hidden_states
        layer = tower.encoder.layers[-2]
        x = layer.layer_norm1(hs[-3])  # the input of the layer that makes hidden state -2
        k = layer.self_attn.k_proj(x).view(2, x.shape[1], layer.self_attn.num_heads, -1)
        want = k.mean(2)[:, 1:]  # (N, M, Dh)
        try:
            spec.completion.__class__.complete = spy
            with tp.apply(m, spec, budget=8):
                m(**inp)
        finally:
            spec.completion.__class__.complete = orig
    torch.testing.assert_close(seen["keys"], want)


def test_visionzip_released_through_llava_feeds_the_cls_hidden_state():
    """Through the tiny LLaVA: the LLM's input at the [CLS] slot is the projected [CLS] hidden
    state of tower layer -2, and the image keeps exactly the budget."""
    from tiny_models import batch, build, samples

    m = build("llava")
    inp = batch(m, "llava", samples("llava", 2, seed=3))
    spec = tp.load_spec(f"{METHODS}/visionzip-released.toml")
    seen = {}
    lm = m.model.language_model

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    tower = m.model.vision_tower
    with torch.no_grad():
        hs = tower(inp["pixel_values"], output_hidden_states=True).hidden_states
        want = m.model.multi_modal_projector(hs[-2][:, :1])[:, 0]  # (N, D) projected [CLS]
        hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with tp.apply(m, spec, budget=8) as h:
                m(**inp)
                sel = h.last
        finally:
            hook.remove()
    assert sel.kept.tolist() == [8, 8]
    for b in range(2):
        row = seen["embeds"][b]
        hits = [(row - want[b]).abs().amax(-1).lt(1e-5).nonzero().flatten().tolist()]
        assert len(hits[0]) == 1, "the [CLS] feature reaches the LLM exactly once per image"


def test_pooling_through_apply_feeds_cell_means_at_top_left_slots():
    from tiny_models import IMG, batch, build, samples
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    m = build("llava")
    inp = batch(m, "llava", samples("llava", 2, seed=2))
    with torch.no_grad():
        with tp.apply(m, f"{METHODS}/pool-2x2.toml") as h:  # 4 x 4 grid -> 4 tokens
            got = m(**inp).logits
            assert h.last.kept.tolist() == [4, 4]
        for b in range(2):
            keep = inp["attention_mask"][b].bool()
            ids = inp["input_ids"][b, keep]
            img = (ids == IMG).nonzero().flatten()
            slots = [0, 2, 8, 10]
            cols = torch.tensor(sorted(set(range(len(ids))) - set(img.tolist()) | set(img[slots].tolist())))
            own = m.model.get_image_features(pixel_values=inp["pixel_values"][b : b + 1], vision_feature_layer=-2,
                                             vision_feature_select_strategy="default", return_dict=True).pooler_output[0]
            cells = [[s, s + 1, s + 4, s + 5] for s in slots]
            feats = torch.stack([own[c].mean(0) for c in cells])
            ref = m(input_ids=ids[cols][None], attention_mask=torch.ones(1, len(cols), dtype=torch.long),
                    position_ids=cols[None], mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[feats])})
            torch.testing.assert_close(got[b][h.last.source[b] >= 0], ref.logits[0])


@given(seed=st.integers(0, 10_000), n_fixed=st.integers(0, 3))
def test_dpp_reading_gram_rows_equals_per_pick_products(seed, n_fixed):
    """Large inputs read rows of a precomputed similarity matrix; the picks are the same."""
    g = torch.Generator().manual_seed(seed)
    B, M, D, k = 3, 40, 16, 10
    x = _unit(torch.randn(B, M, D, generator=g, dtype=torch.float64))
    q = torch.rand(B, M, generator=g, dtype=torch.float64) + 0.5
    sel = torch.zeros(B, M, dtype=torch.bool)
    sel[:, :n_fixed] = True
    rows = greedy.greedy_dpp_map(x, q, ~sel, sel, torch.full((B,), k))
    gram = greedy.greedy_dpp_map(x, q, ~sel, sel, torch.full((B,), k), gram=ops.similarity_rows(x, force=True))
    assert torch.equal(rows, gram)


@given(st.lists(st.tuples(st.lists(st.integers(0, 5000), max_size=24, unique=True),
                          st.lists(st.booleans(), min_size=24, max_size=24)), min_size=1, max_size=4))
def test_python_set_order_is_cpython_set_iteration(rows):
    """DART as released visits its pivots as `list(set(indices))`: the batched replay of CPython's
    set table gives that order for any keys (collisions, resizes, large keys) and any skipped ones."""
    from tokenprune_plugins.dart import python_set_order

    A = max(len(keys) for keys, _ in rows)
    keys = torch.tensor([keys + list(range(6000, 6000 + A - len(keys))) for keys, _ in rows], dtype=torch.long).view(len(rows), A)
    ok = torch.tensor([mask[:A] for _, mask in rows], dtype=torch.bool).view(len(rows), A) & (torch.arange(A) < torch.tensor(
        [len(k) for k, _ in rows]).unsqueeze(1))
    order = python_set_order(keys, ok)
    for b in range(len(rows)):
        inserted = [int(keys[b, a]) for a in range(A) if ok[b, a]]
        n = len(inserted)
        assert [int(keys[b, j]) for j in order[b, :n]] == list(set(inserted))
        assert not ok[b, order[b, n:]].any()
