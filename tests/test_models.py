"""tokenprune.apply on tiny random models of all five families (CPU; CUDA too when present).

Equivalences: identity stages at a full budget reproduce the unpruned logits and generations;
pruned logits equal a per-sample reference built by hand (kept tokens only, original positions,
the model's own or the hand-fused features); batched runs equal per-sample runs; ``generate``
equals a hand-written greedy loop over the pruned prefix; the attention implementation never
changes; ``remove()`` restores the model bit for bit.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import (
    FAMILIES,
    IMG,
    NO_CLS,
    ONE_CROP_LLAVA,
    Sample,
    _qwen_patch,
    batch,
    build,
    default_sizes,
    greedy_token,
    hand_kept,
    rows_of,
    samples,
)
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokenprune as tp
from tokenprune.adapters import UnsupportedInput, UnsupportedModel
from tokenprune.adapters.base import cache_keyword

SPEC = tp.load_spec("specs/clasp.toml")
CACHE = cache_keyword()  # `past_key_values` before transformers 5.24, `cache` after
#: fp32 tolerance between runs whose shapes differ (padding, batch): CUDA picks other kernels
TOL = {"cpu": dict(atol=1e-5, rtol=1e-5), "cuda": dict(atol=1e-4, rtol=1e-4)}
#: identity stages: no routing, the model's own feature layer, keep-all budgets
IDENTITY = SPEC.replace(
    router={"stage": "fixed"},
    fusion={"stage": "single-layer", "layer": -2, "feed": "selection"},
    scoring={"stage": "feature-norm"},
    completion={"stage": "none"},
    budget_policy={"stage": "fixed", "ratio": 1.0},
)


def clasp(family: str, feed: str = "selection", cls: str = "counting") -> tp.PipelineSpec:
    """CLASP with a fixed class; Qwen towers have no [CLS], so they score by received attention."""
    scoring = {"stage": "received-attention" if family in NO_CLS else "cls-attention", "layer": -2}
    return SPEC.replace(router={"stage": "fixed", "class_name": cls}, scoring=scoring,
                        fusion={"stage": "class-adaptive", "feed": feed})


@functools.cache
def model(family: str, device: str = "cpu", dtype: torch.dtype = torch.float32, text_layers: int = 2):
    return build(family, dtype=dtype, text_layers=text_layers).to(device)


def inputs(m, family: str, smp: list[Sample], device: str, seed: int = 0) -> dict:
    return {k: v.to(device) for k, v in batch(m, family, smp, seed=seed).items()}


def gather_seq(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x (B, S, V) at the columns src (B, S') (-1 -> zeros)."""
    out = x.gather(1, src.clamp_min(0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.masked_fill((src < 0).unsqueeze(-1), 0)


# -- 1. identity stages at a full budget reproduce the unpruned model ----------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_identity_reproduces_unpruned_logits_and_generate(family, device):
    m = model(family, device)
    inp = inputs(m, family, samples(family, 3), device)
    with torch.no_grad():
        ref = m(**inp).logits
        gen = m.generate(**inp, max_new_tokens=5, do_sample=False)
        with tp.apply(m, IDENTITY, budget=10_000) as h:
            got = m(**inp).logits
            assert torch.equal(h.last.kept, h.last.total)
            got_gen = m.generate(**inp, max_new_tokens=5, do_sample=False)
    src = h.last.source
    assert torch.equal(gather_seq(ref, src)[src >= 0], got[src >= 0])
    assert torch.equal(gen, got_gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_full_budget_identity_in_half_precision(family, dtype):
    m = model(family, "cpu", dtype)
    inp = inputs(m, family, samples(family, 2), "cpu")
    with torch.no_grad():
        ref = m.generate(**inp, max_new_tokens=4, do_sample=False)
        with tp.apply(m, IDENTITY, budget=1.0):
            assert torch.equal(m.generate(**inp, max_new_tokens=4, do_sample=False), ref)


# -- 2/3. pruned logits equal a per-sample reference built by hand --------------------------------
def reference_logits(m, family: str, one: dict, kept_slots: list[torch.Tensor], features: list[torch.Tensor] | None):
    """Forward of one unpadded sample with only its kept image slots, at their original positions.

    ``kept_slots[i]`` are slot indices into image ``i``'s placeholder run; ``features`` (per image,
    already at the kept slots) replace the model's own features when given.
    """
    ids = one["input_ids"][0]
    img_cols = (ids == IMG).nonzero().flatten().tolist()
    enc_kw = {k: v for k, v in one.items() if k in ("pixel_values", "image_sizes", "image_grid_thw", "batch_num_images")}
    if family in ONE_CROP_LLAVA:
        enc_kw.update(vision_feature_layer=-2, vision_feature_select_strategy="default")
    own = m.model.get_image_features(**enc_kw, return_dict=True)
    keep_cols, feats, start = [], [], 0
    deep = [[] for _ in getattr(own, "deepstack_features", None) or []]
    for i, f in enumerate(own.pooler_output):  # per image, by hand
        slots = kept_slots[i].tolist()
        keep_cols += [img_cols[start + j] for j in slots]
        feats.append(f[slots] if features is None else features[i])
        for d, layer in zip(deep, getattr(own, "deepstack_features", None) or [], strict=True):
            d.append(layer[i][slots])
        start += f.shape[0]
    cols = sorted(set(range(len(ids))) - set(img_cols) | set(keep_cols))
    col_t = torch.tensor(cols, device=ids.device)
    if family.startswith("qwen"):
        pos, _ = m.model.get_rope_index(one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"],
                                        image_grid_thw=one["image_grid_thw"], attention_mask=one["attention_mask"])
        pos = pos[:, :, col_t]
    else:
        pos = col_t[None]  # forward's own positions are 0..S-1
    if family == "qwen3-vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        enc = BaseModelOutputWithDeepstackFeatures(pooler_output=[torch.cat(feats)],
                                                   deepstack_features=[[torch.cat(d)] for d in deep])
    else:
        enc = BaseModelOutputWithPooling(pooler_output=[torch.cat(feats)])
    out = m(input_ids=ids[col_t][None], attention_mask=torch.ones_like(col_t)[None], position_ids=pos,
            mm_encoder_outputs={"image": enc})
    return out.logits[0], col_t


def kept_slots_of(record, inp: dict) -> list[torch.Tensor]:
    """Per prompt (one image each), the kept placeholder slots, from the record's keep mask over
    the sequence. Slots include LLaVA-NeXT's newlines."""
    is_img = inp["input_ids"] == IMG  # (B, S)
    kept = record.keep_mask[is_img]  # over all placeholders, row-major = image order
    return [s.nonzero().flatten() for s in torch.split(kept, is_img.sum(1).tolist())]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_logits_equal_hand_built_per_sample_reference(family, device):
    m = model(family, device)
    smp = samples(family, 3, seed=1)
    inp = inputs(m, family, smp, device)
    with torch.no_grad(), tp.apply(m, clasp(family), budget=0.5) as h:
        got = m(**inp).logits  # (B, S', V)
    rec = h.last
    assert (rec.kept < rec.total).all()
    slots = kept_slots_of(rec, inp)
    with torch.no_grad():  # the references pass their own features: outside the handle, which refuses them
        for b in range(len(smp)):
            one = rows_of(inp, b, family, [1] * len(smp))
            ref, cols = reference_logits(m, family, one, [slots[b]], None)
            valid = rec.source[b] >= 0
            torch.testing.assert_close(got[b][valid], ref, **TOL[device])


@pytest.mark.parametrize("device", DEVICES)
def test_llava_clasp_feeds_hand_fused_features(device):
    """feed='llm': the LLM receives projector(sum_l alpha_l h_l) at the kept tokens."""
    m = model("llava", device)
    smp = samples("llava", 2, seed=2)
    inp = inputs(m, "llava", smp, device)
    spec = clasp("llava", feed="llm", cls="ocr")
    with torch.no_grad(), tp.apply(m, spec, budget=7) as h:
        got = m(**inp).logits
    rec = h.last
    with torch.no_grad():  # the reference passes its own features: outside the handle, which refuses them
        alpha = tp.Pipeline(spec).table.alpha(["ocr"], 4, spec.fusion.min_weight, torch.tensor([7]))[0]  # (L,), R = 7's band
        hs = m.model.vision_tower(inp["pixel_values"], output_hidden_states=True).hidden_states
        fused = sum(alpha[l - 1] * hs[l][:, 1:] for l in range(1, 5) if alpha[l - 1] > 0)
        proj = m.model.multi_modal_projector(fused)  # (N, M, D)
        for b in range(2):
            idx = rec.selection.row(b)
            one = rows_of(inp, b, "llava", [1, 1])
            ref, _ = reference_logits(m, "llava", one, [idx], [proj[b, idx]])
            torch.testing.assert_close(got[b][rec.source[b] >= 0], ref, **TOL[device])


# -- 3 + 7. hypothesis: budgets, batch composition and image sizes ---------------------------------
@st.composite
def compositions(draw, family: str):
    sizes = default_sizes(family)
    B = draw(st.integers(1, 3))
    smp = []
    for _ in range(B):
        before = [1] + draw(st.lists(st.integers(10, 199), min_size=1, max_size=4))
        after = draw(st.lists(st.integers(10, 199), min_size=1, max_size=3))
        n_img = draw(st.integers(1, 2)) if family not in ONE_CROP_LLAVA else 1
        smp.append(Sample(before, after, [draw(st.sampled_from(sizes)) for _ in range(n_img)]))
    budget = draw(st.one_of(st.integers(1, 40), st.floats(0.05, 1.0)))
    cls = draw(st.sampled_from(["ocr", "counting", "spatial", "scene"]))
    return smp, budget, cls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_per_sample_runs(family, device):
    m = model(family, device)

    @settings(max_examples=max(8, settings().max_examples // 5), deadline=None)
    @given(compositions(family))
    def check(case):
        smp, budget, cls = case
        inp = inputs(m, family, smp, device)
        per_image = [len(s.sizes) for s in smp]
        with torch.no_grad(), tp.apply(m, clasp(family, cls=cls), budget=budget) as h:
            got = m(**inp).logits
            rec = h.last
            assert torch.equal(rec.kept.cpu(), hand_kept(rec.total, budget))
            for b in range(len(smp)):
                one = rows_of(inp, b, family, per_image)
                solo = m(**one).logits[0]
                valid = rec.source[b] >= 0
                torch.testing.assert_close(got[b][valid], solo, **TOL[device])

    check()


# -- 4. generate with the KV cache equals a greedy loop over the pruned prefix ------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_hand_written_greedy_loop(family, device):
    m = model(family, device)
    smp = samples(family, 2, seed=3)
    inp = inputs(m, family, smp, device)
    steps = 6
    with torch.no_grad(), tp.apply(m, clasp(family), budget=0.5) as h:
        out = m.generate(**inp, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
        rec = h.last
        assert torch.equal(out[:, : inp["input_ids"].shape[1]], inp["input_ids"])  # caller's prompt back
        slots = kept_slots_of(rec, inp)
    with torch.no_grad():
        for b in range(2):
            one = rows_of(inp, b, family, [1, 1])
            ids = one["input_ids"][0]
            img_cols = (ids == IMG).nonzero().flatten()
            keep = torch.ones_like(ids, dtype=torch.bool)
            keep[img_cols] = False
            keep[img_cols[slots[b]]] = True
            cols = keep.nonzero().flatten()
            enc_kw = {k: v for k, v in one.items() if k in ("pixel_values", "image_sizes", "image_grid_thw", "batch_num_images")}
            own = m.model.get_image_features(**enc_kw, return_dict=True)
            feats = own.pooler_output[0][slots[b]]
            if family == "qwen3-vl":
                from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

                enc = BaseModelOutputWithDeepstackFeatures(
                    pooler_output=[feats], deepstack_features=[[d[0][slots[b]]] for d in own.deepstack_features])
            else:
                enc = BaseModelOutputWithPooling(pooler_output=[feats])
            if family.startswith("qwen"):
                pos, _ = m.model.get_rope_index(one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"],
                                                image_grid_thw=one["image_grid_thw"], attention_mask=one["attention_mask"])
                pos = pos[:, :, cols]  # (3, 1, S')
            else:
                pos = cols[None]
            cache = DynamicCache(config=m.config.get_text_config())
            logits = m(input_ids=ids[cols][None], attention_mask=torch.ones(1, len(cols), dtype=torch.long, device=device),
                       position_ids=pos, mm_encoder_outputs={"image": enc}, **{CACHE: cache}, use_cache=True).logits
            seq = []
            mask_len = len(cols)
            for t in range(steps):
                nxt = torch.tensor(greedy_token(logits[0, -1], m), device=device)
                seq.append(int(nxt))
                mask_len += 1
                p = pos[..., -1:] + 1 + t  # every row continues at last + 1
                logits = m(input_ids=nxt.view(1, 1), attention_mask=torch.ones(1, mask_len, dtype=torch.long, device=device),
                           position_ids=p, **{CACHE: cache}, use_cache=True).logits
            new = out[b, inp["input_ids"].shape[1]:].tolist()
            assert new == seq, (family, b)


# -- 5/6. attention implementation untouched; remove() restores everything ------------------------
def captured(m) -> list:
    return [mod for mod in m.modules()
            if getattr(getattr(mod, "config", None), "_attn_implementation", None) == "tokenprune-capture"]


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_implementation_is_never_switched(family):
    m = build(family)
    before = (m.config._attn_implementation, m.config.vision_config._attn_implementation,
              m.config.get_text_config()._attn_implementation)
    inp = inputs(m, family, samples(family, 2), "cpu")
    with tp.apply(m, clasp(family), budget=4):
        with torch.no_grad():
            m(**inp)
        now = (m.config._attn_implementation, m.config.vision_config._attn_implementation,
               m.config.get_text_config()._attn_implementation)
        assert now == before and "eager" not in now
        assert len(captured(m)) == 1  # exactly the scorer's layer
    assert not captured(m)
    assert (m.config._attn_implementation, m.config.vision_config._attn_implementation) == before[:2]


@pytest.mark.parametrize("family", ONE_CROP_LLAVA)
def test_captured_cls_attention_equals_eager_attention_maps(family):
    """The capture kernel's [CLS] row equals the probabilities an eager tower returns (CLIP and
    DINOv2 towers)."""
    m = model(family)
    eager = build(family, attn="eager")
    inp = inputs(m, family, samples(family, 2), "cpu")
    from tokenprune.adapters import adapter_for, capture
    from tokenprune.contract import Requirements

    ad = adapter_for(m)
    h = tp.apply(m, clasp(family), budget=4)
    try:
        with torch.no_grad(), capture.recording({ad.attention_module(3): (3, frozenset({"cls", "received"}))}) as rec:
            enc = ad.encode(inp, Requirements(layers=frozenset({3}), cls_attention=frozenset({3}),
                                              received_attention=frozenset({3})), rec)
            att = eager.model.vision_tower(inp["pixel_values"], output_attentions=True).attentions[2]  # layer 3
    finally:
        h.remove()
    torch.testing.assert_close(enc.tokens.cls_attention[3], att[:, :, 0, 1:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(enc.tokens.received_attention[3], att.mean(2)[:, :, 1:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_outputs_exactly_and_handles_stack(family):
    m = build(family)
    inp = inputs(m, family, samples(family, 2), "cpu")
    state = dict(m.__dict__)
    with torch.no_grad():
        ref = m(**inp).logits
        gen = m.generate(**inp, max_new_tokens=3, do_sample=False)
        outer = tp.apply(m, clasp(family), budget=3)
        inner = tp.apply(m, IDENTITY, budget=1.0)  # applying twice: the newest is active
        assert inner.active and not outer.active
        got, src = m(**inp).logits, inner.last.source
        assert torch.equal(got[src >= 0], gather_seq(ref, src)[src >= 0])
        inner.remove()
        inner.remove()  # idempotent
        assert outer.active
        assert m(**inp).logits.shape[1] < ref.shape[1]
        outer.remove()
        assert set(m.__dict__) == set(state) and "forward" not in m.__dict__ and "generate" not in m.__dict__
        assert torch.equal(m(**inp).logits, ref)
        assert torch.equal(m.generate(**inp, max_new_tokens=3, do_sample=False), gen)
    # removing out of order also ends clean
    a, b = tp.apply(m, IDENTITY, budget=2), tp.apply(m, IDENTITY, budget=3)
    a.remove()
    assert b.active
    b.remove()
    assert "forward" not in m.__dict__ and "_tokenprune_stack" not in m.__dict__


def test_other_instances_are_untouched():
    m1, m2 = build("llava"), build("llava")
    inp = inputs(m1, "llava", samples("llava", 1), "cpu")
    with torch.no_grad(), tp.apply(m1, IDENTITY, budget=2):
        assert m1(**inp).logits.shape[1] < inp["input_ids"].shape[1]
        assert m2(**inp).logits.shape[1] == inp["input_ids"].shape[1]
        assert "forward" not in m2.__dict__ and "forward" in m1.__dict__


# -- inputs that are not prunable: clear errors or documented pass-through ------------------------
def test_unsupported_model_is_named():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2))
    with pytest.raises(UnsupportedModel, match="no adapter for LlamaForCausalLM.*LlavaForConditionalGeneration"):
        tp.apply(lm, IDENTITY, budget=4)


def test_text_only_calls_pass_through_unchanged():
    m = model("llava")
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        with tp.apply(m, IDENTITY, budget=2) as h:
            assert torch.equal(m(input_ids=ids).logits, ref)
            assert h.last is None


def test_bad_inputs_give_clear_errors():
    m = model("qwen2-vl")
    inp = inputs(m, "qwen2-vl", samples("qwen2-vl", 1), "cpu")
    with tp.apply(m, clasp("qwen2-vl"), budget=2):
        bad = dict(inp, input_ids=inp["input_ids"].masked_fill(inp["input_ids"] == IMG, 11))
        with pytest.raises(UnsupportedInput, match="placeholder"):
            m(**bad)
    with pytest.raises(ValueError, match="no \\[CLS\\].*received-attention"):
        tp.apply(m, clasp("llava"), budget=2)
    with pytest.raises(ValueError, match="budget must be > 0"):
        tp.apply(m, clasp("qwen2-vl"), budget=0)
    with pytest.raises(ValueError, match="tokenizer"), tp.apply(model("llava"), SPEC, budget=2):  # keyword router
        model("llava")(**inputs(model("llava"), "llava", samples("llava", 1), "cpu"))  # no tokenizer, no prompts


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_non_finite_pixels_are_refused_naming_the_row_not_passed_to_the_llm(family):
    m = model(family)
    inp = inputs(m, family, samples(family, 2), "cpu")
    pix = inp["pixel_values"].clone()
    if family == "llava":
        pix[1] = float("nan")  # the second image
    else:
        pix[-1] = float("inf")  # the last patch row of the second image
    with tp.apply(m, clasp(family), budget=2), pytest.raises(ValueError, match=r"not finite \(NaN or inf\) at row 1"):
        m(**dict(inp, pixel_values=pix))


def test_a_per_image_budget_list_given_to_apply_holds_for_each_call():
    m = model("llava")
    inp = inputs(m, "llava", samples("llava", 2), "cpu")
    with torch.no_grad():
        with tp.apply(m, IDENTITY, budget=[3, 5]) as h:
            m(**inp)
            assert h.last.kept.tolist() == [3, 5]
        with tp.apply(m, IDENTITY, budget=2) as h:
            m(**inp, tokenprune_budget=[3, 5])
            assert h.last.kept.tolist() == [3, 5]
        with tp.apply(m, IDENTITY, budget=[3, 5, 7]), pytest.raises(ValueError, match=r"needs 2 entries \(one per image\)"):
            m(**inp)
    with pytest.raises(ValueError, match=r"every per-sample budget must be > 0, got \[3, 0\]"):
        tp.apply(m, IDENTITY, budget=[3, 0])


def test_the_budget_is_parsed_at_apply_and_a_wrong_length_list_says_what_a_list_means():
    m = model("llava")
    inp = inputs(m, "llava", samples("llava", 3), "cpu")
    with pytest.raises(TypeError, match="must hold integers"):
        tp.apply(m, IDENTITY, budget=[2.5, 3.0])  # before any call
    with torch.no_grad(), tp.apply(m, IDENTITY, budget=[3, 5]) as h:
        assert h.budget == tp.Budget.parse([3, 5])
        with pytest.raises(ValueError, match=r"needs 3 entries \(one per image\).*in the order the images appear in "
                                             r"the batch \(prompt by prompt\); give 3 counts, or one int"):
            m(**inp)
        h.budget = [3, 5, 2]
        m(**inp)
        assert h.last.kept.tolist() == [3, 5, 2]
        with pytest.raises(ValueError, match="budget must be > 0"):
            h.budget = 0


def test_router_reads_explicit_prompts_per_sample():
    m = model("llava")
    inp = inputs(m, "llava", samples("llava", 2), "cpu")
    spec = SPEC.replace(scoring={"stage": "cls-attention", "layer": -2})
    with torch.no_grad(), tp.apply(m, spec, budget=5) as h:
        m(**inp, tokenprune_prompts=["How many dots are there?", "What is written on the sign?"])
        assert h.last.classes == ("counting", "ocr")
        assert torch.equal(h.last.kept, torch.tensor([5, 5]))
        assert set(h.last.selection.provenance[h.last.selection.keep_mask].tolist()) <= {1, 2}


# -- never silently unpruned: every input kind of every family ---------------------------------------
def _precomputed(m, family: str, inp: dict) -> dict:
    """The call with the model's own image features given as mm_encoder_outputs instead of pixels."""
    enc_kw = {k: v for k, v in inp.items() if k in ("pixel_values", "image_sizes", "image_grid_thw", "batch_num_images")}
    if family in ONE_CROP_LLAVA:
        enc_kw.update(vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.no_grad():
        own = m.model.get_image_features(**enc_kw, return_dict=True)
    rest = {k: v for k, v in inp.items() if k not in ("pixel_values", "image_sizes", "batch_num_images")}
    return dict(rest, mm_encoder_outputs={"image": own})


@pytest.mark.parametrize("family", FAMILIES)
def test_every_visual_input_is_pruned_with_a_record_or_refused(family):
    """Images (and Qwen videos, alone or with images) are pruned and recorded; text passes;
    precomputed features are refused, in forward and in generate; none reaches the model unpruned
    and unreported."""
    m = model(family)
    inp = inputs(m, family, samples(family, 2), "cpu")
    pre = _precomputed(m, family, inp)
    with torch.no_grad():
        m(**pre)  # the model itself takes precomputed features
        with tp.apply(m, clasp(family), budget=2) as h:
            text = {k: v for k, v in inp.items() if k in ("input_ids", "attention_mask")}
            text["input_ids"] = text["input_ids"].masked_fill(text["input_ids"] == IMG, 11)
            m(**text)
            assert h.last is None  # no visual input, nothing to record
            for call in (m, m.generate):
                with pytest.raises(UnsupportedInput, match="precomputed mm_encoder_outputs"):
                    call(**pre)
            assert h.last is None
            m(**inp)
            assert h.last is not None and h.last.kept.tolist() == [2, 2] and bool((h.last.total > 2).all())
            out = m.generate(**inp, max_new_tokens=2, do_sample=False)  # generate's inner calls carry our features
            assert out.shape[1] == inp["input_ids"].shape[1] + 2
            if family.startswith("qwen") or family == "llava-onevision":  # videos, alone or with images, are pruned and recorded
                p = 14 if family == "llava-onevision" else _qwen_patch(family)
                second = (2, 56, 56) if family == "llava-onevision" else (1, 4 * p, 8 * p)  # OneVision: one frame count
                smp = [Sample([1, 20], [30], [], [(2, 4 * p, 4 * p)]), Sample([1, 21], [31], [default_sizes(family)[0]], [second])]
                video = inputs(m, family, smp, "cpu")
                for call in (m, functools.partial(m.generate, max_new_tokens=2, do_sample=False)):
                    h.last = None
                    call(**video)
                    assert h.last.modalities == ("image", "video", "video") and h.last.kept.tolist() == [2, 2, 2]
