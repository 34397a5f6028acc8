"""The in-LLM pruning site: drop visual tokens after decoder layer ``K - 1``, at prefill.

Installed per model instance by :func:`tokenprune.apply` when a spec has an ``[llm]`` stage, as
forward hooks on the LLM's own decoder layers (removed with the handle):

- a forward hook on layer ``K - 1`` of every step asks the stage which visual tokens to keep,
  and returns the packed (re-left-padded) hidden states;
- a forward pre-hook on every layer ``>= K`` swaps in the attention mask, the rotary
  embeddings and the position ids of the shorter sequence. Positions are the kept tokens'
  *original* positions (1-D or M-RoPE).

The text's attention at layer ``K - 1`` (or the key norms) is recorded by tokenprune's capture
kernel inside that layer's own attention call, so SDPA and FlashAttention keep running.

KV cache: layers ``< K`` cache every token; layers ``>= K`` cache only what they saw. The session
rides on the cache object, so every later call with that cache (``generate``'s decode steps or a
hand-written loop) gets per-layer masks built from its own 2-D attention mask: the prefill's
kept columns plus the new ones.

Structural slots (LLaVA-NeXT's row newlines) are never candidates: after each step a newline
stays when a visual token of its grid row does, as before the LLM.

Shape letters: ``B`` prompts, ``S`` sequence entering the LLM, ``S'`` after a step, ``N`` items
(images, then videos), ``M`` visual tokens per item still in the sequence, ``T`` question tokens,
``L`` newlines, ``D`` width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import check_mask, check_schedule
from ..registry import stage_label
from ..stages import LlmPruner, LlmRequest
from . import capture
from .base import cache_of, placeholder_columns, question_columns
from .sequence import left_pack, pad_flat

_ATTR = "_tokenprune_llm_session"


@dataclass
class Step:
    """The sequence after one pruning step (columns of the sequence that entered the LLM)."""

    source: Tensor  # (B, S') column behind each slot
    valid: Tensor  # (B, S') bool


@dataclass
class Session:
    """One pruned prefill and the decode calls that reuse its cache.

    Attributes:
        steps: the layers ``K`` of the schedule and the sequence after each.
        keep: ``(N,)`` visual tokens per image after each step (list over steps).
        image_slots / image_ok: ``(N, M)`` current slot of each image's visual tokens.
        text_slots / text_ok: ``(N, T)`` current slot of each image's question tokens.
        rows: ``(N,)`` batch row of each image.
        prefill_length: ``S``, the sequence length of the prefill call.
        token_group: ``(N, M)`` the structural group (an image's grid row, numbered across the
            batch) of each visual token, ``-1`` for none; ``None`` without structural slots.
        line_rows / line_slots / line_group / line_ok: ``(L,)`` batch row, current slot, group
            and survival of each structural slot (LLaVA-NeXT's newlines): one survives a step when
            a token of its group does.
    """

    layers: list[int]
    keep: list[Tensor]
    rows: Tensor
    image_slots: Tensor
    image_ok: Tensor
    text_slots: Tensor
    text_ok: Tensor
    valid: Tensor  # (B, S) current slots' validity
    is_image: Tensor  # (B, S) current slots that are visual tokens
    source: Tensor  # (B, S) current slots' columns in the LLM input
    prompt_index: Tensor  # (B, S) each input column's index in its prompt (padding skipped)
    prefill_length: int
    steps: list[Step] = field(default_factory=list)
    prefilling: bool = True
    token_group: Tensor | None = None
    line_rows: Tensor | None = None
    line_slots: Tensor | None = None
    line_group: Tensor | None = None
    line_ok: Tensor | None = None


@dataclass
class Call:
    """What the hooks need during one model call."""

    site: LlmSite
    session: Session
    recorder: capture.Recorder | None
    decode_mask: Tensor | None = None  # (B, S + t) the call's 2-D mask, decode calls only
    masks: dict[int, Any] = field(default_factory=dict)  # step -> prepared mask


_CALL: ContextVar[Call | None] = ContextVar("tokenprune_llm_call", default=None)


class LlmSite:
    """The hooks of one :class:`~tokenprune.stages.LlmPruner` on one model instance."""

    def __init__(self, adapter: Any, pruner: LlmPruner, name: str = ""):
        self.adapter = adapter
        self.pruner = pruner
        self.layers: Any = adapter.decoder_layers()  # the decoder's layers, an untyped module list
        self.config = adapter.text_config()
        self.norm: nn.Module = adapter.final_norm()
        self.label = stage_label(pruner, name or None)
        self.schedule = _checked(list(pruner.schedule(len(self.layers))), len(self.layers), self.label)
        #: the LLM adds visual features after its first layers (Qwen3-VL's deepstack) and a step comes
        #: before the last of them: the injections must follow the pruned sequence
        self.follows_injections = self.schedule[0] <= adapter.llm_injections
        if self.follows_injections and not adapter.llm_injection_method:
            from .llava import UnsupportedModel

            injected = adapter.llm_injections
            raise UnsupportedModel(
                f"the {self.label} prunes before decoder layer {self.schedule[0]}, but this LLM adds visual features "
                f"to the visual tokens after layers 0..{injected - 1} and the {adapter.family} adapter names no "
                f"llm_injection_method to map onto the kept tokens: prune from layer {injected + 1} on "
                f"([llm] layer = {injected + 1}, or layers >= {injected + 1})")
        types = getattr(self.config, "layer_types", None) or []
        if any(t != "full_attention" for t in types[self.schedule[0]:]):
            from .llava import UnsupportedModel

            raise UnsupportedModel("in-LLM pruning supports full-attention decoder layers only; this LLM "
                                   "has sliding-window layers after the first pruning layer")
        #: the attention signal recorded for ``req.attention`` ("last" / "text"), if the pruner reads one
        self.attention_signal = getattr(pruner, "query", "last") if "attention" in pruner.reads else None
        self.signals: set[str] = {s for s in (self.attention_signal,) if s is not None}
        #: the key-norm signal recorded for ``req.key_norms``, if the pruner reads one
        self.key_signal = None
        if "key_norms" in pruner.reads:
            self.key_signal = {"l2": "key_norm", "l1-rotated": "key_norm_l1"}[getattr(pruner, "key_norm", "l2")]
            self.signals.add(self.key_signal)
        self._hooks: list[Any] = []

    # -- install / remove --------------------------------------------------------------------------
    def attention_modules(self) -> list[nn.Module]:
        return [self.layers[k - 1].self_attn for k in self.schedule] if self.signals else []

    def install(self) -> None:
        for step, k in enumerate(self.schedule):
            self._hooks.append(self.layers[k - 1].register_forward_hook(self._after(step, k), with_kwargs=True))
        for layer in range(self.schedule[0], len(self.layers)):
            self._hooks.append(self.layers[layer].register_forward_pre_hook(self._before(layer), with_kwargs=True))
        for module in self.attention_modules():
            capture.flag_module(module)
        if self.follows_injections:
            _follow_injections(self.adapter, +1)

    def remove(self, keep_flags: set[int]) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.follows_injections:
            _follow_injections(self.adapter, -1)
        for module in self.attention_modules():
            if id(module) not in keep_flags:
                capture.unflag_module(module)

    # -- sessions ------------------------------------------------------------------------------------
    def begin(self, inputs: dict[str, Any], kept: Tensor, image_sample: Tensor, budget: Tensor,
              newline: Tensor | None = None, grid_row: Tensor | None = None) -> Session:
        """A session for the pruned call ``inputs`` (already pre-LLM pruned): ``kept`` ``(N,)``
        visual tokens per image in it, ``budget`` ``(N,)`` after the last step; ``newline`` and
        ``grid_row`` ``(B, S)`` over ``inputs``' columns for a family with row newlines
        (:attr:`~tokenprune.call.PruneRecord.newline_mask`)."""
        ids: Tensor = inputs["input_ids"]  # (B, S)
        B, S = ids.shape
        mask = inputs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        is_img, flat, _ = placeholder_columns(ids, valid, self.adapter.placeholder_ids)  # (B, S), (sum P,) item order
        lines: dict[str, Any] = {}  # Session's newline fields, when the family has row newlines
        if newline is not None and grid_row is not None:
            flat, lines = _split_lines(flat, newline.flatten()[flat], grid_row.flatten()[flat], kept.to(flat.device), S)
        if flat.numel() != int(kept.sum()):
            raise RuntimeError(f"in-LLM pruning found {flat.numel()} visual tokens, expected {int(kept.sum())}")
        slots, ok = pad_flat(flat, kept.to(flat.device))  # (N, M)
        rows = image_sample.to(ids.device)
        text = question_columns(valid, is_img)[rows]  # (N, S)
        t_slots, t_ok = ops.compact(text)  # (N, T)
        total = kept.to(ids.device)
        keep = self.pruner.keep_counts(total, torch.minimum(budget.to(ids.device), total), len(self.schedule))
        return Session(
            layers=self.schedule, keep=keep, rows=rows, image_slots=slots % S, image_ok=ok,
            text_slots=t_slots, text_ok=t_ok, valid=valid, is_image=is_img,
            source=torch.arange(S, device=ids.device).expand(B, S),
            prompt_index=(valid.long().cumsum(1) - 1).clamp_min(0), prefill_length=S,
            **lines,
        )

    @contextlib.contextmanager
    def prefill(self, session: Session, inputs: dict[str, Any]) -> Iterator[None]:
        """Run the prefill call inside this block; the cache (if any) carries the session after."""
        wanted = {self.layers[k - 1].self_attn: (k - 1, frozenset(self.signals)) for k in self.schedule} if self.signals else {}
        weights = self._text_weights(session)
        with capture.recording(wanted, query_weights=weights) as rec:
            token = _CALL.set(Call(self, session, rec))
            try:
                yield
            finally:
                _CALL.reset(token)
        session.prefilling = False
        cache = cache_of(inputs)
        if cache is not None:
            setattr(cache, _ATTR, session)

    @staticmethod
    def session_of(cache: Any) -> Session | None:
        return getattr(cache, _ATTR, None) if cache is not None else None

    @contextlib.contextmanager
    def decode(self, session: Session, attention_mask: Tensor | None) -> Iterator[None]:
        """A later call on the session's cache: layers ``>= K`` get masks without the dropped tokens."""
        token = _CALL.set(Call(self, session, None, decode_mask=attention_mask))
        try:
            yield
        finally:
            _CALL.reset(token)

    # -- hooks ---------------------------------------------------------------------------------------
    def _text_weights(self, s: Session) -> Tensor:
        B, S = s.valid.shape
        w = torch.zeros(B, S, device=s.valid.device)
        rows = s.rows.unsqueeze(1).expand_as(s.text_slots)
        w[rows[s.text_ok], s.text_slots[s.text_ok]] = 1.0  # question tokens of each prompt
        return w / w.sum(1, keepdim=True).clamp_min(1)

    def _after(self, step: int, layer: int):
        """The hook after the decoder layer before ``layer``: in-LLM step ``step`` picks the visual
        tokens to keep and the hidden states leave with only those (and every text token)."""
        def hook(module, args, kwargs, output):
            call = _CALL.get()
            if call is None or call.site is not self or not call.session.prefilling:
                return None
            s = call.session
            hidden = output[0] if isinstance(output, tuple) else output  # (B, S, D)
            if hidden.shape[1] != s.valid.shape[1]:
                raise RuntimeError(f"in-LLM pruning expected {s.valid.shape[1]} positions at layer {layer}, got {hidden.shape[1]}")
            chosen = self._choose(self._request(call, hidden, step, layer), s.image_ok, layer)  # (N, M)
            packed = _drop_unchosen(s, hidden, chosen)  # (B, S', D)
            if call.recorder is not None:
                call.recorder.query_weights = self._text_weights(s)
            call.masks.clear()
            if isinstance(output, tuple):
                return (packed, *output[1:])
            return packed

        return hook

    def _request(self, call: Any, hidden: Tensor, step: int, layer: int) -> LlmRequest:
        """What the pruner reads before ``layer``: the images' hidden states (one row per image),
        the recorded attention or key norms, the question's tokens."""
        s = call.session
        rows = s.rows.unsqueeze(1)  # (N, 1)
        att = keyn = txt_keyn = None
        if self.attention_signal is not None:
            a = call.recorder.take(layer - 1, self.attention_signal)[-1].mean(1)  # (B, H, S) -> (B, S)
            att = a[rows, s.image_slots].masked_fill(~s.image_ok, 0)
        if self.key_signal is not None:
            kn = call.recorder.take(layer - 1, self.key_signal)[-1]  # (B, S)
            keyn, txt_keyn = kn[rows, s.image_slots], kn[rows, s.text_slots]
        order = s.prompt_index.gather(1, s.source)  # (B, S) prompt index of each current slot
        return LlmRequest(
            layer=layer, step=step, hidden=hidden[rows, s.image_slots], valid=s.image_ok, keep=s.keep[step],
            attention=att, key_norms=keyn, text_hidden=hidden[rows, s.text_slots], text_valid=s.text_ok,
            text_key_norms=txt_keyn, norm=self.norm, index=order[rows, s.image_slots],
            text_index=order[rows, s.text_slots],
        )

    def _choose(self, req: LlmRequest, image_ok: Tensor, layer: int) -> Tensor:
        """The pruner's ``(N, M)`` keep mask, checked; errors name the pruner and the layer."""
        try:
            chosen = self.pruner.select(req)
        except Exception as exc:
            exc.add_note(f"raised inside the {self.label} before decoder layer {layer}")
            raise
        problem = check_mask(chosen, req.keep, image_ok)
        if problem is not None:
            raise RuntimeError(f"the {self.label} {problem} (images as rows, before decoder layer {layer})")
        return chosen

    def _before(self, layer: int):
        st = sum(1 for k in self.schedule if k <= layer)  # steps done before this layer runs

        def hook(module, args, kwargs):
            call = _CALL.get()
            if call is None or call.site is not self:
                return None
            s = call.session
            if st == 0 or st > len(s.steps):
                return None
            step = s.steps[st - 1]
            hidden = args[0] if args else kwargs["hidden_states"]
            if call.decode_mask is None and s.prefilling:  # prefill: the packed sequence
                mask2d = step.valid.long()
                pe = kwargs.get("position_embeddings")
                if pe is not None:
                    kwargs["position_embeddings"] = tuple(_gather_seq(t, step.source) for t in pe)
                pid = kwargs.get("position_ids")
                if isinstance(pid, Tensor) and pid.shape[-1] == s.prefill_length:
                    kwargs["position_ids"] = _gather_last(pid, step.source)
            else:  # a later call on this cache: prefill's kept columns + the call's new columns
                B = step.valid.shape[0]
                new = hidden.shape[1]
                if call.decode_mask is not None:
                    tail = call.decode_mask[:, s.prefill_length:].long()
                else:
                    past = cache_of(kwargs).get_seq_length(layer)
                    tail = torch.ones(B, past - step.valid.shape[1] + new, dtype=torch.long, device=hidden.device)
                mask2d = torch.cat([step.valid.long(), tail.to(step.valid.device)], 1)
            if st not in call.masks:
                from transformers.masking_utils import create_causal_mask

                # the cache is the 4th parameter (``past_key_values`` before transformers 5.24, ``cache`` after)
                call.masks[st] = create_causal_mask(self.config, hidden, mask2d, cache_of(kwargs), None, layer_idx=layer)
            kwargs["attention_mask"] = call.masks[st]
            return args, kwargs

        return hook


_INJECTION_USERS = "_tokenprune_injection_users"


def _follow_injections(adapter: Any, delta: int) -> None:
    """Count a site that prunes before the LLM's last visual injection (``delta`` +1 at install,
    -1 at removal). The first one replaces the language model's injection method
    (:attr:`Adapter.llm_injection_method`, e.g. Qwen3-VL's ``_deepstack_process(hidden, mask,
    embeds)``) on the instance with :func:`_injection_at_kept`; the last one removed restores it."""
    lm = adapter.language_model()
    name = adapter.llm_injection_method
    users = lm.__dict__.get(_INJECTION_USERS, 0) + delta
    if users > 0 and _INJECTION_USERS not in lm.__dict__:
        original = getattr(lm, name)

        def injection(hidden: Tensor, mask: Tensor, embeds: Tensor) -> Tensor:
            return original(hidden, *_injection_at_kept(mask, embeds))

        lm.__dict__[name] = injection
    if users > 0:
        lm.__dict__[_INJECTION_USERS] = users
    else:
        lm.__dict__.pop(name, None)
        lm.__dict__.pop(_INJECTION_USERS, None)


def _injection_at_kept(mask: Tensor, embeds: Tensor) -> tuple[Tensor, Tensor]:
    """The injection's ``(B, S)`` visual mask over the LLM's input and its ``(V, D)`` features
    (row-major over the mask), mapped onto the running prefill's current sequence: the mask of
    the visual tokens still there and their features, in the same order."""
    call = _CALL.get()
    if call is None or not call.session.steps or not call.session.prefilling:
        return mask, embeds
    s = call.session
    rank = mask.flatten().long().cumsum(0).view_as(mask) - 1  # (B, S) each visual column's row in embeds
    now = s.is_image & s.valid  # (B, S') visual tokens still in the sequence
    index = rank.gather(1, s.source)[now]  # (V',) row-major, as the model reads the mask
    return now, embeds.index_select(0, index.to(embeds.device))


def _checked(schedule: list[int], num_layers: int, name: str) -> list[int]:
    """A pruner's schedule, or a clear error naming the stage (:func:`tokenprune.checks.check_schedule`)."""
    problem = check_schedule(schedule, num_layers)
    if problem is not None:
        raise ValueError(f"the {name} {problem}")
    return schedule


def _split_lines(flat: Tensor, newline: Tensor, row: Tensor, kept: Tensor, S: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Split the placeholder columns ``flat`` ``(sum P,)`` (item order) into the visual tokens'
    columns and the session's newline fields. A newline belongs to the item of the token before it
    (it closes that token's grid row); a group is ``item * G + grid row``, ``G`` rows per item."""
    token_rank = (~newline).long().cumsum(0) - 1  # (sum P,) the last token at or before each slot
    item = torch.bucketize(token_rank.clamp_min(0), kept.cumsum(0), right=True)  # (sum P,)
    G = int(row.max()) + 1 if row.numel() else 1
    group = torch.where(row >= 0, item * G + row, -1)  # (sum P,)
    token_group, ok = pad_flat(group[~newline], kept)  # (N, M)
    lines = flat[newline]  # (L,)
    return flat[~newline], {
        "token_group": token_group.masked_fill(~ok, -1), "line_rows": lines // S, "line_slots": lines % S,
        "line_group": group[newline], "line_ok": torch.ones_like(lines, dtype=torch.bool),
    }


def _groups_hit(token_group: Tensor, chosen: Tensor, line_group: Tensor) -> Tensor:
    """``(L,)`` whether each newline's group has a chosen token (``token_group`` ``(N, M)``)."""
    G = int(max(int(token_group.max()), int(line_group.max()) if line_group.numel() else -1)) + 2
    hit = torch.zeros(G, dtype=torch.bool, device=chosen.device)
    hit[(token_group[chosen & (token_group >= 0)])] = True
    return hit[line_group.clamp_min(0)] & (line_group >= 0)


def _repack(slots: Tensor, chosen: Tensor) -> tuple[Tensor, Tensor]:
    """Left-align the chosen entries of each row: ``(N, M)`` slots -> ``(N, K)`` slots and validity."""
    idx, ok = ops.compact(chosen)  # (N, K)
    return slots.gather(1, idx).masked_fill(~ok, 0), ok


def _gather_seq(t: Tensor, source: Tensor) -> Tensor:
    """Gather the sequence axis (-2) of rotary tables ``(B or 1, S, Dh)`` (or with leading
    M-RoPE axes) at ``source`` ``(B, S')``."""
    B = source.shape[0]
    lead = t.shape[:-3]
    t = t.expand(*lead, B, *t.shape[-2:])
    idx = source.view(*([1] * len(lead)), B, -1, 1).expand(*lead, B, source.shape[1], t.shape[-1])
    return t.gather(-2, idx)


def _gather_last(p: Tensor, source: Tensor) -> Tensor:
    """Gather position ids ``(B or 1, S)`` or ``(R, B or 1, S)`` at ``source`` ``(B, S')``."""
    B = source.shape[0]
    lead = p.shape[:-2]
    p = p.expand(*lead, B, p.shape[-1])
    return p.gather(-1, source.view(*([1] * len(lead)), B, -1).expand(*lead, B, source.shape[1]))


def _drop_unchosen(s: Any, hidden: Tensor, chosen: Tensor) -> Tensor:
    """Keep the text and the ``chosen`` ``(N, M)`` visual tokens (and a newline whose grid row keeps
    a token) of ``hidden`` ``(B, S, D)``, left-packed into ``(B, S', D)``; the session ``s`` is
    moved onto the new columns."""
    B, S = s.valid.shape
    rows = s.rows.unsqueeze(1)  # (N, 1)
    keep = s.valid & ~s.is_image  # (B, S)
    keep.view(-1)[(rows * S + s.image_slots)[chosen]] = True
    if s.line_ok is not None:  # a newline stays when a token of its grid row does
        s.line_ok = s.line_ok & _groups_hit(s.token_group, chosen, s.line_group)
        keep[s.line_rows[s.line_ok], s.line_slots[s.line_ok]] = True
    src, ok = left_pack(keep)  # (B, S')
    packed = hidden.gather(1, src.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, S', D)
    new_slot = torch.full((B, S + 1), -1, dtype=torch.long, device=src.device)
    cols = torch.arange(src.shape[1], device=src.device).expand_as(src)
    new_slot.scatter_(1, torch.where(ok, src, S), cols)
    new_slot = new_slot[:, :S]  # (B, S) old slot -> new slot, -1 = dropped
    if s.token_group is not None:
        s.token_group, _ = _repack(s.token_group, chosen)
        s.line_slots = new_slot[s.line_rows, s.line_slots].clamp_min(0)
    s.image_slots, s.image_ok = _repack(new_slot[rows, s.image_slots], chosen)
    s.text_slots = new_slot[rows, s.text_slots].clamp_min(0)
    s.is_image = s.is_image.gather(1, src) & ok
    s.source = s.source.gather(1, src)
    s.valid = ok
    s.steps.append(Step(s.source, ok))
    return packed
