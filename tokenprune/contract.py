"""The data contract shared by every stage: what goes in, what comes out.

Shape letters (one alphabet, used in every docstring and shape comment):
``B`` batch, ``M`` visual tokens before pruning, ``K`` kept (``K1`` pivots + ``K2`` completion),
``L`` vision-encoder layers, ``H`` heads, ``Dv`` encoder width, ``D`` decoder width,
``C`` router classes.

Layer indices follow transformers' ``hidden_states`` tuple: ``0`` is the patch-embedding output
and ``1..L`` are the outputs of encoder layers ``1..L``. Negative indices count from the end
(``-1`` is layer ``L``, ``-2`` is layer ``L-1``); :func:`normalize_layer` turns them into
``0..L`` once, at the boundary.

Images with different token counts share a batch through a validity mask: row ``b`` holds its
``M_b`` real tokens in positions where ``mask[b]`` is true and padding elsewhere. Padding is never
selected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import torch
from torch import Tensor

__all__ = [
    "Provenance",
    "Routing",
    "Fused",
    "Requirements",
    "VisualTokens",
    "Selection",
    "normalize_layer",
    "grid_positions",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Provenance(IntEnum):
    """Why a kept slot is there. Stored as ``int8`` in :attr:`Selection.provenance`."""

    PAD = 0  #: padding slot (row kept fewer than ``K`` tokens)
    PIVOT = 1  #: chosen by the selection stage (attention-salient pivot)
    COMPLETION = 2  #: chosen by the completion stage (coverage / diversity)


def normalize_layer(layer: int, num_layers: int) -> int:
    """Map a possibly negative hidden-state index to ``0..num_layers``.

    ``num_layers`` is ``L``; valid inputs are ``-(L+1) .. L``.
    """
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(
            f"layer {layer} is out of range for an encoder with {num_layers} layers: "
            f"use 0..{num_layers} (0 = patch embeddings) or -1..-{num_layers + 1}"
        )
    return layer % (num_layers + 1)


def grid_positions(h: int, w: int, batch: int = 1, device: torch.device | str = "cpu") -> Tensor:
    """Raster-order (row, col) positions of an ``h x w`` patch grid.

    Returns a float32 tensor of shape ``(batch, h*w, 2)``.
    """
    rows = torch.arange(h, device=device).repeat_interleave(w)  # (M,)
    cols = torch.arange(w, device=device).repeat(h)  # (M,)
    pos = torch.stack([rows, cols], -1).float()  # (M, 2)
    return pos.unsqueeze(0).expand(batch, -1, -1).contiguous()  # (B, M, 2)


@dataclass(frozen=True)
class Routing:
    """The router's verdict for each prompt of the batch.

    Attributes:
        classes: length-``B`` tuple of class names (one of the class table's classes).
        confidence: ``(B,)`` float32 in ``[0, 1]``, on the CPU.
        questions: what the router read for each prompt (the question taken out of its chat
            template and harness instructions, :func:`tokenprune.prompts.extract_question`);
            filled in by :meth:`tokenprune.Pipeline.route`, ``None`` from a router called alone.
        budgets: ``(B,)`` int64, each row's budget ``R`` in this call, set by the pipeline before
            fusion, so that a class table with budget bands picks each row's cell; ``None`` where
            the budgets are not known yet (a router's own answer, the requirements step).
    """

    classes: tuple[str, ...]
    confidence: Tensor
    questions: tuple[str, ...] | None = None
    budgets: Tensor | None = None

    def __post_init__(self) -> None:
        if self.confidence.shape != (len(self.classes),):
            raise ValueError(
                f"Routing.confidence has shape {tuple(self.confidence.shape)}; "
                f"expected ({len(self.classes)},), one value per prompt"
            )
        if self.budgets is not None and self.budgets.shape != (len(self.classes),):
            raise ValueError(f"Routing.budgets has shape {tuple(self.budgets.shape)}; "
                             f"expected ({len(self.classes)},), one budget per prompt")


@dataclass(frozen=True)
class Requirements:
    """What a pipeline needs from the model before it can run, so adapters compute no more.

    Attributes:
        layers: hidden-state indices (normalised, ``0..L``) whose features fusion reads.
        cls_attention: layers whose [CLS]-to-patch attention a scorer reads.
        received_attention: layers whose mean received attention a scorer reads.
        text_embedding: whether a scorer reads the prompt's mean embedding in decoder space.
        attention_keys: layers whose attention keys (averaged over heads) a stage reads, e.g.
            VisionZip's and PruMerge's key-similarity merges.
        cls_token: layers whose [CLS] hidden state a stage reads (VisionZip as released keeps it).
    """

    layers: frozenset[int] = frozenset()
    cls_attention: frozenset[int] = frozenset()
    received_attention: frozenset[int] = frozenset()
    text_embedding: bool = False
    attention_keys: frozenset[int] = frozenset()
    cls_token: frozenset[int] = frozenset()

    def __or__(self, other: Requirements) -> Requirements:
        return Requirements(
            self.layers | other.layers,
            self.cls_attention | other.cls_attention,
            self.received_attention | other.received_attention,
            self.text_embedding or other.text_embedding,
            self.attention_keys | other.attention_keys,
            self.cls_token | other.cls_token,
        )


@dataclass(frozen=True)
class VisualTokens:
    """One batch of visual tokens as the stages see it.

    Attributes:
        layers: hidden-state index (``0..L``, or negative) -> encoder features, each ``(B, M, Dv)``
            float (fp32, fp16 or bf16). Only the layers a pipeline asks for need to be present
            (:meth:`tokenprune.Pipeline.requirements`). Patch tokens only: no [CLS].
        num_layers: ``L``, the encoder's depth (needed to resolve negative indices and to check
            class tables).
        mask: ``(B, M)`` bool, true for real tokens. ``None`` means every token is real.
        positions: ``(B, M, 2)`` float (row, col) of each token in patch units, for spatial
            stages. ``None`` if unknown.
        cls_attention: layer -> ``(B, H, M)`` or ``(B, M)`` [CLS]-to-patch attention
            probabilities (heads are averaged by the scorer).
        received_attention: layer -> ``(B, H, M)`` or ``(B, M)`` mean attention each patch
            receives from the other patches.
        text_embedding: ``(B, D)`` mean prompt embedding in the decoder's embedding space.
        project: the model's projector ``f_proj``, mapping ``(B, M, Dv)`` to ``(B, M, D)``. ``None``
            means identity (``D == Dv``).
        projected: ``(B, M, D)`` features already in decoder space, if the caller has them for
            the fused layer mix (used instead of calling ``project``; benchmarks use this to keep
            the projector out of the timing).
        prompts: the ``B`` prompt texts (question only, never the answer).
        attention_keys: layer -> ``(B, M, Dk)`` the attention keys of each token at that layer,
            averaged over heads (what VisionZip and PruMerge measure similarity with).
        sample_keys: ``(B,)`` int64 per-sample keys for seeded random stages. Row ``b``'s random
            draws depend only on ``(seed, sample_keys[b], token index)``, so a batched call equals
            the per-sample calls. ``None`` means key 0 for every row.
        cls_token: layer -> ``(B, Dv)`` the tower's [CLS] hidden state at that layer (towers with
            a [CLS] token; VisionZip as released feeds it to the LLM).
    """

    layers: Mapping[int, Tensor]
    num_layers: int
    mask: Tensor | None = None
    positions: Tensor | None = None
    cls_attention: Mapping[int, Tensor] = field(default_factory=dict)
    received_attention: Mapping[int, Tensor] = field(default_factory=dict)
    text_embedding: Tensor | None = None
    project: Callable[[Tensor], Tensor] | None = None
    projected: Tensor | None = None
    prompts: Sequence[str] = ()
    sample_keys: Tensor | None = None
    attention_keys: Mapping[int, Tensor] = field(default_factory=dict)
    cls_token: Mapping[int, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ref = self._check_layers()
        B, M, _ = ref.shape
        self._check_per_token(ref)
        for name in ("cls_attention", "received_attention"):
            for key, a in getattr(self, name).items():
                normalize_layer(key, self.num_layers)
                if a.shape[0] != B or a.shape[-1] != M or a.dim() not in (2, 3):
                    raise ValueError(
                        f"{name}[{key}] must be (B, H, M) or (B, M) = ({B}, ..., {M}), got {tuple(a.shape)}"
                    )
        for key, k in self.attention_keys.items():
            normalize_layer(key, self.num_layers)
            if k.dim() != 3 or k.shape[:2] != (B, M):
                raise ValueError(f"attention_keys[{key}] must be (B, M, Dk) = ({B}, {M}, ·), got {tuple(k.shape)}")
        for key, c in self.cls_token.items():
            normalize_layer(key, self.num_layers)
            if c.shape != (B, ref.shape[-1]):
                raise ValueError(f"cls_token[{key}] must be (B, Dv) = ({B}, {ref.shape[-1]}), got {tuple(c.shape)}")

    def _check_layers(self) -> Tensor:
        """Refuse layers that are missing, not ``(B, M, Dv)`` floats, or disagree with each other;
        the first layer's features, which the other fields are checked against."""
        if not self.layers:
            raise ValueError("VisualTokens.layers is empty: pass at least one encoder layer")
        if self.num_layers < 1:
            raise ValueError(f"VisualTokens.num_layers must be >= 1, got {self.num_layers}")
        ref: Tensor | None = None
        for key, h in self.layers.items():
            normalize_layer(key, self.num_layers)
            if not isinstance(h, Tensor) or h.dim() != 3:
                shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
                raise ValueError(f"layer {key} features must be a (B, M, Dv) tensor, got {shape}")
            if h.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"layer {key} features have dtype {h.dtype}; use float32, float16 or bfloat16"
                )
            if ref is None:
                ref = h
            elif h.shape != ref.shape or h.dtype != ref.dtype or h.device != ref.device:
                raise ValueError(
                    f"layer {key} features are {tuple(h.shape)} {h.dtype} on {h.device}, but other "
                    f"layers are {tuple(ref.shape)} {ref.dtype} on {ref.device}; all layers must agree"
                )
        assert ref is not None  # layers is not empty
        return ref

    def _check_per_token(self, ref: Tensor) -> None:
        """Refuse a mask, positions, text embedding, projection, prompts or sample keys whose shape is not
        the batch's."""
        B, M, _ = ref.shape
        if self.mask is not None:
            if self.mask.shape != (B, M) or self.mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be a ({B}, {M}) bool tensor, got {tuple(self.mask.shape)} {self.mask.dtype}"
                )
            if self.mask.device != ref.device:
                raise ValueError(f"mask is on {self.mask.device} but features are on {ref.device}")
        if self.positions is not None and self.positions.shape != (B, M, 2):
            raise ValueError(
                f"positions must have shape ({B}, {M}, 2), got {tuple(self.positions.shape)}"
            )
        if self.text_embedding is not None and (
            self.text_embedding.dim() != 2 or self.text_embedding.shape[0] != B
        ):
            raise ValueError(
                f"text_embedding must be (B, D) with B = {B}, got {tuple(self.text_embedding.shape)}"
            )
        if self.projected is not None and self.projected.shape[:2] != (B, M):
            raise ValueError(
                f"projected must be (B, M, D) with B, M = {B}, {M}, got {tuple(self.projected.shape)}"
            )
        if self.prompts and len(self.prompts) != B:
            raise ValueError(f"got {len(self.prompts)} prompts for a batch of {B} images")
        if self.sample_keys is not None and self.sample_keys.shape != (B,):
            raise ValueError(f"sample_keys must have shape ({B},), got {tuple(self.sample_keys.shape)}")

    # -- derived views ------------------------------------------------------------------------
    @property
    def reference(self) -> Tensor:
        """Any one layer's features, ``(B, M, Dv)``: for shape, dtype and device."""
        return next(iter(self.layers.values()))

    @property
    def shape(self) -> tuple[int, int]:
        B, M, _ = self.reference.shape
        return B, M

    @property
    def device(self) -> torch.device:
        return self.reference.device

    @property
    def dtype(self) -> torch.dtype:
        return self.reference.dtype

    def valid(self) -> Tensor:
        """``(B, M)`` bool validity mask (all true when :attr:`mask` is ``None``)."""
        if self.mask is not None:
            return self.mask
        B, M = self.shape
        return torch.ones(B, M, dtype=torch.bool, device=self.device)

    def _at(self, table: Mapping[int, Tensor], index: int) -> tuple[Tensor | None, int, list[int]]:
        """``table``'s tensor at hidden-state ``index`` (keys may be negative), or ``None``; with the
        normalised index and the normalised keys present, for error messages."""
        want = normalize_layer(index, self.num_layers)
        for key, value in table.items():
            if normalize_layer(key, self.num_layers) == want:
                return value, want, []
        return None, want, sorted(normalize_layer(k, self.num_layers) for k in table)

    def layer(self, index: int) -> Tensor:
        """Features of one hidden-state index, ``(B, M, Dv)``; a clear error if not supplied."""
        h, want, have = self._at(self.layers, index)
        if h is not None:
            return h
        raise KeyError(
            f"encoder layer {want} (asked as {index}) was not supplied; the inputs carry layers {have}. "
            "Pass it in VisualTokens.layers, or let an adapter collect Pipeline.requirements()."
        )

    def signal(self, name: str, index: int) -> Tensor:
        """An attention signal (``cls_attention`` / ``received_attention``) at one layer, ``(B, M)``
        float32, averaged over heads."""
        a, want, have = self._at(getattr(self, name), index)
        if a is not None:
            a = a.float()
            return a.mean(1) if a.dim() == 3 else a  # (B, H, M) -> (B, M)
        raise KeyError(
            f"{name} at encoder layer {want} (asked as {index}) was not supplied; have layers {have}. "
            f"Pass VisualTokens({name}={{{want}: tensor}}), or apply the pipeline through an adapter."
        )

    def key_features(self, index: int) -> Tensor:
        """Attention keys at one layer, ``(B, M, Dk)``; a clear error if not supplied."""
        k, want, have = self._at(self.attention_keys, index)
        if k is not None:
            return k
        raise KeyError(
            f"attention keys at encoder layer {want} (asked as {index}) were not supplied; have layers "
            f"{have}. Pass VisualTokens(attention_keys={{{want}: (B, M, Dk) tensor}}), or apply the "
            "pipeline through an adapter (it captures them)."
        )

    def cls_feature(self, index: int) -> Tensor:
        """The [CLS] hidden state at one layer, ``(B, Dv)``; a clear error if not supplied."""
        c, want, have = self._at(self.cls_token, index)
        if c is not None:
            return c
        raise KeyError(
            f"the [CLS] hidden state at encoder layer {want} (asked as {index}) was not supplied; have layers "
            f"{have}. Pass VisualTokens(cls_token={{{want}: (B, Dv) tensor}}), or apply the pipeline through "
            "an adapter whose tower has a [CLS] token (LLaVA-1.5)."
        )

    def keys(self) -> Tensor:
        """``(B,)`` int64 sample keys for seeded random stages (zeros when not given)."""
        B, _ = self.shape
        if self.sample_keys is None:
            return torch.zeros(B, dtype=torch.int64, device=self.device)
        return self.sample_keys.to(device=self.device, dtype=torch.int64)


