"""Video pruning on Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision (tiny models, CPU; CUDA too
when present).

A video is one pipeline row holding all its frames' tokens; images and videos share a batch. The
properties are those of the image path (``test_models.py``): identity at a full budget, pruned
logits equal to a forward built by hand with only the kept tokens at their original M-RoPE
positions (Qwen3-VL: deepstack features at the same indices, timestamps intact), batched equals
per-sample, ``generate`` equals a greedy loop, ``remove()`` restores bit for bit, SDPA stays on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from test_models import CACHE, IDENTITY, TOL, captured, clasp, gather_seq, model
from tiny_models import IMG, TIMESTAMP, VID, Sample, _qwen_patch, batch, build, greedy_token, hand_kept
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokenprune as tp
from tokenprune.testing.inputs import make_tokens

QWEN = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
VIDEO = (*QWEN, "llava-onevision")
OV = "llava-onevision"  # 56-px frames, one frame count per batch; images anyres (one crop each when several)


def side(family: str, k: int = 4) -> int:
    return 56 if family == OV else k * _qwen_patch(family)


def mixed(family: str) -> list[Sample]:
    """A video with an image, a video alone, images alone: sequence order != item order."""
    s = side(family)
    if family == OV:
        return [Sample([1, 20, 21], [30, 31], [(56, 112)], [(2, s, s)]),
                Sample([1, 22], [33, 34, 35], [], [(2, s, s)]),
                Sample([1, 23, 24, 25], [36], [(112, 112), (100, 60)], [])]
    return [Sample([1, 20, 21], [30, 31], [(s, s)], [(2, s, 2 * s)]),
            Sample([1, 22], [33, 34, 35], [], [(3, s, s)]),
            Sample([1, 23, 24, 25], [36], [(s, 2 * s)], [])]


def videos_only(family: str) -> list[Sample]:
    s = side(family)
    if family == OV:
        return [Sample([1, 20], [30], [], [(4, s, s)]), Sample([1, 21, 22], [31, 32], [], [(4, s, s), (4, s, s)])]
    return [Sample([1, 20], [30], [], [(2, s, s)]), Sample([1, 21, 22], [31, 32], [], [(4, 2 * s, s)])]


def inputs(m, family: str, smp: list[Sample], device: str, seed: int = 0) -> dict:
    return {k: v.to(device) for k, v in batch(m, family, smp, seed=seed).items()}


def one_sample(inp: dict, b: int, smp: list[Sample]) -> dict:
    """The b-th prompt of a batch as its own unpadded batch of one (its images' and videos' pixels)."""
    keep = inp["attention_mask"][b].bool()
    out = {k: inp[k][b, keep][None] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inp}
    if "mm_token_type_ids" not in inp:  # LLaVA-OneVision: pixels per image / per video
        n_img, n_vid = [len(s.sizes) for s in smp], [len(s.videos) for s in smp]
        if n_img[b]:
            sl = slice(sum(n_img[:b]), sum(n_img[: b + 1]))
            out.update(pixel_values=inp["pixel_values"][sl], image_sizes=inp["image_sizes"][sl],
                       batch_num_images=inp["batch_num_images"][b : b + 1])
        if n_vid[b]:
            out["pixel_values_videos"] = inp["pixel_values_videos"][sum(n_vid[:b]):sum(n_vid[: b + 1])]
        return out
    for pixels, grid, n in (("pixel_values", "image_grid_thw", [len(s.sizes) for s in smp]),
                            ("pixel_values_videos", "video_grid_thw", [len(s.videos) for s in smp])):
        if n[b] == 0:
            continue
        g = inp[grid]
        first = sum(n[:b])
        start = int(g[:first].prod(-1).sum())
        out[pixels] = inp[pixels][start:start + int(g[first:first + n[b]].prod(-1).sum())]
        out[grid] = g[first:first + n[b]]
    return out


def hand_encoder_outputs(m, family: str, one: dict, keep: torch.Tensor) -> dict:
    """The model's own features of one sample's images and videos at the kept placeholder columns
    ``keep`` ``(S,)``, per modality (Qwen3-VL: its deepstack features at the same indices)."""
    ids = one["input_ids"][0]
    out = {}
    for modality, token, pixels, grid in (("image", IMG, "pixel_values", "image_grid_thw"),
                                          ("video", VID, "pixel_values_videos", "video_grid_thw")):
        if pixels not in one:
            continue
        kept = keep[ids == token]  # (placeholders,) in item order: one modality is row-major in one row
        if family == OV:  # the packed features, newlines included; a video output is (videos, slots, D)
            own = (m.model.get_image_features(one[pixels], one["image_sizes"], batch_num_images=one["batch_num_images"],
                                              return_dict=True) if modality == "image"
                   else m.model.get_video_features(one[pixels], return_dict=True))
            feats = torch.cat(list(own.pooler_output))[kept]
            out[modality] = BaseModelOutputWithPooling(pooler_output=[feats] if modality == "image" else feats[None])
            continue
        get = m.model.get_image_features if modality == "image" else m.model.get_video_features
        own = get(one[pixels], one[grid], return_dict=True)
        feats = torch.cat(list(own.pooler_output))[kept]
        if family == "qwen3-vl":
            from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

            deep = [[torch.cat(list(d))[kept]] for d in own.deepstack_features]
            out[modality] = BaseModelOutputWithDeepstackFeatures(pooler_output=[feats], deepstack_features=deep)
        else:
            out[modality] = BaseModelOutputWithPooling(pooler_output=[feats])
    return out


def hand_positions(m, one: dict, cols: torch.Tensor) -> torch.Tensor:
    """The unpruned positions of one sample, at the kept columns: M-RoPE ``(3, 1, S')``, or a LLaVA
    forward's own ``0..S-1`` ``(1, S')``."""
    if "mm_token_type_ids" not in one:
        return cols[None]
    pos, _ = m.model.get_rope_index(one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"],
                                    image_grid_thw=one.get("image_grid_thw"), video_grid_thw=one.get("video_grid_thw"),
                                    attention_mask=one["attention_mask"])
    return pos[:, :, cols]


def kept_columns(record, inp: dict, b: int) -> torch.Tensor:
    """Sample b's kept columns (the record's keep mask) within its unpadded row."""
    valid = inp["attention_mask"][b].bool()
    return record.keep_mask[b][valid]


# -- identity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", VIDEO)
@pytest.mark.parametrize("compose", [mixed, videos_only])
def test_full_budget_identity_reproduces_unpruned_video_logits_and_generate(family, device, compose):
    m = model(family, device)
    inp = inputs(m, family, compose(family), device)
    with torch.no_grad():
        ref = m(**inp).logits
        gen = m.generate(**inp, max_new_tokens=4, do_sample=False)
        with tp.apply(m, IDENTITY, budget=10_000) as h:
            got = m(**inp).logits
            rec = h.last
            got_gen = m.generate(**inp, max_new_tokens=4, do_sample=False)
    assert torch.equal(rec.kept, rec.total)
    assert rec.modalities.count("video") == sum(len(s.videos) for s in compose(family))
    src = rec.source
    assert torch.equal(gather_seq(ref, src)[src >= 0], got[src >= 0])
    assert torch.equal(gen, got_gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_full_budget_identity_on_video_in_half_precision(dtype):
    m = model("qwen2-vl", "cpu", dtype)
    inp = inputs(m, "qwen2-vl", mixed("qwen2-vl"), "cpu")
    with torch.no_grad():
        ref = m.generate(**inp, max_new_tokens=4, do_sample=False)
        with tp.apply(m, IDENTITY, budget=1.0):
            assert torch.equal(m.generate(**inp, max_new_tokens=4, do_sample=False), ref)


# -- the hand-built reference ----------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", VIDEO)
def test_pruned_video_logits_equal_hand_built_reference(family, device):
    """Only the kept image and video tokens, the model's own features (and deepstack), at the
    unpruned sequence's M-RoPE positions; every text token kept (Qwen3-VL's timestamps too)."""
    m = model(family, device)
    smp = mixed(family)
    inp = inputs(m, family, smp, device)
    with torch.no_grad(), tp.apply(m, clasp(family), budget=0.4) as h:
        got = m(**inp).logits
    rec = h.last
    assert (rec.kept < rec.total).all()
    assert rec.modalities == ("image",) * sum(len(x.sizes) for x in smp) + ("video",) * sum(len(x.videos) for x in smp)
    ids = inp["input_ids"]
    placeholder = (ids == IMG) | (ids == VID)
    assert bool(rec.keep_mask[inp["attention_mask"].bool() & ~placeholder].all())  # text, timestamps included
    # the keep mask is the selection: item i's token j survives iff it is selected (newlines aside)
    token = placeholder if rec.newline_mask is None else placeholder & ~rec.newline_mask
    slots = torch.cat([rec.keep_mask[(ids == IMG) & token], rec.keep_mask[(ids == VID) & token]])
    items = torch.split(slots, rec.total.tolist())
    for i, kept in enumerate(items):
        assert torch.equal(kept.nonzero().flatten().cpu(), rec.selection.row(i).sort().values.cpu())
    with torch.no_grad():  # outside the handle, which refuses caller-given features
        for b in range(len(smp)):
            one = one_sample(inp, b, smp)
            keep = kept_columns(rec, inp, b)
            cols = keep.nonzero().flatten()
            enc = hand_encoder_outputs(m, family, one, keep)
            ref = m(input_ids=one["input_ids"][:, cols], attention_mask=torch.ones_like(cols)[None],
                    position_ids=hand_positions(m, one, cols), mm_encoder_outputs=enc).logits[0]
            torch.testing.assert_close(got[b][rec.source[b] >= 0], ref, **TOL[device])


def test_a_static_video_keeps_no_frame_duplicate_under_a_diversity_selection():
    """Selection runs over the spatio-temporal set: a video whose two frames are identical keeps,
    under DivPrune-style max-min diversity, no token whose exact copy in the other frame is kept."""
    family = "qwen2-vl"
    m = model(family)
    s = side(family)
    inp = inputs(m, family, [Sample([1, 20], [30], [], [(2, s, s)])], "cpu")
    pix = inp["pixel_values_videos"].view(2, -1, inp["pixel_values_videos"].shape[-1])  # (frames, patches, C)
    inp["pixel_values_videos"] = torch.cat([pix[0], pix[0]])  # frame 2 = frame 1
    per_frame = (s // _qwen_patch(family) // 2) ** 2  # merged tokens per frame
    div = IDENTITY.replace(budget_policy={"stage": "fixed", "ratio": 0.0}, completion={"stage": "divprune"})
    with torch.no_grad(), tp.apply(m, div, budget=per_frame) as h:
        m(**inp)
    idx = h.last.selection.row(0)
    frame_local = idx % per_frame
    assert len(set(frame_local.tolist())) == per_frame  # never both copies of a token


# -- batched equals per-sample ------------------------------------------------------------------------
@st.composite
def video_batches(draw, family: str):
    s = side(family, 2)
    B = draw(st.integers(1, 3))
    frames = draw(st.integers(1, 3))  # LLaVA-OneVision: one frame count per batch
    smp = []
    for _ in range(B):
        before = [1] + draw(st.lists(st.integers(10, 199), min_size=1, max_size=3))
        after = draw(st.lists(st.integers(10, 199), min_size=1, max_size=3))
        n_vid = draw(st.integers(0, 2))
        n_img = draw(st.integers(0 if n_vid else 1, 1))
        if family == OV:
            videos = [(frames, s, s)] * n_vid
            images = [draw(st.sampled_from([(56, 112), (112, 112), (100, 60)])) for _ in range(draw(st.integers(0 if n_vid else 1, 2)))]
        else:
            videos = [(draw(st.integers(1, 3)), s * draw(st.integers(1, 2)), s * draw(st.integers(1, 2))) for _ in range(n_vid)]
            images = [(s * draw(st.integers(1, 2)), s * draw(st.integers(1, 2))) for _ in range(n_img)]
        smp.append(Sample(before, after, images, videos))
    budget = draw(st.one_of(st.integers(1, 30), st.floats(0.05, 1.0), st.integers(1, 3).map(tp.Budget.per_frame)))
    cls = draw(st.sampled_from(["ocr", "counting", "spatial", "scene"]))
    return smp, budget, cls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", VIDEO)
def test_video_batched_equals_per_sample_runs(family, device):
    m = model(family, device)

    @settings(max_examples=max(6, settings().max_examples // 6), deadline=None)
    @given(video_batches(family))
    def check(case):
        smp, budget, cls = case
        inp = inputs(m, family, smp, device)
        with torch.no_grad(), tp.apply(m, clasp(family, cls=cls), budget=budget) as h:
            got = m(**inp).logits
            rec = h.last
            frames = torch.tensor([1] * sum(len(x.sizes) for x in smp) + [t for x in smp for t, _, _ in x.videos])
            assert torch.equal(rec.kept.cpu(), hand_kept(rec.total, budget, frames))
            for b in range(len(smp)):
                solo = m(**one_sample(inp, b, smp)).logits[0]
                torch.testing.assert_close(got[b][rec.source[b] >= 0], solo, **TOL[device])

    check()


# -- generate with the cache equals a greedy loop --------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", VIDEO)
def test_video_generate_equals_hand_written_greedy_loop(family, device):
    m = model(family, device)
    smp = mixed(family)[:2]
    inp = inputs(m, family, smp, device)
    steps = 5
    with torch.no_grad(), tp.apply(m, clasp(family), budget=0.5) as h:
        out = m.generate(**inp, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        rec = h.last
    assert torch.equal(out[:, : inp["input_ids"].shape[1]], inp["input_ids"])
    with torch.no_grad():
        for b in range(len(smp)):
            one = one_sample(inp, b, smp)
            keep = kept_columns(rec, inp, b)
            cols = keep.nonzero().flatten()
            pos = hand_positions(m, one, cols)
            cache = DynamicCache(config=m.config.get_text_config())
            logits = m(input_ids=one["input_ids"][:, cols], attention_mask=torch.ones_like(cols)[None], position_ids=pos,
                       mm_encoder_outputs=hand_encoder_outputs(m, family, one, keep), **{CACHE: cache}, use_cache=True).logits
            seq = []
            for t in range(steps):
                nxt = torch.tensor(greedy_token(logits[0, -1], m), device=device)
                seq.append(int(nxt))
                mask = torch.ones(1, len(cols) + t + 1, dtype=torch.long, device=device)
                logits = m(input_ids=nxt.view(1, 1), attention_mask=mask, position_ids=pos[..., -1:] + 1 + t,
                           **{CACHE: cache}, use_cache=True).logits
            assert out[b, inp["input_ids"].shape[1]:].tolist() == seq, (family, b)


# -- SDPA stays on; remove() restores ----------------------------------------------------------------
@pytest.mark.parametrize("family", VIDEO)
def test_video_keeps_sdpa_and_remove_restores_bit_for_bit(family):
    m = build(family)
    inp = inputs(m, family, mixed(family), "cpu")
    before = (m.config.vision_config._attn_implementation, m.config.get_text_config()._attn_implementation)
    with torch.no_grad():
        ref = m(**inp).logits
        gen = m.generate(**inp, max_new_tokens=3, do_sample=False)
        with tp.apply(m, clasp(family), budget=3) as h:
            assert m(**inp).logits.shape[1] < ref.shape[1]
            assert len(captured(m)) == 1  # exactly the scorer's layer
            assert (m.config.vision_config._attn_implementation, m.config.get_text_config()._attn_implementation) == before
            assert h.last.kept.tolist() == [3] * len(h.last.modalities)
        assert not captured(m) and "forward" not in m.__dict__
        assert torch.equal(m(**inp).logits, ref)
        assert torch.equal(m.generate(**inp, max_new_tokens=3, do_sample=False), gen)


def test_onevision_videos_and_images_pruned_inside_the_llm_batched_equal_solo():
    """In-LLM FastV on LLaVA-OneVision images and videos: dropping nothing reproduces the model, and
    batched rows equal solo runs (a video's newline stays when any of its tokens does)."""
    m = model(OV, "cpu", torch.float32, 4)
    smp = mixed(OV)
    inp = inputs(m, OV, smp, "cpu")
    fastv = IDENTITY.replace(llm={"stage": "fastv", "layer": 2})
    with torch.no_grad():
        ref = m(**inp).logits
        with tp.apply(m, fastv, budget=1.0):
            torch.testing.assert_close(m(**inp).logits, ref, atol=1e-6, rtol=1e-6)
        with tp.apply(m, fastv, budget=3) as h:
            got = m(**inp).logits
            rec = h.last
            assert rec.llm_kept[-1].tolist() == [3] * len(rec.modalities)
            for b in range(len(smp)):
                solo = m(**one_sample(inp, b, smp)).logits[0]
                torch.testing.assert_close(got[b][rec.llm_source[b] >= 0], solo, **TOL["cpu"])
        left = rec.llm_source[rec.llm_source >= 0]
        lines = rec.newline_mask.nonzero()  # a newline survives only beside a surviving token of its row
        ids = inp["input_ids"]
        for b, c in lines.tolist():  # its row: the run of tokens right before it, with its grid row
            run, j = [], c - 1
            while j >= 0 and ids[b, j] in (IMG, VID) and not rec.newline_mask[b, j] and rec.grid_row[b, j] == rec.grid_row[b, c]:
                run, j = run + [j], j - 1
            assert run, (b, c)
            kept_any = bool(torch.isin(torch.tensor(run), rec.llm_source[b]).any())
            assert bool(torch.isin(torch.tensor(c), rec.llm_source[b])) == kept_any, (b, c)
        assert left.numel() > 0


# -- errors -----------------------------------------------------------------------------------------
def test_video_inputs_without_their_grid_or_with_wrong_placeholders_are_refused():
    family = "qwen2-vl"
    m = model(family)
    inp = inputs(m, family, videos_only(family), "cpu")
    with tp.apply(m, clasp(family), budget=2):
        with pytest.raises(tp.adapters.UnsupportedInput, match="pixel_values_videos and video_grid_thw together"):
            m(**{k: v for k, v in inp.items() if k != "video_grid_thw"})
        short = dict(inp, input_ids=inp["input_ids"].masked_fill(inp["input_ids"] == VID, 11))
        with pytest.raises(tp.adapters.UnsupportedInput, match="hold 0 video placeholder tokens, but video_grid_thw gives"):
            m(**short)
    with pytest.raises(ValueError, match="per-frame budget is a token count > 0"):
        tp.Budget.per_frame(0)
    with pytest.raises(ValueError, match="needs each item's frame count"):
        tp.Pipeline(IDENTITY)(make_tokens(2, 8), budget=tp.Budget.per_frame(2))


@pytest.mark.parametrize("family", QWEN)
def test_a_grid_that_disagrees_with_its_pixels_is_refused_by_name_before_the_tower(family, monkeypatch):
    """Per modality, the pixels hold the patch rows the grid says and each prompt's placeholders
    are whole items; otherwise the call is refused naming the input (and the row), before the tower
    runs. Video patch rows moved into pixel_values (totals equal) used to run silently."""
    m = model(family)
    inp = inputs(m, family, mixed(family), "cpu")
    calls = []
    tower = m.model.visual
    monkeypatch.setattr(tower, "forward", lambda *a, **k: calls.append(1))  # the tower must not run
    grid_i, grid_v = inp["image_grid_thw"], inp["video_grid_thw"]
    k = int(grid_v[0].prod())  # the first video's patch rows
    moved = dict(inp, pixel_values=torch.cat([inp["pixel_values"], inp["pixel_values_videos"][:k]]),
                 pixel_values_videos=inp["pixel_values_videos"][k:])
    unit = m.model.visual.spatial_merge_size ** 2
    bad_grid = dict(inp, image_grid_thw=grid_i * torch.tensor([1, 2, 1]))
    ids = inp["input_ids"].clone()
    first = int((ids[0] == IMG).nonzero()[0])
    ids[0, first] = 11  # row 0 loses one image placeholder, row 2 keeps its own
    with tp.apply(m, clasp(family), budget=0.5):
        with pytest.raises(tp.adapters.UnsupportedInput, match=rf"pixel_values holds {int(grid_i.prod(-1).sum()) + k} "
                           rf"patch rows, but image_grid_thw gives {int(grid_i.prod(-1).sum())}"):
            m(**moved)
        with pytest.raises(tp.adapters.UnsupportedInput, match="pixel_values holds .* but image_grid_thw gives"):
            m(**bad_grid)
        with pytest.raises(tp.adapters.UnsupportedInput,
                           match=rf"input_ids row 0 holds {int(grid_i[0].prod()) // unit - 1} image placeholder tokens"):
            m(**dict(inp, input_ids=ids))
    assert calls == []
    monkeypatch.undo()
    with torch.no_grad(), pytest.raises(RuntimeError):  # the unpruned model dies on the moved rows, unnamed
        m(**moved)


def test_onevision_pixels_that_disagree_with_their_sizes_are_refused_before_the_tower(monkeypatch):
    """LLaVA-OneVision: a video's frames moved into pixel_values (one image more than image_sizes
    gives), or an image_sizes row that needs more crops than pixel_values holds, is refused naming
    the input before the tower runs."""
    m = model(OV)
    inp = inputs(m, OV, mixed(OV), "cpu")
    calls = []
    monkeypatch.setattr(m.model.vision_tower, "forward", lambda *a, **k: calls.append(1))
    px, vid = inp["pixel_values"], inp["pixel_values_videos"]
    frames = vid[0, :1].expand(px.shape[1], *vid.shape[2:]).to(px.dtype)  # one frame as an image's crops
    moved = dict(inp, pixel_values=torch.cat([px, frames[None]]), pixel_values_videos=vid[1:])
    big = inp["image_sizes"].clone()
    big[0] = torch.tensor([2000, 3000])  # anyres: many more crops than the batch holds
    with tp.apply(m, clasp(OV), budget=0.5):
        with pytest.raises(tp.adapters.UnsupportedInput,
                           match=rf"pixel_values holds {px.shape[0] + 1} images but image_sizes gives {px.shape[0]}"):
            m(**moved)
        with pytest.raises(tp.adapters.UnsupportedInput, match=rf"image 0 of pixel_values holds {px.shape[1]} crops, "
                           r"but its size \[2000, 3000\] in image_sizes needs \d+"):
            m(**dict(inp, image_sizes=big))
    assert calls == []


def test_qwen3_timestamps_stay_between_the_kept_frames():
    family = "qwen3-vl"
    m = model(family)
    inp = inputs(m, family, videos_only(family), "cpu")
    with torch.no_grad(), tp.apply(m, clasp(family), budget=1) as h:
        m(**inp)
    stamps = inp["input_ids"] == TIMESTAMP
    assert bool(h.last.keep_mask[stamps].all()) and int(stamps.sum()) == 2 + 4


# -- every shipped preset on a video batch ----------------------------------------------------------
PRESETS = sorted(["specs/clasp.toml", *map(str, Path("specs/methods").glob("*.toml")),
                  "specs/variants/clasp-qwen.toml"])


@pytest.mark.parametrize("path", PRESETS)
def test_every_method_preset_prunes_a_video_batch_or_says_why_not(path):
    """docs/models.md's list: what runs on Qwen video, and the clear error of what cannot."""
    family = "qwen2-vl"
    m = model(family, "cpu", torch.float32, 25)  # deep enough for PyramidDrop's layers 8, 16, 24
    inp = inputs(m, family, mixed(family), "cpu")
    spec = tp.load_spec(path)
    if spec.router.reads_text:
        spec = spec.replace(router={"stage": "fixed", "class_name": "counting"})
    budget = None if spec.completion_fixes_budget else 0.25
    refused = {"cls-attention": (ValueError, "no \\[CLS\\] token")}.get(spec.stage_name("scoring"))
    if spec.image_downsample:
        refused = (tp.adapters.UnsupportedInput, "LLaVA-1.5 only")
    if refused is not None:  # at apply, before any call
        with pytest.raises(refused[0], match=refused[1]):
            tp.apply(m, spec, budget=budget)
        return
    with torch.no_grad(), tp.apply(m, spec, budget=budget) as h:
        m(**inp)
    rec = h.last
    assert rec.modalities == ("image", "image", "video", "video")
    left = rec.llm_kept[-1] if spec.llm is not None else rec.kept
    assert bool((left <= rec.total).all()) and bool((left[2:] < rec.total[2:]).all()), (path, left, rec.total)  # videos pruned
