"""The model-family protocol: what differs between families, and nothing of the per-call work.

A family (:class:`Adapter`) says where its placeholders are (:attr:`Adapter.modalities`,
:attr:`Adapter.placeholder_ids`), runs its vision tower once (:meth:`Adapter.encode`, giving an
:class:`Encoded`), gives each column's original position (:meth:`Adapter.positions`,
:meth:`Adapter.pruned_positions`), says which placeholder slots a kept token keeps
(:meth:`Adapter.slot_keep`) and hands kept features to its model (:meth:`Adapter.encoder_output`).
The per-call orchestration (route, budget, select, assemble, time, record) is
:class:`tokenprune.call.PrunedCall`'s, the same for every family (``docs/adapters.md``).

Shape letters: ``B`` prompts, ``S`` sequence, ``S'`` pruned sequence, ``N`` items (every image,
prompt by prompt, then every video), ``M`` visual tokens per item (padded), ``P`` placeholder
slots per item (``M`` plus structural slots such as LLaVA-NeXT's newlines), ``D`` decoder width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor, nn

from ..contract import Requirements, VisualTokens
from . import capture
from .sequence import take

Entry = Literal["forward", "generate"]

def question_columns(mask: Tensor, is_visual: Tensor) -> Tensor:
    """``(B, S)`` bool: the text the router reads, i.e. what follows a row's last visual input (the
    question and the assistant tag in chat templates, without the system prompt), or all of the
    row's text when nothing follows its images and videos."""
    S = mask.shape[1]
    col = torch.arange(S, device=mask.device)
    last = torch.where(is_visual, col, -1).max(1, keepdim=True).values  # (B, 1)
    after = mask & (col > last)
    text = mask & ~is_visual
    return torch.where(after.any(1, keepdim=True), after, text)


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache a call passes: ``cache=`` (transformers >= 5.24) or ``past_key_values=``."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def cache_keyword() -> str:
    """The keyword the installed transformers takes for the KV cache (renamed in 5.24)."""
    import inspect

    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


class UnsupportedModel(ValueError):
    """The model's configuration is outside what the adapter handles; the message says why."""


class UnsupportedInput(ValueError):
    """The inputs cannot be pruned as given; the message says what to change."""


@dataclass
class Encoded:
    """One encoder pass over the batch's images, ready for the pipeline and for assembly.

    Attributes:
        tokens: the pipeline's input, one row per image (``N`` rows).
        own: ``(N, P, D)`` the features the unpruned model would feed the LLM, per placeholder
            slot, zero padded.
        slots: ``(N,)`` placeholder slots per image.
        slot_token: ``(N, P)`` index of the visual token behind each slot, ``-1`` for structural
            slots (newlines); ``None`` when slot ``j`` is token ``j``.
        deepstack: per deepstack layer, ``(N, P, D)`` features added inside the LLM (Qwen3-VL).
        layout: family-specific per-slot tensors that :meth:`Adapter.slot_keep` reads.
        videos: how many of the ``N`` rows, the last ones, are videos (one row per whole video:
            its frames' tokens together, so selection sees the spatio-temporal set).
        frames: ``(N,)`` frames (temporal patches) of each row, 1 for an image; ``None`` when every
            row is an image. A per-frame budget reads it.
    """

    tokens: VisualTokens
    own: Tensor
    slots: Tensor
    slot_token: Tensor | None = None
    deepstack: list[Tensor] = field(default_factory=list)
    layout: dict[str, Tensor] = field(default_factory=dict)
    videos: int = 0
    frames: Tensor | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        """Each row's modality, ``"image"`` or ``"video"``."""
        N = self.slots.shape[0]
        return ("image",) * (N - self.videos) + ("video",) * self.videos