@dataclass(frozen=True)
class Fused:
    """The fusion stage's output.

    Attributes:
        encoder: ``(B, M, Dv)`` fused encoder features ``z̄``, in the input dtype.
        decoder: ``(B, M, D)`` the same tokens in decoder space ``z̃ = f_proj(z̄)``.
        alpha: ``(B, L)`` float32 layer weights per sample (rows sum to 1; column ``l-1`` weighs
            layer ``l``), or ``None`` for stages without a layer mix.
        feed_llm: whether the LLM should receive ``decoder`` for the kept tokens (``True``) or the
            model's usual features (``False``: the fused features only steer selection).
    """

    encoder: Tensor
    decoder: Tensor
    alpha: Tensor | None = None
    feed_llm: bool = False


@dataclass(frozen=True)
class Selection:
    """The result of a pipeline run: which tokens each image keeps, and why.

    Attributes:
        indices: ``(B, K)`` int64 keep indices into the ``M`` input tokens, sorted ascending per row.
            Row ``b`` holds exactly ``counts[b]`` real indices followed by ``-1`` padding.
        counts: ``(B,)`` int64, tokens kept per row: the row's budget, or all its valid tokens
            when the budget is at least that many.
        provenance: ``(B, K)`` int8 :class:`Provenance` per slot (``PAD`` on padding).
        routing: the router's classes and confidences.
        features: ``(B, K, D)`` features the LLM should receive for the kept slots (fused or
            merged features), or ``None`` when the model's own features are to be used.
            Padding slots hold zeros.
        alpha: ``(B, L)`` float32 layer weights used by fusion, or ``None``.
        pivot_ratio: ``(B,)`` float32 pivot ratio ``a`` used per row.
    """

    indices: Tensor
    counts: Tensor
    provenance: Tensor
    routing: Routing
    features: Tensor | None = None
    alpha: Tensor | None = None
    pivot_ratio: Tensor | None = None

    @property
    def keep_mask(self) -> Tensor:
        """``(B, K)`` bool, true on real (non-padding) slots."""
        return self.indices >= 0

    def token_mask(self, num_tokens: int) -> Tensor:
        """``(B, M)`` bool over the input tokens: true where kept."""
        B, _ = self.indices.shape
        out = torch.zeros(B, num_tokens + 1, dtype=torch.bool, device=self.indices.device)
        idx = torch.where(self.keep_mask, self.indices, num_tokens)  # padding -> spare column
        out.scatter_(1, idx, True)
        return out[:, :num_tokens]

    def gather(self, x: Tensor) -> Tensor:
        """Gather per-token values ``(B, M, ...)`` into ``(B, K, ...)`` (zeros on padding)."""
        from .ops import gather_rows

        out = gather_rows(x, self.indices.clamp_min(0))  # (B, M, ...) -> (B, K, ...)
        pad = ~self.keep_mask
        return out.masked_fill(pad.view(*pad.shape, *([1] * (x.dim() - 2))), 0)

    def row(self, b: int) -> Tensor:
        """The real keep indices of row ``b`` as a 1-D int64 tensor."""
        return self.indices[b, : int(self.counts[b])]
