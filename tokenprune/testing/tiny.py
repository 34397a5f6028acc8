"""Tiny random models of the built-in families, built from configs (no download), and batches of
left-padded image and video prompts for them: what the adapter kit
(:mod:`tokenprune.testing.adapters`) runs the built-in families on, and what tokenprune's own
tests build.

Token ids: 0 pad, 1 bos, 5 image, 6 video, 7 vision start, 8 vision end; text ids are drawn
from 10..199.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

PAD, BOS, IMG, VID, VSTART, VEND = 0, 1, 5, 6, 7, 8
VOCAB = 200
FAMILIES = ("llava", "llava-dinov2", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl")
#: towers without a [CLS] token (score them by received attention)
NO_CLS = ("llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl")
#: LLaVA-1.5 with one 56-px image per prompt: a CLIP tower, or a DINOv2 tower (the testbed v2 shape).
ONE_CROP_LLAVA = ("llava", "llava-dinov2")


def _text(layers: int = 2, **extra):
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS,
                eos_token_id=2, **extra)


def _dinov2(image_size: int) -> Any:
    tf: Any = importlib.import_module("transformers")  # transformers' configs type their keywords narrowly
    return tf.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                        image_size=image_size, patch_size=14, layerscale_value=0.5)


def _clip(image_size: int) -> Any:
    tf: Any = importlib.import_module("transformers")
    return tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                            image_size=image_size, patch_size=14)


_QWEN_IDS: dict[str, Any] = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
_MROPE: dict[str, Any] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}


def build(family: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa", seed: int = 0, text_layers: int = 2):
    """A tiny ``*ForConditionalGeneration`` of ``family`` in eval mode (``text_layers`` decoder layers)."""
    tf: Any = importlib.import_module("transformers")

    torch.manual_seed(seed)
    if family in ONE_CROP_LLAVA:
        # the DINOv2 tower says it was pretrained at 98 px and is fed 56 px, as testbed v2's (518, fed
        # 336): its position embeddings are interpolated and the tower's image_size is not the input's
        tower = _clip(56) if family == "llava" else _dinov2(98)
        cfg = tf.LlavaConfig(vision_config=tower, text_config=tf.LlamaConfig(**_text(text_layers)),
                             image_token_id=IMG, vision_feature_layer=-2)
        cls = tf.LlavaForConditionalGeneration
    elif family == "llava-next":
        cfg = tf.LlavaNextConfig(vision_config=_clip(28), text_config=tf.LlamaConfig(**_text(text_layers)), image_token_id=IMG,
                                 vision_feature_layer=-2, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
        cls = tf.LlavaNextForConditionalGeneration
    elif family == "llava-onevision":  # a SigLIP tower (no [CLS]); grids above one crop's worth are resized
        from transformers import SiglipVisionConfig

        tower = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   image_size=56, patch_size=14, vision_use_head=False)
        cfg = tf.LlavaOnevisionConfig(vision_config=tower, text_config=tf.Qwen2Config(**_text(text_layers)),
                                      image_token_id=IMG, video_token_id=VID, vision_feature_layer=-2,
                                      vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
                                      image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])
        cls = tf.LlavaOnevisionForConditionalGeneration
    elif family in ("qwen2-vl", "qwen2.5-vl"):
        vision: dict[str, Any] = dict(depth=3, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2)
        if family == "qwen2-vl":
            vision.update(embed_dim=32, mlp_ratio=2, hidden_size=64)
            cfg = tf.Qwen2VLConfig(vision_config=vision, text_config=_text(text_layers, rope_parameters=_MROPE), **_QWEN_IDS)
            cls = tf.Qwen2VLForConditionalGeneration
        else:
            vision.update(intermediate_size=64, out_hidden_size=64, window_size=56, fullatt_block_indexes=[2])
            cfg = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=_text(text_layers, rope_parameters=_MROPE), **_QWEN_IDS)
            cls = tf.Qwen2_5_VLForConditionalGeneration
    elif family == "qwen3-vl":
        vision3: dict[str, Any] = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16, spatial_merge_size=2,
                      out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        text = _text(text_layers, head_dim=16, rope_parameters=dict(_MROPE, mrope_interleaved=True))
        cfg = tf.Qwen3VLConfig(vision_config=vision3, text_config=text, **_QWEN_IDS)
        cls = tf.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(family)
    model = cls._from_config(cfg, attn_implementation=attn, dtype=dtype) if hasattr(cls, "_from_config") else cls(cfg)
    return model.eval()


@dataclass
class Sample:
    """One prompt: text ids before/after its visual inputs, the images' sizes in pixels and (Qwen
    families) the videos' ``(frames, height, width)``; the videos come before the images in the
    prompt, so the sequence order differs from the item order (images first)."""

    before: list[int]
    after: list[int]
    sizes: list[tuple[int, int]]
    videos: list[tuple[int, int, int]] = field(default_factory=list)


def _qwen_patch(family: str) -> int:
    return 16 if family == "qwen3-vl" else 14


def batch(model, family: str, samples: list[Sample], seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-like inputs for ``samples``, left-padded, in the model's dtype."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    rows: list[list[int]] = []
    extra: dict[str, Any] = {}
    if family in ONE_CROP_LLAVA:
        n = (56 // 14) ** 2
        images = [torch.randn(3, 56, 56, generator=g) for s in samples for _ in s.sizes]
        rows = [s.before + [IMG] * (n * len(s.sizes)) + s.after for s in samples]
        extra["pixel_values"] = torch.stack(images).to(dtype)
    elif family == "llava-next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = model.config
        sizes, crops = [], []
        for s in samples:
            for hw in s.sizes:
                sizes.append(list(hw))
                crops.append(image_size_to_num_patches(image_size=hw, grid_pinpoints=cfg.image_grid_pinpoints,
                                                       patch_size=cfg.vision_config.image_size))
        C = max(crops)
        pix = torch.zeros(len(sizes), C, 3, 28, 28)
        for i, c in enumerate(crops):
            pix[i, :c] = torch.randn(c, 3, 28, 28, generator=g)
        image_sizes = torch.tensor(sizes)
        # the model's own packer tells the token count of each image
        feats = [torch.zeros(c, 4, 1) for c in crops]
        packed, lens = model.model.pack_image_features(feats, image_sizes, "default", image_newline=torch.zeros(1))
        counts = iter(lens.tolist())
        rows = [s.before + sum(([IMG] * next(counts) for _ in s.sizes), []) + s.after for s in samples]
        extra.update(pixel_values=pix.to(dtype), image_sizes=image_sizes)
    elif family == "llava-onevision":
        rows, extra = _onevision(model, samples, g, dtype)
    else:
        p = _qwen_patch(family)
        image = [[1, h // p, w // p] for s in samples for (h, w) in s.sizes]
        video = [[t, h // p, w // p] for s in samples for (t, h, w) in s.videos]
        rows = [s.before + sum((_qwen_video(family, t, h // p, w // p) for t, h, w in s.videos), [])
                + sum(([VSTART] + [IMG] * ((h // p) * (w // p) // 4) + [VEND] for h, w in s.sizes), []) + s.after
                for s in samples]
        for name, grids in (("pixel_values", image), ("pixel_values_videos", video)):
            if grids:
                grid = torch.tensor(grids)
                extra[name] = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * p * p, generator=g).to(dtype)
                extra["image_grid_thw" if name == "pixel_values" else "video_grid_thw"] = grid
    ids, mask = left_pad(rows)
    out = dict(input_ids=ids, attention_mask=mask, **extra)
    if family.startswith("qwen"):
        out["mm_token_type_ids"] = (ids == IMG).int() + 2 * (ids == VID).int()
    return out


def _onevision(model, samples: list[Sample], g: torch.Generator, dtype: torch.dtype) -> tuple[list[list[int]], dict]:
    """LLaVA-OneVision inputs: anyres crops per image (one crop used per image of a multi-image
    prompt, as the model does with batch_num_images), videos of ``frames`` 56-px frames."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    cfg = model.config
    sizes, crops = [], []
    for s in samples:
        for hw in s.sizes:
            sizes.append(list(hw))
            c = image_size_to_num_patches(image_size=hw, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=56)
            crops.append(c if len(s.sizes) == 1 else 1)
    extra: dict = {}
    image_slots: list[int] = []
    if sizes:
        pix = torch.zeros(len(sizes), max(crops), 3, 56, 56)
        for i, c in enumerate(crops):
            pix[i, :c] = torch.randn(c, 3, 56, 56, generator=g)
        image_sizes = torch.tensor(sizes)
        feats = [torch.zeros(c, 16, 1) for c in crops]
        _, lens = model.model.pack_image_features(feats, image_sizes, image_newline=torch.zeros(1),
                                                  vision_aspect_ratio=cfg.vision_aspect_ratio)
        image_slots = lens.tolist()
        extra.update(pixel_values=pix.to(dtype), image_sizes=image_sizes,
                     batch_num_images=torch.tensor([len(s.sizes) for s in samples]))
    frames = {t for s in samples for t, _, _ in s.videos}
    if frames:
        assert len(frames) == 1, "one frame count per batch (pixel_values_videos is one tensor)"
        F = frames.pop()
        n = sum(len(s.videos) for s in samples)
        extra["pixel_values_videos"] = torch.randn(n, F, 3, 56, 56, generator=g).to(dtype)
    slots = iter(image_slots)
    rows = [s.before + sum(([VID] * (t * 4 + 1) for t, _, _ in s.videos), [])
            + sum(([IMG] * next(slots) for _ in s.sizes), []) + s.after for s in samples]
    return rows, extra


