"""One pruned call: from the caller's model inputs to pruned model inputs and a record of it.

:class:`PrunedCall` is the per-call context that :mod:`tokenprune.apply` owns. It holds what is
fixed for the call (the family's adapter, the pipeline, the budget the handle resolved, the prompts
and tokenizer, the entry point) and runs four timed steps (transformers 5.x ``mm_encoder_outputs``):

1. **route**: the prompts' texts (given, or decoded from the question's columns) and their classes;
2. **encode**: the vision tower once through the family's :meth:`~tokenprune.adapters.Adapter.encode`,
   recording only the layers and attention signals the pipeline reads;
3. **select**: the call's budget turned into counts per item, once (:class:`ItemBudgets`), then the
   pipeline on every item of the batch (one row per image or whole video, padded by a mask);
4. **assemble**: drop the unkept placeholders from ``input_ids``/``attention_mask`` (and every
   other per-token input), re-left-pad the rows, carry each kept token's *original* position, and
   hand the kept features to the model through ``mm_encoder_outputs``.

A model family implements only what differs between families (:class:`~tokenprune.adapters.Adapter`:
placeholders, ``encode``, positions, ``slot_keep``, ``encoder_output``); nothing here is
family-specific, and nothing below this module parses or defaults a budget.

Shape letters: ``B`` prompts, ``S`` sequence, ``S'`` pruned sequence, ``N`` items (every image,
prompt by prompt, then every video), ``M`` visual tokens per item (padded), ``P`` placeholder
slots per item (``M`` plus structural slots such as LLaVA-NeXT's newlines), ``D`` decoder width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import capture
from .adapters.base import Adapter, Batch, Encoded, Entry
from .adapters.sequence import left_pack, take
from .budget import Budget, row_counts
from .contract import Requirements, Routing, Selection, VisualTokens
from .pipeline import Pipeline

__all__ = ["ItemBudgets", "PruneRecord", "PrunedCall"]

#: per-token inputs that follow ``input_ids`` when columns are dropped, and their padding value.
PER_TOKEN = {"attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0, "labels": -100}


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
class ItemBudgets:
    """The call's budget as counts, one per item, resolved once by :meth:`PrunedCall.item_budgets`.

    Attributes:
        select: ``(N,)`` tokens the pre-LLM stages keep per item (every token for an in-LLM spec
            without ``pre_llm_budget``, and after image down-sampling).
        llm: ``(N,)`` tokens per item left after the in-LLM pruner's last step; ``None`` without one.
    """

    select: Tensor
    llm: Tensor | None = None


@dataclass(frozen=True)
class Items:
    """Step 3's input: the items' tokens as the pipeline sees them, the prompt of each item, and
    each item's routing (its prompt's class)."""

    tokens: VisualTokens
    image_sample: Tensor
    routing: Routing


@contextlib.contextmanager
def _timed(clock: dict[str, float], step: str):
    t0 = time.perf_counter()
    yield
    clock[step] = time.perf_counter() - t0


def ordinal_in_prompt(image_sample: Tensor) -> Tensor:
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


@dataclass
class PrunedCall:
    """The per-call context: run one call's four steps (see the module docstring).

    Attributes:
        adapter: the model family's :class:`~tokenprune.adapters.Adapter`.
        pipeline: the :class:`~tokenprune.Pipeline` that selects tokens.
        budget: the call's :class:`~tokenprune.budget.Budget`, already parsed and defaulted by the
            caller (``None``: the completion stage fixes each item's count, pooling).
        pre_llm: what the pre-LLM stages keep under an in-LLM spec (the spec's ``pre_llm_budget``,
            parsed by the caller; :data:`~tokenprune.budget.KEEP_ALL` when it has none).
        prompts: the prompts' texts, or ``None`` to decode them with ``tokenizer``.
        tokenizer: a tokenizer or processor with ``batch_decode``, or ``None``.
        entry: ``"forward"`` or ``"generate"`` (positions follow what that entry builds).
    """

    adapter: Adapter
    pipeline: Pipeline
    budget: Budget | None
    pre_llm: Budget
    prompts: Sequence[str] | None = None
    tokenizer: Any = None
    entry: Entry = "forward"

    def run(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], PruneRecord]:
        """The pruned model inputs for the caller's ``inputs``, and the record of what was kept."""
        self.adapter.check_inputs(inputs)
        batch = Batch.of(inputs, self.adapter.placeholder_ids)
        clock: dict[str, float] = {}
        with _timed(clock, "route"):
            routing, texts = self.route(batch)
        with _timed(clock, "encode"):
            enc = self.encode(inputs, routing)
        with _timed(clock, "select"):
            items = self.items(batch, enc, routing, texts)
            budgets = self.item_budgets(items.tokens, enc)
            selection = self.select(items, budgets)
        with _timed(clock, "assemble"):
            out, keep, src = self.assemble(inputs, batch, enc, selection)
        total = enc.slots if self.pipeline.spec.image_downsample else items.tokens.valid().sum(1)
        newline, row = structure(batch, enc) or (None, None)
        record = PruneRecord(
            selection=selection, image_sample=items.image_sample, classes=routing.classes, prompts=tuple(texts),
            kept=selection.counts, total=total, keep_mask=keep, source=src, seconds=clock,
            llm_budget=budgets.llm, modalities=enc.modalities, newline_mask=newline, grid_row=row,
        )
        return out, record

    # -- 1. route ------------------------------------------------------------------------------------
    def route(self, batch: Batch) -> tuple[Routing, list[str]]:
        """Each prompt's text (given, or decoded from the question's columns) and its class."""
        spec = self.pipeline.spec
        B = batch.ids.shape[0]
        if self.prompts is not None:
            texts = [str(p) for p in self.prompts]
            if len(texts) != B:
                raise ValueError(f"got {len(texts)} prompts for a batch of {B} sequences")
        elif self.tokenizer is not None:
            texts = self.adapter.prompt_texts(batch.ids, batch.text_cols, self.tokenizer)
        elif spec.router.reads_text:
            raise ValueError(
                f"router '{spec.stage_name('router')}' reads the prompt text, but tokenprune "
                "cannot decode input_ids without a tokenizer: pass tokenprune.apply(model, spec, "
                "tokenizer=processor.tokenizer), or tokenprune_prompts=[...] to the call"
            )
        else:
            texts = [""] * B
        return self.pipeline.route(texts), texts

    # -- 2. encode -----------------------------------------------------------------------------------
    def encode(self, inputs: dict[str, Any], routing: Routing) -> Encoded:
        """The vision tower once, recording only the signals the pipeline reads. With image
        down-sampling the tower makes the budget's worth of tokens per image."""
        adapter = self.adapter
        need = self.pipeline.requirements(routing, adapter.num_layers)
        adapter.check_scoring(need)
        with capture.recording(self._recorded(need)) as rec:
            if not self.pipeline.spec.image_downsample:
                return adapter.encode(inputs, need, rec)
            adapter.check_downsample()
            return adapter.encode_downsampled(inputs, need, rec, self._downsample_target(inputs))

    def _recorded(self, need: Requirements) -> dict[nn.Module, tuple[int, frozenset[str]]]:
        """The tower's attention modules to record, with the layer and the signals of each."""
        wanted: dict[nn.Module, tuple[int, frozenset[str]]] = {}
        for layer in need.cls_attention | need.received_attention | need.attention_keys:
            signals = {"cls"} if layer in need.cls_attention else set()
            signals |= {"received"} if layer in need.received_attention else set()
            signals |= {"keys"} if layer in need.attention_keys else set()
            wanted[self.adapter.attention_module(layer)] = (layer, frozenset(signals))
        return wanted

    def _downsample_target(self, inputs: dict[str, Any]) -> int:
        """One token count for the whole batch (down-sampling resizes every image to one size)."""
        per_image = self.adapter.placeholders_per_image(inputs)
        if self.budget is None:
            raise ValueError("image down-sampling needs a budget: pass apply(..., budget=64)")
        R = self.budget.counts(torch.tensor([per_image] * inputs["input_ids"].shape[0]))
        if bool((R[0] != R).any()):
            raise ValueError(f"image down-sampling resizes every image of a batch to one size; got per-sample "
                             f"budgets {R.tolist()}: give one budget")
        return int(R[0])

    # -- 3. select -----------------------------------------------------------------------------------
    def items(self, batch: Batch, enc: Encoded, routing: Routing, texts: Sequence[str]) -> Items:
        """One pipeline row per item (image, or a whole video), with its prompt's class, text,
        ordinal and (when a stage reads it) the prompt's mean text embedding."""
        S = batch.ids.shape[1]
        self.adapter.check_placeholders(batch, enc)
        starts = enc.slots.cumsum(0) - enc.slots  # (N,)
        image_sample = batch.columns[starts.to(batch.columns.device)] // S  # (N,)
        pick = image_sample.cpu()
        item_routing = Routing(tuple(routing.classes[i] for i in pick.tolist()), routing.confidence[pick])
        need = self.pipeline.signal_requirements(self.adapter.num_layers)
        text = self.adapter.text_embedding(batch.ids, batch.text_cols)[image_sample] if need.text_embedding else None
        tokens = dataclasses.replace(enc.tokens, text_embedding=text, prompts=[texts[i] for i in pick.tolist()],
                                     sample_keys=ordinal_in_prompt(image_sample))
        return Items(tokens, image_sample, item_routing)

    def item_budgets(self, tokens: VisualTokens, enc: Encoded) -> ItemBudgets:
        """The call's budget as counts per item, for the pre-LLM stages and the in-LLM steps: the
        only place a call's budget becomes counts. A per-frame budget reads each item's frames; an
        in-LLM spec gives its budget to the LLM and keeps ``pre_llm`` before it; after image
        down-sampling the stages keep every token the tower made."""
        real = tokens.valid().sum(1)  # (N,)
        spec = self.pipeline.spec
        if spec.image_downsample:
            return ItemBudgets(real)
        budget = None if self.budget is None else self.budget.for_frames(enc.frames)
        if spec.llm is None:
            fixed = self.pipeline.fixed_budget(tokens)
            return ItemBudgets(row_counts(budget, real, fixed, f"completion '{spec.stage_name('completion')}'"))
        if budget is None:
            raise ValueError(f"the [llm] stage '{spec.stage_name('llm')}' needs a budget: pass apply(..., budget=64)")
        return ItemBudgets(self.pre_llm.counts(real), budget.counts(real))

    def select(self, items: Items, budgets: ItemBudgets) -> Selection:
        """The pipeline on the items at their counts; an in-LLM spec checks that what enters the
        LLM covers what its pruner must keep."""
        sel = self.pipeline.run(items.tokens, budgets.select, items.routing)
        if budgets.llm is not None:
            _check_llm_budget(budgets.llm, sel.counts, items.tokens.valid().sum(1), self.pipeline.spec.pre_llm_budget)
        return sel

    # -- 4. assemble ---------------------------------------------------------------------------------
    def assemble(self, inputs: dict[str, Any], batch: Batch, enc: Encoded,
                 sel: Selection) -> tuple[dict[str, Any], Tensor, Tensor]:
        """The pruned model inputs (text columns and kept slots, left-packed, at their original
        positions, with the kept slots' features), the ``(B, S)`` keep mask over the caller's
        sequence, and the ``(B, S')`` source column of each pruned position (``-1`` on padding)."""
        adapter = self.adapter
        ids, mask = batch.ids, batch.mask
        kept_features, slot_keep = kept_slot_features(adapter, enc, sel)  # (sum K_i, D), (N, P)
        deepstack = [d[slot_keep] for d in enc.deepstack]
        P = enc.own.shape[1]
        slot_valid = torch.arange(P, device=slot_keep.device) < enc.slots.to(slot_keep.device).unsqueeze(1)
        keep = mask.bool() & ~batch.is_visual  # (B, S) every text column
        keep.view(-1)[batch.columns[slot_keep[slot_valid].to(batch.columns.device)]] = True
        src, valid = left_pack(keep)  # (B, S')
        skipped = (*adapter.visual_inputs, "position_ids", "cache_position")
        out = {k: v for k, v in inputs.items() if k not in skipped}
        out["input_ids"] = take(ids, src, valid, adapter.pad_id())
        for name, fill in PER_TOKEN.items():
            value = mask if name == "attention_mask" else inputs.get(name)
            if value is not None:
                out[name] = take(value, src, valid, fill)
        positions = adapter.positions(ids, mask, inputs, self.entry)
        out["position_ids"] = adapter.pruned_positions(positions, src, valid, self.entry)
        out["mm_encoder_outputs"] = encoder_outputs(adapter, enc, slot_keep, kept_features, deepstack)
        return out, keep, src.masked_fill(~valid, -1)


def _check_llm_budget(llm: Tensor, entered: Tensor, real: Tensor, pre_llm_budget: int | float | None) -> None:
    """Refuse an in-LLM budget above what the pre-LLM stages let into the LLM (an item smaller
    than the budget keeps all of its tokens)."""
    entered = entered.to(llm.device)  # (N,)
    short = (llm > entered) & (entered < real.to(entered.device))
    if bool(short.any()):
        n = int(short.nonzero()[0])
        raise ValueError(
            f"the budget asks the LLM to keep {int(llm[n])} tokens of image {n}, but the spec's "
            f"pre_llm_budget ({pre_llm_budget}) lets only {int(entered[n])} enter it: give a budget of "
            "at most pre_llm_budget, or raise pre_llm_budget")


def kept_slot_features(adapter: Adapter, enc: Encoded, sel: Selection) -> tuple[Tensor, Tensor]:
    """The features of the kept slots, ``(sum K_i, D)`` in item order (the model's own, or the
    stage's fused / merged ones where it gives them), and the ``(N, P)`` slot keep mask."""
    N, M = sel.indices.shape[0], enc.tokens.shape[1]
    slot_keep = adapter.slot_keep(enc, sel.token_mask(M))  # (N, P)
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


def encoder_outputs(adapter: Adapter, enc: Encoded, slot_keep: Tensor, features: Tensor,
                    deepstack: list[Tensor]) -> dict[str, Any]:
    """``mm_encoder_outputs``: the kept features ``(sum K_i, D)`` (item order) split into the
    images' and the videos', each in the family's form (:meth:`Adapter.encoder_output`); a
    modality without items is left out."""
    images = int(slot_keep[: slot_keep.shape[0] - enc.videos].sum())
    out = {"image": (features[:images], [d[:images] for d in deepstack]),
           "video": (features[images:], [d[images:] for d in deepstack])}
    present = {"image": enc.videos < slot_keep.shape[0], "video": enc.videos > 0}
    return {m: adapter.encoder_output(*out[m], modality=m) for m in ("image", "video") if present[m]}


def structure(batch: Batch, enc: Encoded) -> tuple[Tensor, Tensor] | None:
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