@dataclass(frozen=True)
class Batch:
    """The caller's token batch as :class:`tokenprune.call.PrunedCall`'s steps read it.

    Attributes:
        ids: ``(B, S)`` input ids; ``mask``: ``(B, S)`` attention mask (ones when not given).
        is_visual: ``(B, S)`` bool placeholder columns of every modality (image and video).
        text_cols: ``(B, S)`` bool the question's columns (what follows each row's last visual input).
        columns: ``(sum P_i,)`` the flat (``b * S + s``) column of every placeholder slot, in item
            order: the images' slots prompt by prompt, then the videos'.
        per_modality: placeholder columns per modality, in :attr:`Adapter.modalities` order.
    """

    ids: Tensor
    mask: Tensor
    is_visual: Tensor
    text_cols: Tensor
    columns: Tensor
    per_modality: tuple[int, ...]

    @classmethod
    def of(cls, inputs: dict[str, Any], placeholder_ids: Sequence[int]) -> Batch:
        ids: Tensor = inputs["input_ids"]  # (B, S)
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask  # (B, S)
        is_visual, columns, per_modality = placeholder_columns(ids, mask.bool(), placeholder_ids)
        return cls(ids, mask, is_visual, question_columns(mask.bool(), is_visual), columns, per_modality)


def placeholder_columns(ids: Tensor, valid: Tensor, placeholder_ids: Sequence[int]) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """The placeholder columns of ``ids`` ``(B, S)`` (where ``valid``): ``(B, S)`` bool over every
    modality, the ``(sum P,)`` flat columns in item order (one modality after the other, each
    row-major) and the count per modality."""
    masks = [(ids == t) & valid for t in placeholder_ids]  # per modality (B, S)
    flat = [m.flatten().nonzero().squeeze(1) for m in masks]
    is_visual = torch.stack(masks).any(0)
    return is_visual, torch.cat(flat), tuple(f.numel() for f in flat)


