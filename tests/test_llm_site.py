"""The in-LLM pruning site (FastV, PyramidDrop, DART) on tiny LLaVA, Qwen2/2.5-VL and Qwen3-VL models.

Equivalences: dropping nothing reproduces the unpruned logits and generations; the pruned run
equals a per-sample forward built by hand (the attention row, key norms and selection computed
here from the layers' weights, the later layers run on the kept columns at their original
positions); batched runs equal per-sample runs; ``generate`` with the KV cache equals a greedy
loop that recomputes everything without a cache.
"""

from __future__ import annotations

import functools
import math
import sys

import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import IMG, VID, Sample, _qwen_patch, batch, build, greedy_token, samples

import tokenprune as tp
from tokenprune.adapters import UnsupportedModel

FAMILIES = ("llava", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl")
#: the LLaVA families whose images end their grid rows with newline slots
NEWLINES = ("llava-next", "llava-onevision")
LAYERS = 4  # decoder layers of the tiny LLMs here
TOL = {"cpu": dict(atol=1e-5, rtol=1e-5), "cuda": dict(atol=1e-4, rtol=1e-4)}
BASE = tp.load_spec("specs/clasp.toml").replace(
    router={"stage": "fixed"},
    fusion={"stage": "single-layer", "layer": -2, "feed": "selection"},
    scoring={"stage": "feature-norm"},
    completion={"stage": "none"},
    budget_policy={"stage": "fixed", "ratio": 1.0},
)
PRUNERS = {
    "fastv": {"stage": "fastv", "layer": 2},
    "fastv-text": {"stage": "fastv", "layer": 1, "query": "text"},
    "pyramid-drop": {"stage": "pyramid-drop", "layers": [1, 2, 3]},
    "dart": {"stage": "dart", "layer": 2, "image_pivots": 2, "text_pivots": 2},
    "dart-released": {"stage": "dart", "layer": 2, "image_pivots": 2, "text_pivots": 2, "released": True},
    # Qwen3-VL adds deepstack features after decoder layers 0 and 1 (the tiny model's two): from layer 3 on
    "fastv-late": {"stage": "fastv", "layer": 3},
    "dart-late": {"stage": "dart", "layer": 3, "image_pivots": 2, "text_pivots": 2},
}
#: (family, pruner) pairs: Qwen3-VL with steps before its deepstack layers end (fastv at 2, pyramid-drop
#: at 1) and after them (the -late ones)
CASES = [(f, p) for f in (*FAMILIES, "qwen3-vl") for p in PRUNERS]


def kept_counts(name: str, M: int, budget: int) -> list[int]:
    """Visual tokens left after each step of the schedule, by hand: geometric steps ending at the
    budget; DART as released keeps its image pivots plus ``floor(R / A)`` tokens per pivot."""
    cfg = PRUNERS[name]
    if cfg.get("released"):
        A = cfg["image_pivots"] + cfg["text_pivots"]
        return [M if budget >= M else min(M, cfg["image_pivots"] + A * (budget // A))]
    n = len(cfg.get("layers") or [cfg["layer"]])
    return [budget if s == n - 1 else max(budget, min(M, round(M * (budget / M) ** ((s + 1) / n)))) for s in range(n)]


def spec(pruner: str) -> tp.PipelineSpec:
    return BASE.replace(llm=PRUNERS[pruner])


@functools.cache
def model(family: str, device: str = "cpu"):
    return build(family, text_layers=LAYERS).to(device)


def inputs(m, family: str, smp: list[Sample], device: str) -> dict:
    return {k: v.to(device) for k, v in batch(m, family, smp).items()}


def solo(inp: dict, b: int, family: str) -> dict:
    """Sample ``b`` (one image each) as its own unpadded batch of one."""
    keep = inp["attention_mask"][b].bool()
    out = {"input_ids": inp["input_ids"][b, keep][None], "attention_mask": inp["attention_mask"][b, keep][None]}
    if family.startswith("llava"):
        out["pixel_values"] = inp["pixel_values"][b : b + 1]
        if family in NEWLINES:
            out["image_sizes"] = inp["image_sizes"][b : b + 1]
        if family == "llava-onevision":
            out["batch_num_images"] = inp["batch_num_images"][b : b + 1]
    else:
        grid = inp["image_grid_thw"]
        n = grid.prod(-1)
        start = int(n[:b].sum())
        out["pixel_values"] = inp["pixel_values"][start : start + int(n[b])]
        out["image_grid_thw"] = grid[b : b + 1]
        out["mm_token_type_ids"] = inp["mm_token_type_ids"][b, keep][None]
    return out


# -- the reference, by hand -------------------------------------------------------------------------
def _rotary(attn):
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def _qk(layer, h, pe):
    """Queries and keys of ``layer`` for hidden states ``h`` (1, S, D), after rotary embedding."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    Dh = attn.head_dim
    q = attn.q_proj(x).view(1, h.shape[1], -1, Dh)  # (1, S, H, Dh)
    k = attn.k_proj(x).view(1, h.shape[1], -1, Dh)  # (1, S, Hkv, Dh)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = _rotary(attn)(q.transpose(1, 2), k.transpose(1, 2), *pe)  # (1, H, S, Dh), (1, Hkv, S, Dh)
    return q, k, attn.scaling


def _attention_rows(layer, h, pe):
    """Causal softmax attention probabilities of every query, head-averaged: (S, S)."""
    q, k, scale = _qk(layer, h, pe)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q @ k.transpose(-1, -2)).float() * scale  # (1, H, S, S)
    S = h.shape[1]
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=h.device).triu(1), float("-inf"))
    return s.softmax(-1)[0].mean(0)  # (S, S)


def _top(scores: list[float], k: int, largest: bool = True) -> list[int]:
    """Positions of the k best scores, ties to the lower position (sorted by hand)."""
    order = sorted(range(len(scores)), key=lambda i: ((-scores[i]) if largest else scores[i], i))
    return order[:k]


def _hand_select(name: str, layer, h, out, pe, img, text, keep, final_norm) -> list[int]:
    """The visual tokens to keep, chosen by hand: ``h`` enters layer ``K - 1`` (attention and
    keys), ``out`` leaves it (DART's similarities); ``img`` / ``text`` are positions of the
    image's visual tokens and of the question's tokens."""
    cfg = PRUNERS[name]
    if cfg["stage"] in ("fastv", "pyramid-drop"):
        a = _attention_rows(layer, h, pe)  # (S, S)
        if cfg.get("query", "last") == "last":
            row = a[-1]
        else:
            row = a[text].mean(0)
        return sorted(img[i] for i in _top([float(row[j]) for j in img], keep))
    # DART: key-norm pivots, then each pivot in turn takes its share of the least similar
    _, k, _ = _qk(layer, h, pe)
    released = cfg.get("released", False)
    kn = k[0].abs().sum((0, 2)) if released else k[0].square().sum((0, 2)).sqrt()  # (S,) L1 of rotated keys / L2
    n_img = min(cfg["image_pivots"], keep)
    top_img = [img[i] for i in _top([float(kn[j]) for j in img], n_img)]  # by descending norm
    n_txt = min(cfg["text_pivots"], len(text))
    top_txt = [text[i] for i in _top([float(kn[j]) for j in text], n_txt)]
    piv_img, piv_txt = sorted(top_img), sorted(top_txt)
    x = torch.nn.functional.normalize(final_norm(out)[0].float(), dim=-1)  # (S, D)
    anchors = piv_img + piv_txt
    if released:  # the released loop: `for item in list(set(image_indices + query_indices))`
        anchors = list(set(top_img + top_txt))  # positions = prompt indices (one unpadded prompt)
    left = [j for j in img if j not in piv_img]
    need = keep - n_img
    base, extra = divmod(need, max(len(anchors), 1))
    chosen = list(piv_img)
    for a_i, a in enumerate(anchors):
        quota = base + (1 if a_i < extra else 0)
        sims = [float(x[j] @ x[a]) for j in left]
        take = [left[i] for i in _top(sims, quota, largest=False)]
        chosen += take
        left = [j for j in left if j not in take]
    return sorted(chosen)


def hand_forward(m, family, name, one, budget, extra=(), fixed=None):
    """One unpadded sample through the LLM by hand: layers < K on every column; at each step the
    kept visual columns (chosen by hand, or ``fixed`` per step); later layers on the kept columns
    at their original positions. ``extra`` token ids are appended as already-generated text.

    Returns the logits (S', V) and the kept columns (indices into the prompt) per step.
    """
    ids = one["input_ids"][0]
    S = len(ids)
    all_ids = torch.cat([ids, torch.tensor(list(extra), dtype=ids.dtype, device=ids.device)])
    h = m.get_input_embeddings()(all_ids)[None].clone()  # (1, S + E, D)
    is_img = (all_ids == IMG) | (all_ids == VID)  # the sample's one image or one video
    deepstack = []  # Qwen3-VL: added at the visual columns after the first layers
    for token, pixels, grid in ((IMG, "pixel_values", "image_grid_thw"), (VID, "pixel_values_videos", "video_grid_thw")):
        if pixels not in one:
            continue
        if family == "llava-onevision":  # the config's own feature layer and strategy
            own = m.model.get_image_features(one[pixels], one["image_sizes"], batch_num_images=one["batch_num_images"],
                                             return_dict=True)
        elif family.startswith("llava"):
            sizes = {"image_sizes": one["image_sizes"]} if family == "llava-next" else {}
            own = m.model.get_image_features(one[pixels], vision_feature_layer=-2,
                                             vision_feature_select_strategy="default", return_dict=True, **sizes)
        else:
            get = m.model.get_image_features if token == IMG else m.model.get_video_features
            own = get(one[pixels], one[grid], return_dict=True)
        h[0, all_ids == token] = torch.cat(list(own.pooler_output)).to(h.dtype)
        deepstack = [torch.cat(list(d)) for d in getattr(own, "deepstack_features", None) or []]
    newline, grid_row = next_layout(m, one, len(all_ids)) if family in NEWLINES else (None, None)
    if family.startswith("llava"):
        pos = torch.arange(len(all_ids), device=ids.device)[None]
    else:
        p, _ = m.model.get_rope_index(one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"],
                                      image_grid_thw=one.get("image_grid_thw"), video_grid_thw=one.get("video_grid_thw"),
                                      attention_mask=one["attention_mask"])
        tail = p[..., -1:] + 1 + torch.arange(len(extra), device=ids.device)
        pos = torch.cat([p, tail], -1)  # (3, 1, S + E)
    lm = m.model.language_model
    cfg = PRUNERS[name]
    schedule = cfg.get("layers") or [cfg["layer"]]
    is_tok = is_img if newline is None else is_img & ~newline  # newlines are structural, never candidates
    M = int(is_tok.sum())
    counts = kept_counts(name, M, budget)
    last_img = int(is_img.nonzero().max())
    cols = list(range(len(all_ids)))
    kept = []
    h_prev, cols_prev = h, list(cols)  # the input of the previous layer (a pruning layer reads it)
    h_out = h  # the previous layer's output before its deepstack features (what a step selects from)
    for l, layer in enumerate(lm.layers):
        if l in schedule:
            step = schedule.index(l)
            img = [i for i, c in enumerate(cols) if c < S and is_tok[c]]
            text = [i for i, c in enumerate(cols) if last_img < c < S]
            if fixed is None:
                pe_prev = lm.rotary_emb(h_prev, pos[..., cols_prev])
                sel = _hand_select(name, lm.layers[l - 1], h_prev, h_out, pe_prev, img, text, counts[step], lm.norm)
                keep_cols = {cols[i] for i in sel}
                if newline is not None:  # a newline stays when a token of its grid row does
                    rows = {int(grid_row[c]) for c in keep_cols if grid_row[c] >= 0}
                    keep_cols |= {c for c in cols if c < S and newline[c] and int(grid_row[c]) in rows}
            else:
                keep_cols = set(fixed[step])
            kept.append(sorted(keep_cols))
            idx = [i for i, c in enumerate(cols) if not (c < S and is_img[c]) or c in keep_cols]
            h = h[:, idx]
            cols = [cols[i] for i in idx]
        h_prev, cols_prev = h, list(cols)
        pe = lm.rotary_emb(h, pos[..., cols])
        h = h_out = layer(h, attention_mask=None, position_embeddings=pe, position_ids=None)
        if l < len(deepstack):  # Qwen3-VL adds its deepstack features after the first layers, to the tokens still there
            h = h.clone()
            vis = [i for i, c in enumerate(cols) if c < S and is_img[c]]
            rank = (is_img.long().cumsum(0) - 1)[[cols[i] for i in vis]]  # each kept token's row in the features
            h[0, vis] += deepstack[l][rank].to(h.dtype)
    return m.lm_head(lm.norm(h))[0], kept


def next_layout(m, one: dict, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA-NeXT and -OneVision by hand: which of the sample's columns are row newlines, and each placeholder's
    grid row (-1 for the base crop). The packed order is the base crop, then each row of the
    unpadded grid followed by its newline; the model's own packer says where the newlines are."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = m.config
    size = one["image_sizes"][0]
    crops = image_size_to_num_patches(image_size=size.tolist(), grid_pinpoints=cfg.image_grid_pinpoints,
                                      patch_size=cfg.vision_config.image_size)
    Mc = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    marks = torch.zeros(crops, Mc, 1, dtype=torch.float64)
    line = torch.ones(1, dtype=torch.float64)
    if "batch_num_images" in one:  # LLaVA-OneVision (its grid may be resized; one image per prompt here)
        packed, _ = m.model.pack_image_features([marks], one["image_sizes"], image_newline=line,
                                                vision_aspect_ratio=cfg.vision_aspect_ratio)
    else:
        packed, _ = m.model.pack_image_features([marks], one["image_sizes"], "default", image_newline=line)
    is_line = packed[0][:, 0] == 1  # (P,) slot j of the image is a newline
    row = is_line.long().cumsum(0) - is_line.long()  # newlines strictly before each slot
    row[:Mc if crops > 1 else 0] = -1  # the base crop belongs to no grid row
    ids = one["input_ids"][0]
    cols = (ids == IMG).nonzero().flatten().cpu()
    newline = torch.zeros(length, dtype=torch.bool)
    grid_row = torch.full((length,), -1, dtype=torch.long)
    newline[cols], grid_row[cols] = is_line, row
    return newline.to(ids.device), grid_row.to(ids.device)


# -- 1. dropping nothing reproduces the model ----------------------------------------------------
@pytest.mark.parametrize("family, pruner", CASES)
def test_dropping_nothing_reproduces_unpruned_logits_and_generate(family, pruner):
    m = model(family)
    inp = inputs(m, family, samples(family, 3, seed=2), "cpu")
    with torch.no_grad():
        ref = m(**inp).logits
        ref_gen = m.generate(**inp, max_new_tokens=5, do_sample=False)
        with tp.apply(m, spec(pruner), budget=1.0) as h:
            got = m(**inp).logits
            gen = m.generate(**inp, max_new_tokens=5, do_sample=False)
            assert all(torch.equal(k, h.last.total) for k in h.last.llm_kept)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(gen, ref_gen)


# -- 2. the pruned run equals the forward built by hand ------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family, pruner", CASES)
def test_pruned_logits_equal_hand_built_reference(family, pruner, device):
    m = model(family, device)
    smp = samples(family, 3, seed=1)
    inp = inputs(m, family, smp, device)
    budget = 9 if PRUNERS[pruner].get("released") else 3  # released DART: 2 pivots + 2 per pivot
    with torch.no_grad(), tp.apply(m, spec(pruner), budget=budget) as h:
        got = m(**inp).logits  # (B, S'', V)
        rec = h.last
        assert rec.llm_kept[-1].tolist() == [kept_counts(pruner, int(M), budget)[-1] for M in rec.total]
        for b in range(len(smp)):
            one = solo(inp, b, family)
            ref, kept = hand_forward(m, family, pruner, one, budget)
            valid = rec.llm_source[b] >= 0
            # the columns the LLM kept are the hand-chosen ones (caller's columns, unpadded)
            pad = int((inp["attention_mask"][b] == 0).sum())
            want = sorted(set(range(one["input_ids"].shape[1])) - {c for c in range(one["input_ids"].shape[1])
                                                                   if one["input_ids"][0, c] in (IMG, VID)} | set(kept[-1]))
            assert (rec.llm_source[b][valid] - pad).tolist() == want
            torch.testing.assert_close(got[b][valid], ref, **TOL[device])


def video_samples(family: str, n: int, seed: int = 0) -> list[Sample]:
    """``n`` prompts with one video each (1 to 3 frames, two sizes)."""
    g = torch.Generator().manual_seed(seed)
    s = 4 * _qwen_patch(family)
    out = []
    for i in range(n):
        t = int(torch.randint(1, 4, (1,), generator=g))
        text = torch.randint(10, 200, (5,), generator=g).tolist()
        out.append(Sample([1] + text[:2], text[2:], [], [(t, s, s * (1 + i % 2))]))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family, pruner", [("qwen2-vl", "fastv"), ("qwen2.5-vl", "pyramid-drop"), ("qwen2-vl", "dart"),
                                            ("qwen3-vl", "fastv-late"), ("qwen3-vl", "fastv")])
def test_video_pruned_inside_the_llm_equals_hand_built_reference(family, pruner, device):
    """A video's tokens, all frames together, are one item of the in-LLM pruner."""
    from test_video import one_sample

    m = model(family, device)
    smp = video_samples(family, 3, seed=5)
    inp = inputs(m, family, smp, device)
    budget = 5
    with torch.no_grad(), tp.apply(m, spec(pruner), budget=budget) as h:
        got = m(**inp).logits
        rec = h.last
        assert rec.modalities == ("video",) * 3
        assert rec.llm_kept[-1].tolist() == [kept_counts(pruner, int(M), budget)[-1] for M in rec.total]
        for b in range(len(smp)):
            ref, kept = hand_forward(m, family, pruner, one_sample(inp, b, smp), budget)
            valid = rec.llm_source[b] >= 0
            torch.testing.assert_close(got[b][valid], ref, **TOL[device])


# -- 3. batched runs equal per-sample runs --------------------------------------------------------
@pytest.mark.parametrize("family, pruner", [(f, p) for f in (*FAMILIES, "qwen3-vl") for p in ("fastv", "pyramid-drop", "dart")]
                         + [("qwen3-vl", "fastv-late"), ("qwen3-vl", "dart-late")])
def test_batched_equals_per_sample_runs(family, pruner):
    m = model(family)

    @settings(max_examples=max(5, settings().max_examples // 8), deadline=None)
    @given(n=st.integers(1, 4), seed=st.integers(0, 10_000), budget=st.integers(1, 20))
    def check(n, seed, budget):
        inp = inputs(m, family, samples(family, n, seed=seed), "cpu")
        with torch.no_grad(), tp.apply(m, spec(pruner), budget=budget) as h:
            got = m(**inp).logits
            src = h.last.llm_source
            for b in range(n):
                alone = m(**solo(inp, b, family)).logits[0]
                torch.testing.assert_close(got[b][src[b] >= 0], alone, **TOL["cpu"])

    check()


# -- 4. generate with the KV cache equals a greedy loop without one --------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family, pruner", CASES)
def test_generate_equals_greedy_reference_without_cache(family, pruner, device):
    m = model(family, device)
    smp = samples(family, 2, seed=4)
    inp = inputs(m, family, smp, device)
    steps, budget = 6, 4
    with torch.no_grad(), tp.apply(m, spec(pruner), budget=budget):
        out = m.generate(**inp, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    assert torch.equal(out[:, : inp["input_ids"].shape[1]], inp["input_ids"])
    with torch.no_grad():
        for b in range(2):
            one = solo(inp, b, family)
            _, kept = hand_forward(m, family, pruner, one, budget)
            seq: list[int] = []
            for _ in range(steps):
                logits, _ = hand_forward(m, family, pruner, one, budget, extra=seq, fixed=kept)
                seq.append(greedy_token(logits[-1], m))
            assert out[b, inp["input_ids"].shape[1]:].tolist() == seq, (family, pruner, b)


# -- 5. the machinery: attention kernel untouched, removal, errors ------------------------------
def test_captures_only_the_pruning_layer_and_keeps_sdpa():
    m = model("llava")
    inp = inputs(m, "llava", samples("llava", 2), "cpu")
    impl = [layer.self_attn.config._attn_implementation for layer in m.model.language_model.layers]
    seen = []
    with tp.apply(m, spec("fastv"), budget=3):
        for layer in m.model.language_model.layers:
            seen.append(layer.self_attn.config._attn_implementation)
        with torch.no_grad():
            m(**inp)
    assert seen == ["sdpa", "tokenprune-capture", "sdpa", "sdpa"]  # only layer K - 1 = 1 records
    assert [layer.self_attn.config._attn_implementation for layer in m.model.language_model.layers] == impl
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in m.model.language_model.layers)


def test_remove_restores_and_other_instances_are_untouched():
    m = model("qwen2-vl")
    other = build("qwen2-vl", text_layers=LAYERS)
    inp = inputs(m, "qwen2-vl", samples("qwen2-vl", 2), "cpu")
    with torch.no_grad():
        ref = m(**inp).logits
        h = tp.apply(m, spec("pyramid-drop"), budget=2)
        assert m(**inp).logits.shape[1] < ref.shape[1]
        torch.testing.assert_close(other(**inp).logits, ref)
        h.remove()
        assert torch.equal(m(**inp).logits, ref)


def test_qwen3_vl_without_a_named_injection_is_refused_before_its_last_deepstack_layer(monkeypatch):
    """An adapter whose LLM injects visual features but names no method to follow them refuses
    steps before the last injection, naming the first layer that works."""
    monkeypatch.setattr(tp.adapters.Qwen3Adapter, "llm_injection_method", "")
    with pytest.raises(UnsupportedModel, match=r"after layers 0\.\.1 and the qwen3-vl adapter names no "
                                              r"llm_injection_method.*prune from layer 3 on"):
        tp.apply(model("qwen3-vl"), spec("fastv"), budget=3)
    tp.apply(model("qwen3-vl"), spec("fastv-late"), budget=3).remove()


def test_qwen3_vl_deepstack_follows_the_pruned_sequence_and_is_restored():
    m = model("qwen3-vl")
    lm = m.model.language_model
    with tp.apply(m, spec("fastv"), budget=3), tp.apply(m, spec("pyramid-drop"), budget=3) as inner:
        assert "_deepstack_process" in lm.__dict__
        inner.remove()
        assert "_deepstack_process" in lm.__dict__  # the outer handle still prunes before layer 2
    assert "_deepstack_process" not in lm.__dict__


def test_schedule_and_model_errors_are_clear(monkeypatch):
    m = model("llava")
    with pytest.raises(ValueError, match="each K must be in 1..3"):
        tp.apply(m, BASE.replace(llm={"stage": "fastv", "layer": 4}), budget=3)
    with pytest.raises(ValueError, match="strictly ascending"):
        BASE.replace(llm={"stage": "pyramid-drop", "layers": [2, 1]})
    from tokenprune_plugins.llm import FastV

    from tokenprune.adapters.llm_site import LlmSite

    class Backwards(FastV):  # a third-party pruner with a bad schedule
        def schedule(self, num_layers):
            return [2, 1]

    with pytest.raises(ValueError, match="strictly ascending"):
        LlmSite(tp.adapters.adapter_for(m), Backwards(), "backwards")
    monkeypatch.setattr(tp.adapters.LlavaAdapter, "llm_site", False)  # a family without the in-LLM site
    with pytest.raises(UnsupportedModel, match="LLaVA-1.5, -NeXT and -OneVision and Qwen2/2.5/3-VL; the llava adapter of "
                                               "LlavaForConditionalGeneration does not"):
        tp.apply(m, BASE.replace(llm={"stage": "fastv", "layer": 1}), budget=3)


def test_generate_without_cache_is_refused():
    m = model("llava")
    inp = inputs(m, "llava", samples("llava", 1), "cpu")
    with tp.apply(m, spec("fastv"), budget=3), pytest.raises(ValueError, match="leave use_cache on"):
        m.generate(**inp, max_new_tokens=2, use_cache=False)


def test_dart_without_pivots_keeps_top_key_norms():
    from tokenprune.stages import LlmRequest

    stage = BASE.replace(llm={"stage": "dart", "layer": 2, "image_pivots": 0, "text_pivots": 0}).llm
    kn = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    req = LlmRequest(2, 0, torch.randn(1, 4, 8), torch.ones(1, 4, dtype=torch.bool), torch.tensor([2]), None, kn,
                     torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool), torch.rand(1, 3), lambda h: h)
    assert stage.select(req)[0].nonzero().flatten().tolist() == [1, 3]


def test_keep_counts_are_geometric_and_exact_at_the_end():
    stage = tp.load_spec("specs/methods/pyramid-drop.toml").llm
    total = torch.tensor([576, 100, 9])
    counts = stage.keep_counts(total, torch.tensor([72, 10, 9]), 3)
    assert [c.tolist() for c in counts] == [[288, 46, 9], [144, 22, 9], [72, 10, 9]]
    assert math.isclose(576 * 0.5 ** 3, 72)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dropping_nothing_in_half_precision(dtype):
    m = build("qwen2.5-vl", dtype=dtype, text_layers=LAYERS)
    inp = {k: v for k, v in batch(m, "qwen2.5-vl", samples("qwen2.5-vl", 2)).items()}
    with torch.no_grad():
        ref = m.generate(**inp, max_new_tokens=4, do_sample=False)
        with tp.apply(m, spec("pyramid-drop"), budget=1.0):
            assert torch.equal(m.generate(**inp, max_new_tokens=4, do_sample=False), ref)
        with tp.apply(m, spec("fastv"), budget=3) as h:
            out = m(**inp).logits
            assert out.dtype == dtype and torch.isfinite(out).all() and h.last.llm_kept[-1].tolist() == [3, 3]


def test_a_hand_written_decode_loop_on_the_pruned_cache():
    """Passing the returned cache back by hand gets the same per-layer masks as generate's decode
    steps. (A hand loop passes the pruned sequence's mask and the next original positions.)"""
    from tokenprune.adapters.base import cache_keyword

    m = model("llava")
    inp = inputs(m, "llava", samples("llava", 2, seed=6), "cpu")
    with torch.no_grad(), tp.apply(m, spec("fastv"), budget=3) as h:
        S = inp["input_ids"].shape[1]
        pos = inp["attention_mask"].long().cumsum(-1) - 1  # generate's positions for the caller's sequence
        want = m.generate(**inp, max_new_tokens=3, do_sample=False, min_new_tokens=3)[:, S:]
        out = m(**inp, position_ids=pos.masked_fill(inp["attention_mask"] == 0, 0))
        cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.24
        mask = (h.last.source >= 0).long()  # the pruned sequence's mask: the cache holds that sequence
        got = []
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for t in range(3):
            got.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            step = m(input_ids=nxt, attention_mask=mask, position_ids=pos[:, -1:] + 1 + t,
                     **{cache_keyword(): cache}, use_cache=True)
            nxt = step.logits[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(torch.cat(got, 1), want)


# -- 6. a pre-LLM method and an in-LLM one in one spec (pre_llm_budget) -----------------------------
PRE = dict(completion={"stage": "divprune"}, budget_policy={"stage": "fixed", "ratio": 0.5})


@pytest.mark.parametrize("family", FAMILIES)
def test_a_spec_may_prune_before_and_inside_the_llm(family):
    """pre_llm_budget = P keeps P tokens per image before the LLM and the [llm] stage leaves the
    budget R after its last layer; P = all is the in-LLM spec alone, R = P the pre-LLM spec alone;
    the LLM keeps a subset of what entered it; batched rows equal solo runs."""
    m = model(family)
    inp = inputs(m, family, samples(family, 3, seed=5), "cpu")
    both = spec("fastv").replace(**PRE, budget=3)
    with torch.no_grad():
        with tp.apply(m, both.replace(pre_llm_budget=6), budget=3) as h:
            got = m(**inp).logits
            rec = h.last
            gen = m.generate(**inp, max_new_tokens=3, do_sample=False)
        assert torch.equal(rec.kept, rec.total.clamp(max=6)) and bool((rec.total > 6).any())
        assert torch.equal(rec.llm_kept[-1], rec.kept.clamp(max=3)) and gen.shape[1] == inp["input_ids"].shape[1] + 3
        for b in range(3):
            lines = set() if rec.newline_mask is None else set(rec.newline_mask[b].nonzero().flatten().tolist())
            entered = set(rec.source[b][rec.source[b] >= 0].tolist())
            left = set(rec.llm_source[b][rec.llm_source[b] >= 0].tolist())
            assert left <= entered and len(entered - lines) - len(left - lines) == int(rec.kept[b] - rec.llm_kept[-1][b])
            with tp.apply(m, both.replace(pre_llm_budget=6), budget=3):
                alone = m(**solo(inp, b, family)).logits[0]
            torch.testing.assert_close(got[b][rec.llm_source[b] >= 0], alone, **TOL["cpu"])
        with tp.apply(m, both.replace(pre_llm_budget=1.0), budget=3):
            every = m(**inp).logits
        with tp.apply(m, spec("fastv"), budget=3):
            in_llm = m(**inp).logits
        torch.testing.assert_close(every, in_llm, atol=1e-6, rtol=1e-6)
        with tp.apply(m, both.replace(pre_llm_budget=4), budget=4):
            nothing_in_llm = m(**inp).logits
        with tp.apply(m, both.replace(pre_llm_budget=4), budget=5), pytest.raises(
                ValueError, match=r"asks the LLM to keep 5 tokens of image \d, but the spec's pre_llm_budget \(4\) lets only 4"):
            m(**inp)
        with tp.apply(m, BASE.replace(**PRE), budget=4):
            pre_only = m(**inp).logits
        torch.testing.assert_close(nothing_in_llm, pre_only, atol=1e-6, rtol=1e-6)


def test_pre_llm_budget_is_checked_against_the_spec():
    with pytest.raises(ValueError, match="pre_llm_budget is what the pre-LLM stages keep when an \\[llm\\] stage"):
        BASE.replace(pre_llm_budget=8)
    with pytest.raises(ValueError, match="budget = 16 is what the LLM keeps .* cannot exceed pre_llm_budget = 8"):
        spec("fastv").replace(budget=16, pre_llm_budget=8)
    with pytest.raises(ValueError, match=r"ratio and must be in \(0, 1\]"):
        spec("fastv").replace(pre_llm_budget=1.5)
    assert spec("fastv").replace(pre_llm_budget=8, budget=4).resolved()["pre_llm_budget"] == 8
