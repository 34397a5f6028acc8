"""``tokenprune bench prefill``: end-to-end prefill and decode, unpruned vs pruned, side by side.

For each batch size and budget ``R`` (visual tokens kept per image or video, or a share of them) it
measures, in one run:

- prefill latency: the first model call (vision tower + projector + LLM over the prompt,
  ``logits_to_keep=1``), unpruned and inside :func:`tokenprune.apply`;
- decode latency per token: inside one ``generate`` of ``n + 1`` tokens, the time from the end of
  the prefill to the end of the last decode step, divided by ``n``;
- memory: the KV cache the prefill leaves (exact, from the returned cache), and on CUDA the
  peak ``max_memory_allocated`` above the pre-call level. On the CPU the peak is not reported:
  sampling the resident set misses blocks that live for a millisecond;
- the pruning overhead (route + select + assemble, from the handle's record) and its share of
  the pruned prefill;
- the tower's part: unpruned, the vision tower and projector alone on the same pixels; pruned,
  the record's ``encode`` step (the tower with the attention signals the spec reads). What is left
  of a prefill after the tower and the overhead is the LLM's.

Each speed-up is printed next to two bounds:

- the token-count ratio ``(T + M) / (T + R)``, ``T`` = text tokens of the prompt, ``M`` = its
  visual tokens (576 per LLaVA-1.5 image; a 16-frame video on the Qwen2-VL models);
- the roofline bound: the pruned prefill can be no faster than its FLOPs at the unpruned run's
  achieved FLOP rate, nor than one read of the weights at the device's measured memory
  bandwidth, i.e. ``min(F_unpruned / F_pruned, t_unpruned / (W / BW))``.

FLOPs are counted analytically from the configs (matmuls ``2 * params * tokens`` plus causal
attention ``2 * L * d * S^2`` in the LLM and full attention ``4 * L * d * S^2`` in the tower, per
frame in the Qwen2-VL tower, which attends within each temporal patch).

The video case (``--model qwen2-vl-video`` on the CPU, ``qwen2-vl-2b-video`` on a GPU) is a
Qwen2-VL-shaped model with random weights fed one 16-frame clip per prompt; its default budgets
are 10 %, 25 % and 50 % of the clip's tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import tokenprune as tp

MODELS = ("smollm2", "llava-1.5-7b", "tiny", "qwen2-vl-video", "qwen2-vl-2b-video")
#: the video models: Qwen2-VL-shaped, one 16-frame clip per prompt
VIDEO_MODELS = ("qwen2-vl-video", "qwen2-vl-2b-video")
FRAMES = 16


@dataclass
class Row:
    batch: int
    budget: int | float  # R (tokens, or a share of each item's); M = unpruned
    kept: int  # visual tokens per item that reached the LLM
    text_tokens: int
    prefill_ms: float
    decode_ms_per_token: float
    peak_mem_mb: float  # CUDA: max_memory_allocated above the entry level; CPU: not measured (nan)
    kv_cache_mb: float
    speedup: float = 1.0
    token_bound: float = 1.0
    roofline_bound: float = 1.0
    share_of_roofline: float = 1.0
    overhead_ms: float = 0.0
    overhead_share: float = 0.0
    tower_ms: float = 0.0  # unpruned: tower + projector alone; pruned: the record's encode step
    flops: float = 0.0
    pruned: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- models -------------------------------------------------------------------------------------
def build_model(name: str, device: str, dtype: torch.dtype):
    """``(model, make_inputs(B) -> dict, tokenizer)`` for a benchmark model."""
    import transformers as tf

    if name == "smollm2":
        from . import smollm

        model, processor = smollm.load(dtype=dtype)
        model = model.to(device)

        def make(B: int) -> dict:
            texts = [smollm.chat(processor, "How many shapes are in the picture?")] * B
            pics = [smollm.picture(i) for i in range(B)]
            enc = processor(images=pics, text=texts, return_tensors="pt", padding=True)
            return {k: v.to(device) for k, v in enc.items()}

        return model, make, processor
    if name in VIDEO_MODELS:
        return _video_model(name, device, dtype)
    if name == "llava-1.5-7b":  # the full-size architecture, random weights
        vision = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = tf.LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                              pad_token_id=0)
        cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2)
    elif name == "tiny":
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, image_size=336, patch_size=14)
        text = tf.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
        cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=999, vision_feature_layer=-2)
    else:
        raise ValueError(f"unknown bench model {name!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model = model.eval()
    image_id = cfg.image_token_id

    def make(B: int) -> dict:
        g = torch.Generator().manual_seed(0)
        text = torch.randint(3, 900, (B, 40), generator=g)
        ids = torch.cat([torch.ones(B, 1, dtype=torch.long), text[:, :5],
                         torch.full((B, 576), image_id), text[:, 5:]], 1)
        pix = torch.randn(B, 3, 336, 336, generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "pixel_values": pix.to(device, dtype)}

    return model, make, None


def _video_model(name: str, device: str, dtype: torch.dtype):
    """A Qwen2-VL with random weights and ``make(B)``: B prompts of one 16-frame clip each.
    ``qwen2-vl-video`` is small enough for a CPU (224 px frames, 512 video tokens);
    ``qwen2-vl-2b-video`` is Qwen2-VL-2B's architecture (336 px frames, 1152 video tokens)."""
    import transformers as tf

    ids = dict(image_token_id=990, video_token_id=991, vision_start_token_id=992, vision_end_token_id=993)
    rope = {"rope_type": "default", "rope_theta": 1e6}
    if name == "qwen2-vl-2b-video":
        side, vocab = 336, 151936
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        text = dict(vocab_size=vocab, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, rope_parameters=dict(rope, mrope_section=[16, 24, 24]))
        ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    else:
        side, vocab = 224, 1000
        vision = dict(depth=4, embed_dim=128, hidden_size=256, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        text = dict(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4, bos_token_id=1, eos_token_id=2,
                    num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(rope, mrope_section=[8, 12, 12]))
    cfg = tf.Qwen2VLConfig(vision_config=vision, text_config=dict(text, pad_token_id=0), **ids)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model = model.eval()
    grid = [FRAMES // 2, side // 14, side // 14]  # temporal patches of 2 frames
    tokens = grid[0] * grid[1] * grid[2] // 4

    def make(B: int) -> dict:
        g = torch.Generator().manual_seed(0)
        text = torch.randint(3, 900, (B, 40), generator=g)
        seq = torch.cat([torch.ones(B, 1, dtype=torch.long), text[:, :5], torch.full((B, 1), ids["vision_start_token_id"]),
                         torch.full((B, tokens), ids["video_token_id"]), torch.full((B, 1), ids["vision_end_token_id"]),
                         text[:, 5:]], 1)
        pix = torch.randn(B * 4 * tokens, 3 * 2 * 14 * 14, generator=g)
        return {"input_ids": seq.to(device), "attention_mask": torch.ones_like(seq).to(device),
                "pixel_values_videos": pix.to(device, dtype), "video_grid_thw": torch.tensor([grid] * B).to(device),
                "mm_token_type_ids": (2 * (seq == ids["video_token_id"]).int()).to(device)}

    return model, make, None


def tower_call(model, inputs: dict) -> Callable[[], Any]:
    """The vision tower and projector alone on ``inputs``' pixels: the part of a prefill that
    pruning after the tower does not shorten."""
    mm = model.model
    if inputs.get("pixel_values_videos") is not None:
        return lambda: mm.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    if inputs.get("image_grid_thw") is not None:
        return lambda: mm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    cfg = model.config
    return lambda: mm.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy)


def count_flops(model, B: int, S: int, inputs: dict) -> float:
    """Analytic forward FLOPs of one prefill with ``S`` LLM positions per prompt, for the images
    or videos of ``inputs``."""
    cfg = model.config
    lm = model.model.language_model
    tc = cfg.get_text_config()
    p_lm = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    flops = B * (2 * p_lm * S + 2 * tc.num_hidden_layers * tc.hidden_size * S * S)
    flops += B * 2 * tc.hidden_size * tc.vocab_size  # lm_head on the last position
    return float(flops) + _tower_flops(model, inputs)


def _tower_flops(model, inputs: dict) -> float:
    vc = model.config.vision_config
    if hasattr(model.model, "visual"):  # Qwen2-VL: attention within each temporal patch, merger on 4-patch units
        grid = torch.cat([inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None]).double()
        patches = float(grid.prod(-1).sum())
        per_frame = float((grid[:, 0] * (grid[:, 1] * grid[:, 2]) ** 2).sum())
        p_merger = sum(p.numel() for p in model.model.visual.merger.parameters())
        p_rest = sum(p.numel() for p in model.model.visual.parameters()) - p_merger
        return 2 * p_rest * patches + 2 * p_merger * patches / 4 + 4 * vc.depth * vc.embed_dim * per_frame
    images = inputs["pixel_values"].shape[0]
    n = (vc.image_size // vc.patch_size) ** 2 + 1
    p_tower = sum(p.numel() for p in model.model.vision_tower.parameters())
    p_proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    return float(images * (2 * p_tower * n + 4 * vc.num_hidden_layers * vc.hidden_size * n * n + 2 * p_proj * (n - 1)))


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- measurement --------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bandwidth(device: str, mbytes: int = 512, repeats: int = 5) -> float:
    """Measured copy bandwidth in bytes/s (read + write)."""
    n = mbytes * 2**20 // 4
    x = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        y.copy_(x)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * x.numel() * 4 / statistics.median(times[1:])


def cache_mb(out: Any) -> float:
    """Size of the KV cache a prefill returned, in MB."""
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)  # renamed in transformers 5.24
    if cache is None:
        return float("nan")
    layers = getattr(cache, "layers", [])
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)
               if t is not None) / 2**20


