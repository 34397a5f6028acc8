"""Where does a v2 checkpoint look, and what does it answer? A diagnostic for the plateau.

For the 64 held-out val scenes (the training curve's), one question per class, it prints per class:

- the accuracy and the most frequent answers (a constant answer is a prior, not a read-out);
- per decoder layer, the attention of the answer position (the head that puts the most mass on
  the evidence cells): ``lift``, the mass per evidence cell over the uniform 1/576, and ``sel``,
  the median over questions of the mass per evidence cell over the mass per cell of the scene's
  other objects (1: it does not tell the named object from the others);
- the alignment of the projected patches with their words (colour, shape, digit; argmax among
  those words only, and over the whole vocabulary).

Usage (from the repository root, after ``tokenprune testbed train --version 2`` built the val
features):

  .venv/bin/python lab/tools/v2_readout_probe.py checkpoints/testbed-v2/checkpoint.pt

A research tool, not part of the package; docs/testbed.md records what it measured.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np
import torch
from tokenprune_lab.testbed.features import FeaturePool
from tokenprune_lab.testbed.model import ARCH_V2, arch_with, build
from tokenprune_lab.testbed.questions import QA_CLASSES, _cells, ask
from tokenprune_lab.testbed.scenes import COLORS, SHAPES
from tokenprune_lab.testbed.splits import scene as split_scene
from tokenprune_lab.testbed.train import Packer, _align_targets

M = 576


def _load(path: str):
    ck = torch.load(path, weights_only=False)
    cfg = ck.get("config", {})
    model, tok = build(0, arch=arch_with(cfg.get("arch"), base=ARCH_V2))
    model.load_state_dict(ck["model"], strict=False)
    model.set_attn_implementation("eager")  # attention weights
    return model.eval(), tok, cfg.get("feature_gain", 1.0), ck["state"]["step"]


def _head_stats(attn, b: int, slot: int, first: int, evidence, others):
    """(lift, selectivity) of the head with the most evidence mass, for one question."""
    a = attn[b, :, slot]  # (H, T)
    per_ev = a[:, [first + c for c in evidence]].sum(-1) / len(evidence)  # (H,)
    h = int(per_ev.argmax())
    lift = float(per_ev[h] * M)
    if not others:
        return lift, float("nan")
    per_other = a[h, [first + c for c in others]].sum() / len(others)
    return lift, float(per_ev[h] / (per_other + 1e-9))


@torch.no_grad()
def main(path: str) -> None:
    model, tok, gain, step = _load(path)
    val = FeaturePool(Path("runs/v2/features-val"), model, None, 64, source="val")
    packer = Packer(tok, M)
    first = len(packer.prefix) - M
    rows, answers = collections.defaultdict(list), collections.defaultdict(collections.Counter)
    for start in range(0, 64, 8):
        idx = list(range(start, start + 8))
        scenes = [split_scene("val", i) for i in idx]
        qs = [[q for c in QA_CLASSES if (q := ask(s, c, 0)) is not None] for s in scenes]
        ids, mask, pos, slots, _ = packer.pack(qs)
        image = model.model.multi_modal_projector(val.features(idx) * gain)  # (B, M, D)
        embeds = model.get_input_embeddings()(ids).masked_scatter((ids == packer.image_id)[..., None], image)
        additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))  # eager adds the mask
        out = model.model.language_model(inputs_embeds=embeds, attention_mask=additive, position_ids=pos,
                                         output_attentions=True)
        pred = model.lm_head(out.last_hidden_state[slots[:, 0], slots[:, 1]]).argmax(-1)
        n = 0
        for b, (s, ql) in enumerate(zip(scenes, qs, strict=True)):
            objects = set(_cells(*s.objects))
            for q in ql:
                slot, p = int(slots[n, 1]), tok.decode([int(pred[n])]).strip()
                n += 1
                answers[q.klass][p] += 1
                stats = [(_head_stats(A, b, slot, first, q.evidence, sorted(objects - set(q.evidence)))
                          if q.evidence else (float("nan"), float("nan"))) for A in out.attentions]
                rows[q.klass].append((p == q.answer, stats))
    print(f"step {step}, feature gain {gain}")
    for k in QA_CLASSES:
        acc = np.mean([c for c, _ in rows[k]])
        stats = np.array([s for _, s in rows[k]])  # (n, L, 2)
        layers = " ".join(f"L{i}: lift {np.nanmean(stats[:, i, 0]):5.1f} sel {np.nanmedian(stats[:, i, 1]):6.1f}"
                          for i in range(stats.shape[1]))
        print(f"{k:9s} acc {acc:.2f}  answers {dict(answers[k].most_common(3))}  {layers}")
    _alignment(model, packer, val, gain)


def _alignment(model, packer: Packer, val: FeaturePool, gain: float) -> None:
    idx = list(range(32))
    image = model.model.multi_modal_projector(val.features(idx) * gain)
    logits = model.lm_head(image)  # (B, M, V)
    targets = _align_targets([split_scene("val", i) for i in idx], packer.answer)
    for k, words in (("color", list(COLORS)), ("shape", list(SHAPES)), ("digit", [str(d) for d in range(10)])):
        ids = torch.tensor([packer.answer(w) for w in words])
        t = targets[k]
        has = t >= 0
        among = ids[logits[..., ids].argmax(-1)]
        print(f"alignment {k}: {(among[has] == t[has]).float().mean():.3f} among its words, "
              f"{(logits.argmax(-1)[has] == t[has]).float().mean():.3f} over the vocabulary")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
