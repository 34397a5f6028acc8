"""Random stage inputs for property tests: a batch of :class:`~tokenprune.contract.VisualTokens`
with padding, signals and prompts, and the views the properties compare (one row, a permutation,
a snapshot of every input tensor).

Used by :mod:`tokenprune.testing.conformance` and by tokenprune's own tests. Needs the ``test``
extra (hypothesis).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from hypothesis import strategies as st

import tokenprune as tp

__all__ = ["DTYPES", "PROMPTS", "make_tokens", "row", "permute", "snapshot", "batches"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PROMPTS = [
    "How many red triangles are there?",
    "What number is written in the box?",
    "Is the star left of the circle?",
    "What color is the square?",
    "Is there a green hexagon?",
    "What kind of background is this?",
    "What is the sum of the two digits?",
    "Tell me about it.",
]


def make_tokens(
    B: int,
    M: int,
    *,
    L: int = 4,
    Dv: int = 8,
    D: int = 12,
    H: int = 2,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    valid_counts: list[int] | None = None,
    scatter_padding: bool = True,
    grid: tuple[int, int] | None = None,
    signal_layers: Iterable[int] | None = None,
) -> tp.VisualTokens:
    """A random batch. Rows may have fewer valid tokens (``valid_counts``), with the padding
    scattered through the row (``scatter_padding``) or at its end.

    Every hidden state ``0..L`` is present. The attention signals, keys and [CLS] states are at
    layer ``L - 1``, or at every layer of ``signal_layers`` (then drawn after the rest, so the
    other tensors do not change)."""
    g = torch.Generator().manual_seed(seed)
    layers = {l: torch.randn(B, M, Dv, generator=g).to(device=device, dtype=dtype) for l in range(L + 1)}
    W = (torch.randn(Dv, D, generator=g) / Dv**0.5).to(device=device, dtype=dtype)
    mask = torch.ones(B, M, dtype=torch.bool)
    if valid_counts is not None:
        for b, n in enumerate(valid_counts):  # test set-up only
            order = torch.randperm(M, generator=g) if scatter_padding else torch.arange(M)
            mask[b, order[n:]] = False
    cls = torch.rand(B, H, M, generator=g).softmax(-1)
    recv = torch.rand(B, H, M, generator=g)
    text = torch.randn(B, D, generator=g)
    keys = torch.randn(B, M, 6, generator=g)
    cls_token = torch.randn(B, Dv, generator=g)
    if grid is None:
        grid = (M, 1)
    positions = tp.grid_positions(*grid, batch=B) if grid[0] * grid[1] == M else None
    prompts = [PROMPTS[int(i)] for i in torch.randint(len(PROMPTS), (B,), generator=g)]
    signals = {L - 1: (cls, recv, keys, cls_token)}
    if signal_layers is not None:
        signals = {l: (torch.rand(B, H, M, generator=g).softmax(-1), torch.rand(B, H, M, generator=g),
                       torch.randn(B, M, 6, generator=g), torch.randn(B, Dv, generator=g)) for l in signal_layers}
    return tp.VisualTokens(
        layers=layers,
        num_layers=L,
        mask=mask.to(device),
        positions=None if positions is None else positions.to(device),
        cls_attention={l: s[0].to(device) for l, s in signals.items()},
        received_attention={l: s[1].to(device) for l, s in signals.items()},
        text_embedding=text.to(device=device, dtype=dtype),
        project=lambda z: z @ W,
        prompts=prompts,
        sample_keys=torch.arange(B, dtype=torch.int64).to(device) * 7919,
        attention_keys={l: s[2].to(device=device, dtype=dtype) for l, s in signals.items()},
        cls_token={l: s[3].to(device=device, dtype=dtype) for l, s in signals.items()},
    )


def row(tokens: tp.VisualTokens, b: int) -> tp.VisualTokens:
    """Sample ``b`` of a batch as a batch of one."""
    take = lambda t: None if t is None else t[b : b + 1]  # noqa: E731
    return replace(
        tokens,
        layers={k: v[b : b + 1] for k, v in tokens.layers.items()},
        mask=take(tokens.mask),
        positions=take(tokens.positions),
        cls_attention={k: v[b : b + 1] for k, v in tokens.cls_attention.items()},
        received_attention={k: v[b : b + 1] for k, v in tokens.received_attention.items()},
        text_embedding=take(tokens.text_embedding),
        prompts=[tokens.prompts[b]],
        sample_keys=take(tokens.sample_keys),
        attention_keys={k: v[b : b + 1] for k, v in tokens.attention_keys.items()},
        cls_token={k: v[b : b + 1] for k, v in tokens.cls_token.items()},
    )


def permute(tokens: tp.VisualTokens, perm: torch.Tensor) -> tp.VisualTokens:
    """Reorder the tokens of every row by ``perm`` (``(M,)``): new token i = old token perm[i]."""
    p = perm.to(tokens.device)
    pick = lambda t: None if t is None else t[:, p]  # noqa: E731
    return replace(
        tokens,
        layers={k: v[:, p] for k, v in tokens.layers.items()},
        mask=pick(tokens.mask),
        positions=pick(tokens.positions),
        cls_attention={k: v[..., p] for k, v in tokens.cls_attention.items()},
        received_attention={k: v[..., p] for k, v in tokens.received_attention.items()},
        attention_keys={k: v[:, p] for k, v in tokens.attention_keys.items()},
    )


def snapshot(tokens: tp.VisualTokens) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ts = list(tokens.layers.values()) + list(tokens.cls_attention.values())
    ts += list(tokens.received_attention.values()) + list(tokens.attention_keys.values())
    ts += [t for t in (tokens.mask, tokens.positions, tokens.text_embedding, tokens.sample_keys) if t is not None]
    return [t.clone() for t in ts], ts



@st.composite
def batches(draw, max_B: int = 4, max_M: int = 24, min_M: int = 1):
    """Sizes first (including M = 1 and budgets at and beyond M), then a seed for the data."""
    B = draw(st.integers(1, max_B))
    M = draw(st.integers(min_M, max_M))
    counts = [draw(st.integers(1, M)) for _ in range(B)]
    seed = draw(st.integers(0, 2**31 - 1))
    budget = draw(st.one_of(st.integers(1, M + 3), st.lists(st.integers(1, M + 3), min_size=B, max_size=B)))
    return dict(B=B, M=M, valid_counts=counts, seed=seed, budget=budget)