def _timed(fn: Callable[[], Any], device: str, repeats: int) -> tuple[float, float, Any]:
    """Median seconds over ``repeats`` (after one warm-up), peak memory MB of one call, last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    mem = float("nan")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        mem = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), mem, out


class _Estimate:
    """One progress line per finished row, with the time left for the whole bench (each row's
    cost taken as proportional to its batch size, from the rows measured so far)."""

    def __init__(self, say: Callable[[str], None], batches: Sequence[int], budgets: int):
        self.say, self.t0 = say, time.perf_counter()
        self.rows, self.units = len(batches) * (1 + budgets), sum(batches) * (1 + budgets)
        self.done_rows = self.done_units = 0

    def row_done(self, row: Row) -> None:
        self.done_rows += 1
        self.done_units += row.batch
        spent = time.perf_counter() - self.t0
        left = spent / self.done_units * (self.units - self.done_units)
        what = f"R={row.budget}" if row.pruned else "unpruned"
        self.say(f"row {self.done_rows} of {self.rows} (B={row.batch} {what}): prefill {row.prefill_ms:.1f} ms; "
                 f"{spent:.0f} s so far, about {left:.0f} s left")


def run(
    model_name: str = "smollm2",
    spec: str | Path = "specs/clasp.toml",
    batches: tuple[int, ...] = (1, 8),
    budgets: tuple[int | float, ...] | None = None,
    repeats: int = 3,
    new_tokens: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    say = progress or (lambda m: None)
    if budgets is None:
        budgets = (0.1, 0.25, 0.5) if model_name in VIDEO_MODELS else (192, 128, 64)
    model, make, tokenizer = build_model(model_name, device, dtype)
    bw = bandwidth(device)
    wbytes = weight_bytes(model)
    rows: list[Row] = []
    placeholders = tp.adapters.adapter_for(model).placeholder_ids
    eta = _Estimate(say, batches, len(budgets))
    for B in batches:
        inputs = make(B)
        S = inputs["input_ids"].shape[1]
        M = sum(int((inputs["input_ids"][0] == t).sum()) for t in placeholders)  # visual tokens per prompt
        T = S - M

        extra: dict[str, Any] = {}  # explicit prompts when the model has no tokenizer to decode with

        def prefill():
            with torch.no_grad():
                return model(**inputs, **extra, logits_to_keep=1)

        def decode_ms() -> float:
            """ms per decode step inside one generate call: the spacing of the LLM's call ends."""
            stamps: list[float] = []

            def stamp(*_):
                _sync(device)
                stamps.append(time.perf_counter())

            hook = model.model.language_model.register_forward_hook(stamp)
            try:
                with torch.no_grad():
                    model.generate(**inputs, **extra, max_new_tokens=new_tokens + 1,
                                   min_new_tokens=new_tokens + 1, do_sample=False)
            finally:
                hook.remove()
            return 1e3 * (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # first stamp ends the prefill

        say(f"B={B} unpruned")
        t0, mem0, out = _timed(prefill, device, repeats)
        kv0 = cache_mb(out)
        d0 = statistics.median(decode_ms() for _ in range(repeats))
        f0 = count_flops(model, B, S, inputs)
        with torch.no_grad():
            tower0, _, _ = _timed(tower_call(model, inputs), device, repeats)
        rows.append(Row(B, M, M, T, 1e3 * t0, d0, mem0, kv0, flops=f0, tower_ms=1e3 * tower0))
        eta.row_done(rows[-1])
        for R in budgets:
            say(f"B={B} R={R}")
            with tp.apply(model, spec, budget=R, tokenizer=tokenizer) as handle:
                if tokenizer is None:
                    extra["tokenprune_prompts"] = ["How many shapes are in the picture?"] * B
                over: list[float] = []  # route + select + assemble of each timed call
                encode: list[float] = []  # the tower with the signals the spec reads

                def pruned_prefill():
                    out = prefill()
                    s = handle.last.seconds
                    over.append(s["route"] + s["select"] + s["assemble"])
                    encode.append(s["encode"])
                    return out

                t1, mem1, out = _timed(pruned_prefill, device, repeats)
                kv1 = cache_mb(out)
                rec = handle.last
                d1 = statistics.median(decode_ms() for _ in range(repeats))
                extra.clear()
            kept = int(rec.kept[0])
            f1 = count_flops(model, B, T + kept, inputs)
            bound = min(f0 / f1, t0 / (wbytes / bw))
            speed = t0 / t1
            o = statistics.median(over[1 : repeats + 1])  # the timed calls, not the warm-up
            rows.append(Row(B, R, kept, T, 1e3 * t1, d1, mem1, kv1, speed, (T + M) / (T + kept),
                            bound, speed / bound, 1e3 * o, o / t1, 1e3 * statistics.median(encode[1 : repeats + 1]),
                            f1, pruned=True))
            eta.row_done(rows[-1])
    meta = {
        "model": model_name, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "bandwidth_GBps": bw / 1e9, "weights_MB": wbytes / 2**20,
        "repeats": repeats, "new_tokens": new_tokens, "spec": str(spec),
    }
    return {"meta": meta, "rows": [r.as_dict() for r in rows]}


def format_table(result: dict[str, Any]) -> str:
    m = result["meta"]
    head = (f"{m['model']} on {m['device_name']} ({m['dtype']}), weights {m['weights_MB']:.0f} MB, "
            f"measured bandwidth {m['bandwidth_GBps']:.1f} GB/s, median of {m['repeats']}\n\n")
    lines = ["| B | R | kept | T | prefill ms | tower ms | speed-up | token bound | roofline bound | % of roofline | overhead ms | overhead % | decode ms/tok | KV cache MB | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        pruned = r["pruned"]
        lines.append(
            f"| {r['batch']} | {r['budget'] if pruned else 'unpruned'} | {r['kept']} | {r['text_tokens']} | {r['prefill_ms']:.1f} | "
            f"{r['tower_ms']:.1f} | "
            + (f"{r['speedup']:.2f}x | {r['token_bound']:.2f}x | {r['roofline_bound']:.2f}x | {100 * r['share_of_roofline']:.0f} % | "
               f"{r['overhead_ms']:.1f} | {100 * r['overhead_share']:.1f} % | " if pruned else "- | - | - | - | - | - | ")
            + f"{r['decode_ms_per_token']:.1f} | {r['kv_cache_mb']:.1f} | "
            + ("n/a" if r["peak_mem_mb"] != r["peak_mem_mb"] else f"{r['peak_mem_mb']:.0f}") + " |"
        )
    return head + "\n".join(lines)