class Adapter(ABC):
    """Base class of the per-family adapters (see the module docstring for the route)."""

    family: ClassVar[str]
    #: whether the vision tower has a [CLS] token (``cls-attention`` scoring needs one)
    has_cls: ClassVar[bool] = True
    #: whether encode supplies ``VisualTokens.cls_token`` (one [CLS] hidden state per image)
    cls_token: ClassVar[bool] = True
    #: the modalities this family prunes, in the order their rows are numbered (images, then videos);
    #: each has a ``<modality>_token_id`` placeholder in the model's config
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    #: the inputs whose presence makes a call one to prune (one per modality)
    pixel_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: input names consumed by the encoder, dropped from the pruned call
    visual_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: inputs this adapter cannot prune yet
    unsupported_inputs: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module):
        #: the model instance; transformers' model classes are untyped ``nn.Module`` trees (their
        #: submodules come back as ``Tensor | Module``), so the adapters read them through ``Any``
        self.model: Any = model

    # -- family-specific -------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        """The placeholder token id of each of :attr:`modalities`, in order: :attr:`image_token_id`
        for images (so an adapter that overrides it is obeyed), ``config.<modality>_token_id`` else."""
        return tuple(self.image_token_id if m == "image" else int(getattr(self.model.config, f"{m}_token_id"))
                     for m in self.modalities)

    def has_visuals(self, inputs: dict[str, Any]) -> bool:
        """Whether the call carries pixels this adapter prunes (any of :attr:`pixel_inputs`)."""
        return any(inputs.get(name) is not None for name in self.pixel_inputs)

    @property
    @abstractmethod
    def num_layers(self) -> int:
        """``L``, the vision encoder's depth."""

    @abstractmethod
    def attention_module(self, layer: int) -> nn.Module:
        """The attention module that produces hidden state ``layer`` (``1..L``)."""

    @abstractmethod
    def encode(self, inputs: dict[str, Any], need: Requirements, recorder: capture.Recorder) -> Encoded:
        """Run the vision encoder once on the call's images: the pipeline's input and the
        model's own LLM features per placeholder slot (see :class:`Encoded`)."""

    #: whether the in-LLM pruning site (:mod:`tokenprune.adapters.llm_site`) supports this family
    llm_site: ClassVar[bool] = False
    #: whether :meth:`encode_downsampled` (the ``image_downsample`` baseline) is implemented
    downsample: ClassVar[bool] = False

    def language_model(self) -> Any:  # the model's decoder stack, an untyped module tree
        lm = getattr(getattr(self.model, "model", None), "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            raise UnsupportedInput(f"{type(self.model).__name__} has no model.language_model.layers for in-LLM pruning")
        return lm

    @property
    def llm_injections(self) -> int:
        """How many first decoder layers add visual features to the visual tokens after they run
        (Qwen3-VL's deepstack); the in-LLM site prunes only after them. Default: none."""
        return 0

    #: the language model's method that adds visual features at the visual positions after its
    #: first :attr:`llm_injections` layers, called as ``(hidden, mask, embeds)``; the in-LLM site
    #: maps its arguments onto the pruned sequence when a step comes before the last injection
    llm_injection_method: ClassVar[str] = ""

    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers, in order."""
        return self.language_model().layers

    def final_norm(self) -> nn.Module:
        return self.language_model().norm

    def text_config(self) -> Any:
        return self.model.config.text_config

    def positions(self, ids: Tensor, mask: Tensor, inputs: dict[str, Any], entry: Entry) -> Tensor:
        """The original positions of every column: ``(B, S)``, or ``(3, B, S)`` for M-RoPE."""
        given = inputs.get("position_ids")
        if given is not None:
            return given
        if entry == "generate":  # what GenerationMixin builds from the mask
            pos = mask.long().cumsum(-1) - 1
            return pos.masked_fill(mask == 0, 0)
        B, S = ids.shape  # plain forward: the decoder counts 0..S-1
        return torch.arange(S, device=ids.device).expand(B, S)

    def pruned_positions(self, pos: Tensor, src: Tensor, valid: Tensor, entry: Entry) -> Tensor:
        return take(pos, src, valid, 0)

    def slot_keep(self, enc: Encoded, token_keep: Tensor) -> Tensor:
        """``(N, P)`` bool: the placeholder slots that survive, given the kept visual tokens. With
        newline slots (``enc.layout["newline"]`` and ``["rows"]``, the grid row of each slot, -1
        outside the grid), a newline survives when a token of its row does."""
        if enc.slot_token is None:
            return token_keep
        at = enc.slot_token  # (N, P), -1 = no token behind the slot
        kept = token_keep.gather(1, at.clamp_min(0)) & (at >= 0)  # (N, P) kept token slots
        if "newline" not in enc.layout:
            return kept
        rows = enc.layout["rows"]  # (N, P)
        per_row = torch.zeros(kept.shape[0], int(rows.max()) + 2, dtype=torch.long, device=kept.device)
        per_row.scatter_add_(1, rows + 1, (kept & (rows >= 0)).long())  # kept tokens per grid row
        return kept | (enc.layout["newline"] & (per_row.gather(1, rows + 1) > 0))

    def check_downsample(self) -> None:
        """Raise a clear error unless this family implements :meth:`encode_downsampled`."""
        if not self.downsample:
            raise UnsupportedInput(
                f"image down-sampling inside tokenprune is implemented for LLaVA-1.5 only; for {self.family}, "
                "resize with the processor instead (Qwen-VL: max_pixels = R * 28 * 28 gives about R tokens)"
            )

    def encode_downsampled(self, inputs: dict[str, Any], need: Requirements, recorder: capture.Recorder,
                           tokens: int) -> Encoded:
        """Encode the images resized so that the encoder makes at most ``tokens`` tokens each
        (the ``image_downsample`` baseline); only families with ``downsample = True``."""
        self.check_downsample()
        raise NotImplementedError(f"{type(self).__name__} sets downsample but does not implement it")

    def encoder_output(self, features: Tensor, deepstack: list[Tensor], modality: str = "image") -> Any:
        """One ``mm_encoder_outputs`` entry: the kept features ``(K, D)`` of the call's images (or
        videos, ``modality``) in the form the model's forward reads."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=cast(Any, [features]))  # the model reads a list

    # -- shared ----------------------------------------------------------------------------------
    def check_scoring(self, need: Requirements) -> None:
        if need.cls_attention and not self.has_cls:
            raise ValueError(
                f"the {self.family} vision tower has no [CLS] token, so scoring stage 'cls-attention' "
                "cannot run on it; use 'received-attention' (e.g. specs/variants/clasp-qwen.toml), "
                "'feature-norm' or 'text-similarity'"
            )
        if need.cls_token and not (self.has_cls and self.cls_token):
            raise ValueError(
                f"a stage of this spec feeds the tower's [CLS] token to the LLM (VisionZip released = true), "
                f"but the {self.family} adapter has no [CLS] token per image; use it on LLaVA-1.5, or the "
                "preset specs/methods/visionzip.toml (no [CLS] slot)"
            )
        for layer in need.cls_attention | need.received_attention | need.attention_keys:
            if layer == 0:
                raise ValueError(
                    "attention scoring at hidden-state 0 (the patch embeddings) is impossible: no "
                    "attention produced it; use a layer in 1..L or -1..-L"
                )

    def refuse_unpruned_visuals(self, inputs: dict[str, Any]) -> None:
        """Raise :class:`UnsupportedInput` if ``inputs`` carry a visual input this family cannot
        prune (:attr:`unsupported_inputs`, e.g. a video): called on every call under a handle,
        images or not, so such an input is never passed to the model unpruned and unreported."""
        for name, why in self.unsupported_inputs.items():
            if inputs.get(name) is not None:
                raise UnsupportedInput(why)
        if inputs.get("mm_encoder_outputs") is not None:
            raise UnsupportedInput(
                "the call passes precomputed mm_encoder_outputs, which bypass the vision tower, so tokenprune "
                "cannot select from them and would pass every visual token: pass pixel_values under the "
                "handle, or prune the features yourself with tokenprune.Pipeline")

    def check_inputs(self, inputs: dict[str, Any]) -> None:
        self.refuse_unpruned_visuals(inputs)
        if inputs.get("input_ids") is None:
            raise UnsupportedInput(
                "tokenprune needs input_ids to find the image placeholders; pass input_ids (not "
                "inputs_embeds) together with the image inputs"
            )
        cache = cache_of(inputs)
        if cache is not None and cache.get_seq_length() > 0:
            raise UnsupportedInput(
                "images arrived together with a non-empty KV cache; tokenprune prunes at prefill "
                "only, so pass the images in the first call"
            )

    def prompt_texts(self, ids: Tensor, text_cols: Tensor, tokenizer: Any) -> list[str]:
        rows = [ids[b][text_cols[b]].tolist() for b in range(ids.shape[0])]  # decoding is per row
        return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]

    def text_embedding(self, ids: Tensor, text_cols: Tensor) -> Tensor:
        emb = self.model.get_input_embeddings()(ids)  # (B, S, D)
        w = text_cols.to(emb.dtype).unsqueeze(-1)  # (B, S, 1)
        return ((emb * w).sum(1) / w.sum(1).clamp_min(1)).float()  # (B, D)

    def check_placeholders(self, batch: Batch, enc: Encoded) -> None:
        """Refuse input_ids whose placeholders do not match the items' token counts, per modality."""
        N = enc.slots.shape[0]
        given = dict(zip(self.modalities, batch.per_modality, strict=True))
        bounds = {"image": slice(0, N - enc.videos), "video": slice(N - enc.videos, N)}
        for modality, count in given.items():
            want = enc.slots[bounds[modality]]
            if count != int(want.sum()):
                raise UnsupportedInput(
                    f"input_ids hold {count} {modality} placeholder tokens, but the {modality}s give "
                    f"{int(want.sum())} ({want.tolist()} per {modality}): build input_ids with the "
                    f"model's processor, which expands each {modality} placeholder to its token count"
                )

    def placeholders_per_image(self, inputs: dict[str, Any]) -> int:
        """Image placeholder tokens per image of ``inputs`` (one count for every image)."""
        raise UnsupportedInput(f"{self.family} has no fixed placeholder count per image")

    def pad_id(self) -> int:
        cfg = self.model.config
        pad = getattr(cfg, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(cfg, "text_config", None), "pad_token_id", None)
        return int(pad) if pad is not None else 0