#: a timestamp's text id: Qwen3-VL's processor writes "<t seconds>" before each frame
TIMESTAMP = 9


def _qwen_video(family: str, t: int, gh: int, gw: int) -> list[int]:
    """A video's placeholder run: one block of ``t`` frames, or (Qwen3-VL) one timestamped block per frame."""
    per_frame = gh * gw // 4
    if family == "qwen3-vl":
        return sum(([TIMESTAMP, VSTART] + [VID] * per_frame + [VEND] for _ in range(t)), [])
    return [VSTART] + [VID] * (t * per_frame) + [VEND]


def rows_of(inp: dict[str, Any], b: int, family: str, per_image: list[int]) -> dict[str, Any]:
    """The b-th sample of a batch as its own unpadded batch of one."""
    keep = inp["attention_mask"][b].bool()
    out = {"input_ids": inp["input_ids"][b, keep][None], "attention_mask": inp["attention_mask"][b, keep][None]}
    first = sum(per_image[:b])
    sl = slice(first, first + per_image[b])
    if family.startswith("llava"):
        out["pixel_values"] = inp["pixel_values"][sl]
        if family in ("llava-next", "llava-onevision"):
            out["image_sizes"] = inp["image_sizes"][sl]
        if family == "llava-onevision":
            out["batch_num_images"] = inp["batch_num_images"][b : b + 1]
    else:
        grid = inp["image_grid_thw"]
        patches = grid.prod(-1)
        start = int(patches[:first].sum())
        out["pixel_values"] = inp["pixel_values"][start:start + int(patches[sl].sum())]
        out["image_grid_thw"] = grid[sl]
        out["mm_token_type_ids"] = inp["mm_token_type_ids"][b, keep][None]
    return out


