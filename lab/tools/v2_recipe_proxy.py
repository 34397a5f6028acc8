"""A fast proxy for the v2 training recipe: can a fresh decoder learn one class in a few hundred steps?

The full v2 run costs about 2 s a step and sat on its plateau for 3000 steps, so a recipe change
cannot be judged on it. This proxy trains a fresh v2 projector and decoder (the recipe's own
``build``, ``mimetic_init``, ``qa_loss`` and the cached pool of ``tokenprune testbed train
--version 2``) on 4 pool scenes of 1-2 objects a step, with 3 questions of the chosen classes per
scene plus the has-colour / has-shape auxiliary questions, and prints the training-stream accuracy
every 50 steps (about 0.45 s a step on one core). Variants are one JSON object:

  lr, qk_std, mimetic          optimiser rate, mimetic init scale, mimetic init on/off
  arch                         overrides of model.ARCH_V2 (e.g. {"text": {"rope_parameters": ...}})
  align                        weight of the alignment loss (0.5 in the recipe)
  bg_align: "pad"              also align background patches to one word (the pad token)
  scale                        multiply the tower features by this before the projector
  lsuv, center                 scale the projector's first layer so its pre-activations have this
                               std over pool patches; centre them with its bias (default true)
  feat_norm                    layer-norm each tower feature (no such layer in LLaVA: diagnostic)
  oracle: 1                    replace the features by clean codes: one random vector per colour
                               plus one per shape on object cells, one constant vector (+ noise)
                               on the background
  oracle: "objects"            clean codes on object cells only (at the real features' norm),
                               the real DINOv2 features on the background
  yes_init: 1                  start "yes" at the mean embedding of the colour and shape words, "no"
                               at the mean of the background words (tied embeddings)
  layer: L                     read tower layer L (0 = embeddings, 12 = last) instead of the
                               cached layer -2 (its features for 384 scenes are cached first)

Usage (from the repository root, after the pool is built):

  .venv/bin/python lab/tools/v2_recipe_proxy.py '{"steps": 250, "classes": ["attribute"]}' [threads]

It is a research tool, not part of the package; docs/testbed.md records what it measured.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenprune_lab.testbed import train as recipe
from tokenprune_lab.testbed.features import FeaturePool, pool_scene
from tokenprune_lab.testbed.model import ARCH_V2, arch_with, build, build_processor
from tokenprune_lab.testbed.questions import ask, ask_aux
from tokenprune_lab.testbed.train_v2 import _Pools

POOL = Path("runs/v2/features")
POOL_SIZE = 3200
LAYERS = Path("runs/v2/proxy-layers.pt")


def _layer_features(model, processor, layer: int, pools: _Pools) -> dict:
    """Tower layer ``layer`` for the first 384 pool scenes of 1-2 objects, cached in LAYERS."""
    cache = torch.load(LAYERS) if LAYERS.exists() else {}
    if layer not in cache:
        idx = pools.by_cap[2][:384]
        rows = []
        with torch.no_grad():
            for s in range(0, len(idx), 16):
                images = [pool_scene(int(i)).image for i in idx[s:s + 16]]
                pv = processor.image_processor(images, return_tensors="pt")["pixel_values"]
                rows.append(model.model.vision_tower(pv, output_hidden_states=True).hidden_states[layer][:, 1:].half())
        cache["idx"] = torch.as_tensor(idx)
        cache[layer] = torch.cat(rows)  # (384, M, Dv)
        torch.save(cache, LAYERS)
    return cache


def _scale_projector(model, pool: FeaturePool, std: float, center: bool) -> None:
    with torch.no_grad():
        x = pool.features(list(range(64))).flatten(0, 1)  # (N, Dv)
        lin = model.model.multi_modal_projector.linear_1
        gain = std / (x @ lin.weight.T).std(0).mean()
        lin.weight.mul_(gain)
        lin.bias.copy_(-(x.mean(0) @ lin.weight.T) if center else lin.bias * gain)
    print(f"projector gain {float(gain):.1f}")


def _background_aligned(word_id_of_none: int):
    """The recipe's alignment targets, with background cells aligned to one word as well."""
    plain = recipe._align_targets

    def targets(scenes, word_id):
        t = plain(scenes, word_id)
        background = recipe._cell_labels(scenes, "color") == 0  # (B, M)
        for k in ("color", "shape"):
            t[k] = torch.where(background, torch.full_like(t[k], word_id_of_none), t[k])
        return t
    return targets


