"""``tokenprune demo``: CLASP on synthetic LLaVA-1.5-shaped inputs (24 x 24 patches, 24 encoder
layers), one prompt per question class, with a map of what each class keeps.

The inputs are synthetic: a background plus a few "objects" (patches whose features share a
direction and that draw [CLS] attention). The demo shows the mechanics (routing, the class's
layer mix and pivot ratio, pivots vs completion tokens, timing), not model accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import tokenprune as tp
from tokenprune.contract import Provenance

PROMPTS = [
    "What number is written on the sign?",
    "How many red triangles are there?",
    "Is the star left of the circle?",
    "What color is the square?",
    "Is there a green hexagon?",
    "What kind of background is this?",
    "What is the sum of the two digits?",
]
H = W = 24
L, Dv, D = 24, 64, 96


def synthetic_batch(B: int, seed: int = 0) -> tp.VisualTokens:
    g = torch.Generator().manual_seed(seed)
    M = H * W
    objects = [(3, 4, 3), (10, 15, 2), (18, 6, 4), (20, 20, 2), (6, 19, 1)]  # row, col, radius
    pos = tp.grid_positions(H, W)[0]  # (M, 2)
    owner = torch.full((M,), -1)
    for i, (r, c, rad) in enumerate(objects):
        owner[((pos - torch.tensor([r, c])).abs().amax(-1) < rad)] = i
    dirs = torch.randn(len(objects) + 1, D, generator=g)
    base = dirs[owner.clamp_min(0) * (owner >= 0) + (owner < 0) * len(objects)]  # (M, D)
    projected = (base + 0.6 * torch.randn(B, M, D, generator=g))  # (B, M, D)
    layers = {l: torch.randn(B, M, Dv, generator=g) for l in range(1, L + 1)}
    logits = (owner >= 0).float() * 3 + 0.5 * torch.randn(B, 16, M, generator=g)
    return tp.VisualTokens(
        layers=layers, num_layers=L, cls_attention={L - 1: logits.softmax(-1)}, projected=projected,
        positions=tp.grid_positions(H, W, B), prompts=PROMPTS[:B],
    )


def _map(sel: tp.Selection, b: int) -> list[str]:
    grid = [["."] * W for _ in range(H)]
    for i, p in zip(sel.row(b).tolist(), sel.provenance[b].tolist(), strict=True):
        grid[i // W][i % W] = "P" if p == Provenance.PIVOT else "c"
    return ["".join(r) for r in grid]


def run_demo(spec_path: str | Path, budget: int = 64) -> int:
    pipe = tp.Pipeline.from_file(spec_path)
    tokens = synthetic_batch(len(PROMPTS))
    pipe(tokens, budget=budget)  # warm-up
    t0 = time.perf_counter()
    sel = pipe(tokens, budget=budget)
    ms = (time.perf_counter() - t0) * 1e3
    print(f"spec: {pipe.spec.name} ({spec_path}); budget {budget} of {H * W} tokens per image; "
          f"batch of {len(PROMPTS)} prompts; synthetic {H}x{W}-patch inputs with {L} encoder layers")
    print(f"pruning the whole batch took {ms:.1f} ms on the CPU\n")
    for b, prompt in enumerate(PROMPTS):
        cls = sel.routing.classes[b]
        prov = sel.provenance[b, : int(sel.counts[b])]
        k1 = int((prov == Provenance.PIVOT).sum())
        alpha = sel.alpha[b]
        top = alpha.topk(3).indices.add(1).tolist()
        print(f"[{b}] {prompt!r}")
        print(f"    class {cls} (confidence {float(sel.routing.confidence[b]):.2f}); pivot ratio "
              f"{float(sel.pivot_ratio[b]):.2f}; kept {int(sel.counts[b])} = {k1} pivots + "
              f"{int(sel.counts[b]) - k1} completion; heaviest encoder layers {top}")
    print("\nkept tokens of the first two prompts (P pivot, c completion, . dropped):")
    for line_a, line_b in zip(_map(sel, 0), _map(sel, 1), strict=True):
        print(f"    {line_a}    {line_b}")
    return 0