def hand_kept(total: torch.Tensor, budget, frames: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens each row keeps, by hand: ``round(share * M)`` (at least 1) for a float, the count for
    an int, ``tokens * frames`` for a per-frame budget; never more than the row's ``total``."""
    M = total.cpu()
    if isinstance(budget, float):
        want = torch.round(M.double() * budget).long().clamp_min(1)
    elif isinstance(budget, int):
        want = torch.full_like(M, budget)
    else:  # tokenprune.Budget.per_frame
        assert budget.form == "per_frame" and frames is not None
        want = frames * budget.tokens
    return torch.minimum(want, M)


def greedy_token(logits: torch.Tensor, model) -> int:
    """A hand-written greedy loop's next token from ``(V,)`` logits, under the rule the tests give
    ``generate`` (``min_new_tokens = max_new_tokens``): the end-of-sequence tokens are never chosen,
    so neither the loop nor ``generate`` ends early."""
    eos = model.generation_config.eos_token_id
    step = logits.clone()
    step[[eos] if isinstance(eos, int) else list(eos or [])] = float("-inf")
    return int(step.argmax())


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded with PAD into ``(B, S)`` ids and their attention mask (test set-up)."""
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), PAD)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, S - len(r):] = torch.tensor(r)
        mask[b, S - len(r):] = 1
    return ids, mask


def default_sizes(family: str) -> list[tuple[int, int]]:
    """Image sizes that give a few dozen tokens and, for the anyres/Qwen families, different counts."""
    return {
        "llava": [(56, 56)],
        "llava-dinov2": [(56, 56)],
        "llava-next": [(28, 56), (56, 56), (56, 28)],
        "llava-onevision": [(56, 112), (112, 112), (100, 60)],
        "qwen2-vl": [(56, 56), (56, 112), (112, 56)],
        "qwen2.5-vl": [(56, 56), (112, 112), (56, 112)],
        "qwen3-vl": [(64, 64), (64, 128), (128, 64)],
    }[family]


def samples(family: str, n: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    sizes = default_sizes(family)
    out = []
    for i in range(n):
        k = int(torch.randint(2, 6, (1,), generator=g))
        before = [BOS] + torch.randint(10, VOCAB, (k,), generator=g).tolist()
        after = torch.randint(10, VOCAB, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        out.append(Sample(before, after, [sizes[i % len(sizes)]]))
    return out
