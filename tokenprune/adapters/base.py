"""What every model family shares: from the user's model inputs to pruned model inputs.

:meth:`Adapter.prepare` takes four steps (transformers 5.x ``mm_encoder_outputs``), each a method
a family may override on its own (``docs/adapters.md``):

1. :meth:`Adapter.route`: the prompts' texts (recovered from ``input_ids`` or given explicitly)
   and their classes;
2. :meth:`Adapter.encode_batch`: the vision encoder once, asked only for the layers and attention
   signals the pipeline needs (:meth:`Adapter.encode`, family-specific);
3. :meth:`Adapter.select`: the pipeline on the images of the batch (one row per image, padded by
   a mask);
4. :meth:`Adapter.assemble`: delete the dropped image placeholders from ``input_ids``/
   ``attention_mask`` (and every other per-token input), re-left-pad the rows, carry each kept
   token's *original* position, and hand the kept features to the model through
   ``mm_encoder_outputs``.

Shape letters: ``B`` prompts, ``S`` sequence, ``S'`` pruned sequence, ``N`` items (every image,
prompt by prompt, then every video), ``M`` visual tokens per item (padded), ``P`` placeholder
slots per item (``M`` plus structural slots such as LLaVA-NeXT's newlines), ``D`` decoder width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor, nn

from ..budget import KEEP_ALL, Budget
from ..contract import Requirements, Routing, Selection, VisualTokens
from ..pipeline import Pipeline
from . import capture
from .sequence import left_pack, take

Entry = Literal["forward", "generate"]

#: per-token inputs that follow ``input_ids`` when columns are dropped, and their padding value.
PER_TOKEN = {"attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0, "labels": -100}


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
class PruneRecord:
    """What the last pruned call did. ``handle.last`` holds it.

    One row per visual item: every image of the batch (prompt by prompt), then every video (a whole
    video is one row: its frames' tokens are selected together). ``modalities`` says which is which.

    Attributes:
        selection: the pipeline's :class:`~tokenprune.contract.Selection`, one row per item
            (indices into that item's visual tokens, provenance pivot/completion).
        image_sample: ``(N,)`` the prompt (batch row) each item belongs to.
        classes: the routed class of each prompt.
        prompts: the texts that were routed.
        kept: ``(N,)`` visual tokens kept per image; ``total``: ``(N,)`` before pruning.
        keep_mask: ``(B, S)`` bool over the caller's sequence: true where the column reached the
            model (text and kept image tokens; false for dropped tokens and padding).
        source: ``(B, S')`` column of the caller's sequence behind each pruned position.
        seconds: wall time of ``route``/``encode``/``select``/``assemble``.
        llm_budget: ``(N,)`` visual tokens per image left after the in-LLM pruner's last layer,
            when the spec has one (``kept`` is then every token: nothing is dropped before the LLM).
        llm_kept: per in-LLM step, ``(N,)`` visual tokens per image after it (filled after the call).
        llm_source: ``(B, S'')`` column of the caller's sequence behind each position after the
            last in-LLM step (``forward`` returns outputs over these positions), ``-1`` on padding.
        modalities: each row's modality, ``"image"`` or ``"video"``.
        newline_mask: ``(B, S)`` bool over the caller's sequence, the placeholder columns that are
            structural slots (LLaVA-NeXT's row newlines), not visual tokens; ``None`` for families
            without them.
        grid_row: ``(B, S)`` the grid row (within its image) of each placeholder column, newlines
            included; ``-1`` for the base crop and for non-placeholder columns. ``None`` with
            ``newline_mask``. A newline is kept, before and inside the LLM, when a token of its
            row is.
    """

    selection: Selection
    image_sample: Tensor
    classes: tuple[str, ...]
    prompts: tuple[str, ...]
    kept: Tensor
    total: Tensor
    keep_mask: Tensor
    source: Tensor
    seconds: dict[str, float]
    llm_budget: Tensor | None = None
    llm_kept: tuple[Tensor, ...] = ()
    llm_source: Tensor | None = None
    modalities: tuple[str, ...] = ()
    newline_mask: Tensor | None = None
    grid_row: Tensor | None = None


@dataclass(frozen=True)
class Batch:
    """The caller's token batch as :meth:`Adapter.prepare`'s steps read it.

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


@dataclass(frozen=True)
class Chosen:
    """Step 3's answer: the pipeline's selection over the images, the images' tokens as the
    pipeline saw them, the prompt of each image, and the in-LLM budget (``None`` without one)."""

    selection: Selection
    tokens: VisualTokens
    image_sample: Tensor
    llm_budget: Tensor | None


@contextlib.contextmanager
def _timed(clock: dict[str, float], step: str):
    t0 = time.perf_counter()
    yield
    clock[step] = time.perf_counter() - t0


def _ordinal_in_prompt(image_sample: Tensor) -> Tensor:
    """``(N,)`` each image's ordinal within its prompt (0 for a prompt's first image), the key of
    seeded random stages."""
    N = image_sample.shape[0]
    key = torch.zeros(N, dtype=torch.long, device=image_sample.device)
    if N > 1:
        first = torch.ones(N, dtype=torch.long, device=image_sample.device)
        first[1:] = (image_sample[1:] != image_sample[:-1]).long()
        run = torch.arange(N, device=image_sample.device)
        key = run - torch.cummax(torch.where(first.bool(), run, 0), 0).values
    return key


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

    # -- prepare: route -> encode -> select -> assemble ------------------------------------------------
    def prepare(
        self,
        inputs: dict[str, Any],
        pipeline: Pipeline,
        budget: Budget | None,
        *,
        prompts: Sequence[str] | None,
        tokenizer: Any,
        entry: Entry,
    ) -> tuple[dict[str, Any], PruneRecord]:
        """Turn the caller's model inputs into pruned inputs (see the module docstring): four steps
        a family overrides one at a time, each timed in ``PruneRecord.seconds``."""
        self.check_inputs(inputs)
        batch = Batch.of(inputs, self.placeholder_ids)
        clock: dict[str, float] = {}
        with _timed(clock, "route"):
            routing, prompts = self.route(batch, pipeline, prompts, tokenizer)
        with _timed(clock, "encode"):
            enc, budget = self.encode_batch(inputs, pipeline, routing, budget)
        with _timed(clock, "select"):
            chosen = self.select(batch, enc, pipeline, routing, prompts, budget)
        with _timed(clock, "assemble"):
            out, keep, src = self.assemble(inputs, batch, enc, chosen.selection, entry)
        total = enc.slots if pipeline.spec.image_downsample else chosen.tokens.valid().sum(1)
        newline, row = self.structure(batch, enc) or (None, None)
        record = PruneRecord(
            selection=chosen.selection, image_sample=chosen.image_sample, classes=routing.classes,
            prompts=tuple(prompts), kept=chosen.selection.counts, total=total, keep_mask=keep, source=src,
            seconds=clock, llm_budget=chosen.llm_budget, modalities=enc.modalities, newline_mask=newline,
            grid_row=row,
        )
        return out, record

    def route(self, batch: Batch, pipeline: Pipeline, prompts: Sequence[str] | None,
              tokenizer: Any) -> tuple[Routing, list[str]]:
        """Step 1: each prompt's text (given, or decoded from the question's columns) and its class."""
        router = pipeline.spec.router
        B = batch.ids.shape[0]
        if prompts is not None:
            texts = [str(p) for p in prompts]
            if len(texts) != B:
                raise ValueError(f"got {len(texts)} prompts for a batch of {B} sequences")
        elif tokenizer is not None:
            texts = self.prompt_texts(batch.ids, batch.text_cols, tokenizer)
        elif router.reads_text:
            raise ValueError(
                f"router '{pipeline.spec.stage_name('router')}' reads the prompt text, but tokenprune "
                "cannot decode input_ids without a tokenizer: pass tokenprune.apply(model, spec, "
                "tokenizer=processor.tokenizer), or tokenprune_prompts=[...] to the call"
            )
        else:
            texts = [""] * B
        return pipeline.route(texts), texts

    def encode_batch(self, inputs: dict[str, Any], pipeline: Pipeline, routing: Routing,
                     budget: Budget | None) -> tuple[Encoded, Budget | None]:
        """Step 2: run the vision tower once, recording only the signals the pipeline reads. With
        image down-sampling the tower makes the budget's worth of tokens, and the budget left for
        selection is :data:`~tokenprune.budget.KEEP_ALL`."""
        need = pipeline.requirements(routing, self.num_layers)
        self.check_scoring(need)
        wanted: dict[nn.Module, tuple[int, frozenset[str]]] = {}
        for layer in need.cls_attention | need.received_attention | need.attention_keys:
            signals = {"cls"} if layer in need.cls_attention else set()
            signals |= {"received"} if layer in need.received_attention else set()
            signals |= {"keys"} if layer in need.attention_keys else set()
            wanted[self.attention_module(layer)] = (layer, frozenset(signals))
        spec = pipeline.spec
        with capture.recording(wanted) as rec:
            if not spec.image_downsample:
                return self.encode(inputs, need, rec), budget
            self.check_downsample()
            target = self._downsample_target(spec.budget_or_default(budget), inputs)
            return self.encode_downsampled(inputs, need, rec, target), KEEP_ALL

    def select(self, batch: Batch, enc: Encoded, pipeline: Pipeline, routing: Routing, prompts: Sequence[str],
               budget: Budget | None) -> Chosen:
        """Step 3: one pipeline row per item (image, or a whole video), with its prompt's class,
        text and ordinal; an in-LLM spec keeps every token here and hands its budget to the LLM site."""
        B, S = batch.ids.shape
        self.check_placeholders(batch, enc)
        slots_flat = batch.columns  # (sum P_i,) item order
        starts = enc.slots.cumsum(0) - enc.slots  # (N,)
        image_sample = slots_flat[starts.to(slots_flat.device)] // S  # (N,)
        pick = image_sample.cpu()
        img_routing = Routing(tuple(routing.classes[i] for i in pick.tolist()), routing.confidence[pick])
        need = pipeline.signal_requirements(self.num_layers)
        text = self.text_embedding(batch.ids, batch.text_cols)[image_sample] if need.text_embedding else None
        tokens = dataclasses.replace(enc.tokens, text_embedding=text, prompts=[prompts[i] for i in pick.tolist()],
                                     sample_keys=_ordinal_in_prompt(image_sample))
        spec = pipeline.spec
        real = tokens.valid().sum(1)  # (N,)
        budget = None if budget is None else budget.for_frames(enc.frames)
        llm_budget = None
        if spec.llm is not None:  # the LLM pruner spends the budget; the stages here keep pre_llm_budget
            llm_budget = Budget.parse(spec.budget_or_default(budget)).counts(real)
            budget = KEEP_ALL if spec.pre_llm_budget is None else Budget.parse(spec.pre_llm_budget)
        sel = pipeline(tokens, budget=budget, routing=img_routing)
        if llm_budget is not None:
            entered = sel.counts.to(llm_budget.device)  # (N,)
            short = (llm_budget > entered) & (entered < real.to(entered.device))
            if bool(short.any()):
                n = int(short.nonzero()[0])
                raise ValueError(
                    f"the budget asks the LLM to keep {int(llm_budget[n])} tokens of image {n}, but the spec's "
                    f"pre_llm_budget ({spec.pre_llm_budget}) lets only {int(entered[n])} enter it: give a budget of "
                    "at most pre_llm_budget, or raise pre_llm_budget")
            llm_budget = torch.minimum(llm_budget, entered)  # (N,) an image smaller than the budget keeps all
        return Chosen(sel, tokens, image_sample, llm_budget)

    def assemble(self, inputs: dict[str, Any], batch: Batch, enc: Encoded, sel: Selection,
                 entry: Entry) -> tuple[dict[str, Any], Tensor, Tensor]:
        """Step 4: the pruned model inputs (text columns and kept image slots, left-packed, at their
        original positions, with the kept slots' features), the ``(B, S)`` keep mask over the
        caller's sequence, and the ``(B, S')`` source column of each pruned position."""
        ids, mask = batch.ids, batch.mask
        kept_features, slot_keep = self.kept_slot_features(enc, sel)  # (sum K_i, D), (N, P)
        deepstack = [d[slot_keep] for d in enc.deepstack]
        P = enc.own.shape[1]
        slots_flat = batch.columns
        slot_valid = torch.arange(P, device=slot_keep.device) < enc.slots.to(slot_keep.device).unsqueeze(1)
        keep = mask.bool() & ~batch.is_visual  # (B, S) every text column
        keep.view(-1)[slots_flat[slot_keep[slot_valid].to(slots_flat.device)]] = True
        src, valid = left_pack(keep)  # (B, S')
        out = {k: v for k, v in inputs.items() if k not in self.visual_inputs and k not in ("position_ids", "cache_position")}
        out["input_ids"] = take(ids, src, valid, self.pad_id())
        for name, fill in PER_TOKEN.items():
            value = mask if name == "attention_mask" else inputs.get(name)
            if value is not None:
                out[name] = take(value, src, valid, fill)
        out["position_ids"] = self.pruned_positions(self.positions(ids, mask, inputs, entry), src, valid, entry)
        out["mm_encoder_outputs"] = self.encoder_outputs(enc, slot_keep, kept_features, deepstack)
        return out, keep, src.masked_fill(~valid, -1)

    def encoder_outputs(self, enc: Encoded, slot_keep: Tensor, features: Tensor,
                        deepstack: list[Tensor]) -> dict[str, Any]:
        """``mm_encoder_outputs``: the kept features ``(sum K_i, D)`` (item order) split into the
        images' and the videos' (a modality without items is left out)."""
        images = int(slot_keep[: slot_keep.shape[0] - enc.videos].sum())
        out = {"image": (features[:images], [d[:images] for d in deepstack]),
               "video": (features[images:], [d[images:] for d in deepstack])}
        present = {"image": enc.videos < slot_keep.shape[0], "video": enc.videos > 0}
        return {m: self.encoder_output(*out[m], modality=m) for m in ("image", "video") if present[m]}

    def structure(self, batch: Batch, enc: Encoded) -> tuple[Tensor, Tensor] | None:
        """``(B, S)`` newline mask and grid row of the caller's placeholder columns
        (:attr:`PruneRecord.newline_mask`, :attr:`PruneRecord.grid_row`), from the ``"newline"`` and
        ``"rows"`` entries of ``enc.layout``; ``None`` when the family has no structural slots."""
        if "newline" not in enc.layout:
            return None
        P = enc.layout["newline"].shape[1]
        slot_valid = torch.arange(P, device=enc.slots.device) < enc.slots.unsqueeze(1)  # (N, P)
        cols = batch.columns.to(slot_valid.device)
        newline = torch.zeros(batch.ids.numel(), dtype=torch.bool, device=slot_valid.device)
        newline[cols] = enc.layout["newline"][slot_valid]
        row = torch.full((batch.ids.numel(),), -1, dtype=torch.long, device=slot_valid.device)
        row[cols] = enc.layout["rows"][slot_valid]
        return newline.view_as(batch.ids), row.view_as(batch.ids)

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

    def kept_slot_features(self, enc: Encoded, sel: Selection) -> tuple[Tensor, Tensor]:
        """The features of the kept slots, ``(sum K_i, D)`` in image order (the model's own, or the
        stage's fused / merged ones where it gives them), and the ``(N, P)`` slot keep mask."""
        N, M = sel.indices.shape[0], enc.tokens.shape[1]
        slot_keep = self.slot_keep(enc, sel.token_mask(M))  # (N, P)
        feats = enc.own
        if sel.features is not None:  # fused / merged features replace the model's own
            D = feats.shape[-1]
            dest = torch.where(sel.keep_mask, sel.indices, M)  # padding -> spare row
            repl = feats.new_zeros(N, M + 1, D).scatter(1, dest.unsqueeze(-1).expand(-1, -1, D),
                                                        sel.features.to(feats.dtype))
            has = torch.zeros(N, M + 1, dtype=torch.bool, device=feats.device).scatter(1, dest, True)
            at = enc.slot_token if enc.slot_token is not None else torch.arange(feats.shape[1], device=feats.device).expand(N, -1)
            at = torch.where(at >= 0, at, M)  # (N, P); structural slots read the spare row
            feats = torch.where(has.gather(1, at).unsqueeze(-1), repl.gather(1, at.unsqueeze(-1).expand(-1, -1, D)), feats)
        return feats[slot_keep], slot_keep

    def _downsample_target(self, budget: Budget | None, inputs: dict[str, Any]) -> int:
        """One token count for the whole batch (images are resized to one size)."""
        ids = inputs["input_ids"]
        per_image = self.placeholders_per_image(inputs)
        R = Budget.parse(budget).counts(torch.tensor([per_image] * ids.shape[0]))
        if bool((R[0] != R).any()):
            raise ValueError(f"image down-sampling resizes every image of a batch to one size; got per-sample "
                             f"budgets {R.tolist()}: give one budget")
        return int(R[0])

    def placeholders_per_image(self, inputs: dict[str, Any]) -> int:
        """Image placeholder tokens per image of ``inputs`` (one count for every image)."""
        raise UnsupportedInput(f"{self.family} has no fixed placeholder count per image")

    def pad_id(self) -> int:
        cfg = self.model.config
        pad = getattr(cfg, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(cfg, "text_config", None), "pad_token_id", None)
        return int(pad) if pad is not None else 0