def _oracle(kind, scenes, feats: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    colour_code, shape_code = torch.randn(7, 384, generator=g) * 8, torch.randn(6, 384, generator=g) * 8
    colour = torch.from_numpy(np.stack([s.labels.color.reshape(-1) for s in scenes]))  # (B, M)
    shape = torch.from_numpy(np.stack([s.labels.shape.reshape(-1) for s in scenes]))
    background = torch.randn(384, generator=g) * 10
    objects = colour_code[colour] + shape_code[shape]  # (B, M, Dv), norm about 222
    if kind == "objects":
        return torch.where((colour > 0)[..., None], objects * 11 / 222, feats)
    return torch.where((colour > 0)[..., None], objects, background.expand_as(feats)) + 0.5 * torch.randn(feats.shape)


def _answer_init(model, tok) -> None:
    """Start "yes" at the mean embedding of the colour and shape words and "no" at the mean of the
    background words (tied embeddings: the read-out of "an object was attended" exists from step 0)."""
    from tokenprune_lab.testbed.scenes import BACKGROUNDS, COLORS, SHAPES

    emb = model.get_input_embeddings().weight
    ids = lambda words: [tok.convert_tokens_to_ids(w) for w in words]  # noqa: E731
    with torch.no_grad():
        norm = emb.norm(dim=1).mean()
        for word, group in (("yes", [*COLORS, *SHAPES]), ("no", list(BACKGROUNDS))):
            mean = emb[ids(group)].mean(0)
            emb[tok.convert_tokens_to_ids(word)] = mean / mean.norm() * norm


def main(v: dict) -> None:
    torch.manual_seed(0)
    model, tok = build(0, arch=arch_with(v.get("arch"), base=ARCH_V2))
    if v.get("mimetic", True):
        recipe.mimetic_init(model, qk_std=v.get("qk_std"))
    if v.get("yes_init"):
        _answer_init(model, tok)
    processor = build_processor(tok, "dinov2")
    pool, pools = FeaturePool(POOL, model, processor, POOL_SIZE), _Pools(POOL_SIZE)
    packer = recipe.Packer(tok, 576)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    lr = v.get("lr", 1e-3)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    classes = v.get("classes", ["attribute", "existence"])
    layers = _layer_features(model, processor, v["layer"], pools) if "layer" in v else None
    if v.get("lsuv"):
        _scale_projector(model, pool, v["lsuv"], v.get("center", True))
    if v.get("bg_align") == "pad":
        recipe._align_targets = _background_aligned(tok.pad_token_id)  # this process only
    acc, t0 = {}, time.time()
    for step in range(v.get("steps", 300)):
        rng = np.random.default_rng([7, step])
        for g in opt.param_groups:
            g["lr"] = lr * min(1, (step + 1) / 50)
        if layers is not None:
            rows = torch.as_tensor(rng.choice(len(layers["idx"]), size=v.get("batch", 4), replace=False))
            idx, feats = [int(layers["idx"][r]) for r in rows], layers[v["layer"]][rows].float()
        else:
            idx = pools.draw(rng, v.get("cap", 2), v.get("batch", 4))
            feats = pool.features(idx)  # (B, M, Dv)
        scenes = [pool_scene(i) for i in idx]
        questions = [[q for d in range(3) for c in classes if (q := ask(s, c, step * 3 + d)) is not None]
                     + [q for q in ask_aux(s, 1, first=step) if q.klass in ("aux:has-color", "aux:has-shape")]
                     for s in scenes]
        if v.get("oracle"):
            feats = _oracle(v["oracle"], scenes, feats)
        feats = feats * v.get("scale", 1.0)
        if v.get("feat_norm"):
            feats = F.layer_norm(feats, feats.shape[-1:])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, klasses, correct = recipe.qa_loss(model, packer, scenes, questions, v.get("align", 0.5), feats)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, c in zip(klasses, correct, strict=True):
            acc.setdefault(k, []).append(c)
        if (step + 1) % 50 == 0:
            means = {k: round(float(np.mean(x)), 2) for k, x in sorted(acc.items())}
            print(step + 1, f"{time.time() - t0:.0f}s", means, round(float(loss.detach()), 3), flush=True)
            acc = {}


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    main(json.loads(sys.argv[1]))
