"""Attention probabilities from one encoder layer, without leaving SDPA/FlashAttention.

transformers 5.x attention modules look their kernel up by name in ``AttentionInterface``
(``self.config._attn_implementation``). tokenprune registers one extra kernel,
``"tokenprune-capture"``, that calls the layer's original kernel unchanged and, while an adapter
is encoding, also computes the softmax probabilities it needs from the same ``query``/``key``.

Only the flagged attention modules use it: each gets its *own* shallow copy of its config with
the kernel name changed (:func:`flag_module`); every other layer, and the model's configs, keep
their implementation. :func:`unflag_module` puts the shared config object back.

What is recorded per call (one call per image chunk / window in Qwen towers):

- ``"cls"``: the first query's probabilities over all keys, ``(B, H, S)`` float32;
- ``"received"``: the mean over queries of the probabilities, ``(B, H, S)`` float32;
- ``"keys"``: the keys averaged over (key/value) heads, ``(B, S, Dh)`` float32;
- ``"last"``: the last query's probabilities over all keys, ``(B, H, S)`` float32 (decoder
  layers; with left padding the last column is every row's last token);
- ``"text"``: the probabilities averaged over the query rows in ``Recorder.query_weights``
  ``(B, S)`` (weights summing to 1 per row), ``(B, H, S)`` float32;
- ``"key_norm"``: the L2 norm of each token's keys over all heads, ``(B, S)`` float32 (DART's
  pivot rule). Rotary embeddings rotate pairs of channels, so this is also the norm before
  them: it does not depend on absolute positions, hence not on a row's padding;
- ``"key_norm_l1"``: the L1 norm of each token's rotated keys over all key/value heads, ``(B, S)``
  float32 (DART's released pivot rule; it does depend on absolute positions).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

KERNEL = "tokenprune-capture"
_ATTR = "_tokenprune_capture"


@dataclass
class _Flag:
    """What a flagged module needs to restore itself and to call its real kernel."""

    config: object  # the shared config object the module had
    implementation: str  # its kernel name, e.g. "sdpa"


@dataclass
class Recorder:
    """Collects probabilities for flagged modules during one encoder call.

    Attributes:
        wanted: module -> (hidden-state layer index, signal names wanted there).
        records: (layer, signal) -> list of ``(B, H, S)`` tensors, one per kernel call.
    """

    wanted: dict[int, tuple[int, frozenset[str]]]
    records: dict[tuple[int, str], list[Tensor]] = field(default_factory=dict)
    query_weights: Tensor | None = None

    def take(self, layer: int, signal: str) -> list[Tensor]:
        got = self.records.get((layer, signal))
        if not got:
            raise RuntimeError(
                f"no {signal} attention was captured at encoder layer {layer}: the layer's attention "
                "module did not run through tokenprune's capture kernel (was the model patched by "
                "something else after tokenprune.apply?)"
            )
        return got


_RECORDER: ContextVar[Recorder | None] = ContextVar("tokenprune_recorder", default=None)


def _real_kernel(module: nn.Module, implementation: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if implementation == "eager" or implementation is None:
        if eager is None:
            raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in its modeling file")
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)  # type: ignore[arg-type]  # None: no eager kernel


def _probabilities(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float | None,
                   causal: bool = False, rows: slice | None = None) -> Tensor:
    """Softmax of ``q k^T`` in float32: ``(B, H, Q, S)`` for the query rows ``rows`` (all by
    default). ``causal`` applies a causal mask when the kernel got none (SDPA's ``is_causal``)."""
    H, Hkv = query.shape[1], key.shape[1]
    S_q = query.shape[2]
    rows = rows or slice(0, S_q)
    q = query[:, :, rows]
    k = key.repeat_interleave(H // Hkv, 1) if Hkv != H else key  # (B, H, S, Dh)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Q, S)
    if mask is not None:
        m = mask[..., rows, : s.shape[-1]] if mask.dim() == 4 else None
        if m is None:  # a 2-D padding mask (FlashAttention's form): (B, S)
            s = s.masked_fill(~mask.bool()[:, None, None, : s.shape[-1]], float("-inf"))
        elif m.dtype == torch.bool:
            s = s.masked_fill(~m, float("-inf"))
        else:
            s = s + m.float()
    elif causal and S_q > 1:
        S = key.shape[2]
        qi = torch.arange(S_q, device=query.device)[rows] + (S - S_q)  # absolute query columns
        s = s.masked_fill(torch.arange(S, device=query.device) > qi.unsqueeze(-1), float("-inf"))
    return s.softmax(-1)


def capture_kernel(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered kernel: the module's real kernel, plus recording while a recorder is active."""
    flag: _Flag = getattr(module, _ATTR)
    out = _real_kernel(module, flag.implementation)(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    rec = _RECORDER.get()
    if rec is not None and id(module) in rec.wanted:
        layer, signals = rec.wanted[id(module)]
        causal = bool(getattr(module, "is_causal", False))
        with torch.no_grad():
            if "keys" in signals:
                rec.records.setdefault((layer, "keys"), []).append(key.float().mean(1))  # (B, S, Dh)
            if "key_norm" in signals:
                rec.records.setdefault((layer, "key_norm"), []).append(key.float().square().sum((1, 3)).sqrt())  # (B, S)
            if "key_norm_l1" in signals:
                rec.records.setdefault((layer, "key_norm_l1"), []).append(key.float().abs().sum((1, 3)))  # (B, S)
            if "last" in signals:
                p = _probabilities(query, key, attention_mask, scaling, causal, slice(-1, None))  # (B, H, 1, S)
                rec.records.setdefault((layer, "last"), []).append(p[:, :, 0])
            if "text" in signals:
                p = _probabilities(query, key, attention_mask, scaling, causal)  # (B, H, Q, S)
                p = p.nan_to_num(0.0)  # fully masked (padding) query rows carry weight 0
                w = rec.query_weights.to(p.device, p.dtype)  # (B, Q)
                rec.records.setdefault((layer, "text"), []).append(torch.einsum("bhqs,bq->bhs", p, w))
            if "received" in signals:
                p = _probabilities(query, key, attention_mask, scaling)  # (B, H, Q, S)
                rec.records.setdefault((layer, "received"), []).append(p.mean(2))  # (B, H, S)
                if "cls" in signals:
                    rec.records.setdefault((layer, "cls"), []).append(p[:, :, 0])
            elif "cls" in signals:
                p = _probabilities(query[:, :, :1], key, attention_mask, scaling)  # (B, H, 1, S)
                rec.records.setdefault((layer, "cls"), []).append(p[:, :, 0])  # (B, H, S)
    return out


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(KERNEL, capture_kernel)


def flag_module(module: nn.Module) -> None:
    """Route one attention module through the capture kernel (idempotent, per instance)."""
    if hasattr(module, _ATTR):
        return
    _register()
    config: Any = module.config
    implementation = config._attn_implementation
    own = copy.copy(config)  # shallow: only the kernel name differs
    own._attn_implementation = KERNEL
    object.__setattr__(module, _ATTR, _Flag(config, implementation))
    module.config = own


def unflag_module(module: nn.Module) -> None:
    """Undo :func:`flag_module`: the module shares its original config object again."""
    flag = module.__dict__.pop(_ATTR, None)
    if flag is not None:
        module.config = flag.config


@contextlib.contextmanager
def recording(wanted: dict[nn.Module, tuple[int, frozenset[str]]], query_weights: Tensor | None = None) -> Iterator[Recorder]:
    """Record the wanted signals of flagged modules for the duration of the block."""
    rec = Recorder({id(m): v for m, v in wanted.items()}, query_weights=query_weights)
    token = _RECORDER.set(rec)
    try:
        yield rec
    finally:
        _RECORDER.reset(token)
