"""``tokenprune.apply``: prune one Hugging Face model instance, reversibly.

>>> with tokenprune.apply(model, "specs/clasp.toml", budget=64, tokenizer=processor.tokenizer) as pruning:
...     out = model.generate(**processor(images=img, text=prompt, return_tensors="pt"))   # doctest: +SKIP
...     pruning.last.classes, pruning.last.kept                                              # doctest: +SKIP

How it patches: ``forward`` and ``generate`` get *instance* attributes that wrap the bound
methods (the class, other instances and transformers' globals are untouched). A call that carries
images is rewritten into a pruned call (:class:`tokenprune.call.PrunedCall`); every other call,
including the decode steps inside ``generate``, goes straight to the original method. Handles
stack: applying again on the same model makes the newest handle the active one, and removing a
handle (in any order) re-activates the one below; removing the last restores the instance
exactly as it was. ``remove()`` is idempotent.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, UnsupportedInput, UnsupportedModel, adapter_for, capture
from .adapters.base import Entry, cache_keyword, cache_of
from .adapters.llm_site import LlmSite, Session
from .budget import KEEP_ALL, Budget, BudgetLike
from .call import PrunedCall, PruneRecord
from .pipeline import Pipeline
from .spec import PipelineSpec

__all__ = ["apply", "PruningHandle"]

_STACK = "_tokenprune_stack"
_SAVED = "_tokenprune_saved"
_MISSING = object()
_PATCHED: tuple[Entry, ...] = ("forward", "generate")


def _as_pipeline(spec: Pipeline | PipelineSpec | str | Path) -> Pipeline:
    if isinstance(spec, Pipeline):
        return spec
    if isinstance(spec, PipelineSpec):
        return Pipeline(spec)
    if isinstance(spec, (str, Path)):
        return Pipeline.from_file(spec)
    raise TypeError(
        f"apply() takes a Pipeline, a PipelineSpec, the path of a spec TOML file or a preset name, "
        f"not {type(spec).__name__}"
    )


def _default_budget(budget: BudgetLike | None, pipeline: Pipeline) -> Budget | None:
    """The handle's budget, parsed once: the one given, else the spec's; ``None`` only for a stage
    that fixes its own count (pooling)."""
    spec = pipeline.spec
    parsed = spec.budget_or_default(budget)
    if parsed is None and not spec.completion_fixes_budget:
        raise ValueError("no budget: pass apply(..., budget=64) (tokens per image), a ratio such as 0.25, "
                         "or one count per image such as [8, 4]")
    return parsed


class PruningHandle:
    """The result of :func:`apply`: a context manager with :meth:`remove` and the last call's record.

    Attributes:
        model: the patched model instance.
        pipeline: the :class:`~tokenprune.Pipeline` that selects tokens.
        budget: the :class:`~tokenprune.budget.Budget` of every call (``None``: the stage fixes
            its own count). May be changed between calls in any form ``apply`` takes
            (``handle.budget = 32``; ``None`` restores the spec's); ``tokenprune_budget=`` on one
            call overrides it.
        tokenizer: decodes ``input_ids`` into the router's prompt text (a tokenizer or processor).
        last: :class:`~tokenprune.call.PruneRecord` of the last pruned call (``None`` before
            any call with images): routed classes, kept indices and provenance per image, the keep
            mask over the caller's sequence, timings.
    """

    @property
    def budget(self) -> Budget | None:
        return self._budget

    @budget.setter
    def budget(self, value: BudgetLike | None) -> None:
        self._budget = _default_budget(value, self.pipeline)

    def __init__(self, model: nn.Module, pipeline: Pipeline, adapter: Adapter, budget: Budget | None, tokenizer: Any):
        self.model = model
        self.pipeline = pipeline
        self.adapter = adapter
        self._budget = budget
        spec = pipeline.spec
        #: what the pre-LLM stages keep under an in-LLM spec, parsed once here
        self._pre_llm = KEEP_ALL if spec.pre_llm_budget is None else Budget.parse(spec.pre_llm_budget)
        self.tokenizer = tokenizer
        self.last: PruneRecord | None = None
        self._modules = [
            adapter.attention_module(layer)
            for layer in sorted(self._attention_layers())
        ]
        self.site: LlmSite | None = None
        if pipeline.spec.llm is not None:
            if not adapter.llm_site:
                raise UnsupportedModel(
                    f"in-LLM pruning ([llm] stage '{pipeline.spec.stage_name('llm')}') supports LLaVA-1.5, -NeXT and "
                    f"-OneVision and Qwen2/2.5/3-VL; the {adapter.family} adapter of "
                    f"{type(model).__name__} does not (llm_site = False): use a pre-LLM spec"
                )
            self.site = LlmSite(adapter, pipeline.spec.llm, pipeline.spec.stage_name("llm"))
        if pipeline.spec.image_downsample:
            adapter.check_downsample()
        self._pending: Session | None = None  # a generate() prefill waiting for its first forward call
        self._removed = False

    def _attention_layers(self) -> set[int]:
        need = self.pipeline.signal_requirements(self.adapter.num_layers)
        self.adapter.check_scoring(need)
        return set(need.cls_attention | need.received_attention | need.attention_keys)

    @property
    def active(self) -> bool:
        """Whether this handle is the one that prunes the model's calls now."""
        stack = self.model.__dict__.get(_STACK) or []
        return bool(stack) and stack[-1] is self

    # -- context manager -----------------------------------------------------------------------------
    def __enter__(self) -> PruningHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else ("active" if self.active else "stacked")
        return f"<PruningHandle {self.pipeline.spec.name!r} on {type(self.model).__name__}, budget={self.budget}, {state}>"

    # -- install / remove ------------------------------------------------------------------------------
    def _install(self) -> None:
        model = self.model
        stack = model.__dict__.get(_STACK)
        if stack is None:
            model.__dict__[_SAVED] = {name: model.__dict__.get(name, _MISSING) for name in _PATCHED}
            originals = {name: getattr(model, name) for name in _PATCHED}  # bound methods (or prior wrappers)
            stack = model.__dict__[_STACK] = []
            for name in _PATCHED:
                model.__dict__[name] = _wrap(model, originals[name], name)
        stack.append(self)
        for module in self._modules:
            capture.flag_module(module)
        if self.site is not None:
            self.site.install()

    def remove(self) -> None:
        """Stop pruning with this handle; the model is restored when no handle is left."""
        if self._removed:
            return
        self._removed = True
        model = self.model
        stack: list[PruningHandle] = model.__dict__.get(_STACK) or []
        if self in stack:
            stack.remove(self)
        still = {id(m) for h in stack for m in h._flagged()}
        for module in self._modules:
            if id(module) not in still:
                capture.unflag_module(module)
        if self.site is not None:
            self.site.remove(still)
        if not stack:
            saved = model.__dict__.pop(_SAVED, {})
            model.__dict__.pop(_STACK, None)
            for name, value in saved.items():
                if value is _MISSING:
                    model.__dict__.pop(name, None)
                else:
                    model.__dict__[name] = value

    def _flagged(self) -> list[nn.Module]:
        return self._modules + (self.site.attention_modules() if self.site is not None else [])

    # -- one call ------------------------------------------------------------------------------------------
    def _prepare(self, kwargs: dict[str, Any], prompts: Any, budget: BudgetLike | None, entry: Entry):
        call = PrunedCall(self.adapter, self.pipeline, self.budget if budget is None else Budget.parse(budget),
                          self._pre_llm, prompts=prompts, tokenizer=self.tokenizer, entry=entry)
        new, record = call.run(kwargs)
        self.last = record
        return new

    def _call(self, original: Any, new: dict[str, Any], entry: Entry) -> Any:
        """Run the pruned call; with an in-LLM pruner, inside its prefill session."""
        site = self.site
        if site is None:
            return original(**new)
        record = self.last
        assert record is not None and record.llm_budget is not None  # _prepare ran, with an [llm] stage
        session = site.begin(new, record.kept, record.image_sample, record.llm_budget,
                             *_at_columns(record.newline_mask, record.grid_row, source=record.source))
        if entry == "generate":  # the prefill is generate's first forward call
            if new.get("use_cache") is False:
                raise UnsupportedInput(
                    "in-LLM pruning drops tokens at prefill and keeps them out through the KV cache; "
                    "generate(use_cache=False) would re-run every step unpruned: leave use_cache on"
                )
            self._pending = session
            try:
                return original(**new)
            finally:
                self._pending = None
        if new.get("use_cache", True) is not False and cache_of(new) is None:
            from transformers import DynamicCache

            new[cache_keyword()] = DynamicCache(config=self.adapter.text_config())
        with site.prefill(session, new):
            out = original(**new)
        self._finish(session)
        return out

    def _passthrough(self, original: Any, kwargs: dict[str, Any], entry: Entry) -> Any:
        """A call without images: a generate prefill we prepared, a decode step on a pruned
        cache, or an ordinary call."""
        site = self.site
        if site is not None and entry == "forward":
            if self._pending is not None:
                session, self._pending = self._pending, None
                with site.prefill(session, kwargs):
                    out = original(**kwargs)
                self._finish(session)
                return out
            decoding = site.session_of(cache_of(kwargs))
            if decoding is not None:
                with site.decode(decoding, kwargs.get("attention_mask")):
                    return original(**kwargs)
        return original(**kwargs)

    def _finish(self, session: Any) -> None:
        record = self.last
        assert record is not None
        src = record.source  # (B, S') caller's columns of the LLM input
        last = session.steps[-1] if session.steps else None
        llm_source = None if last is None else src.gather(1, last.source).masked_fill(~last.valid, -1)
        self.last = dataclasses.replace(record, llm_kept=tuple(session.keep), llm_source=llm_source)


def _at_columns(*per_column: torch.Tensor | None, source: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """``(B, S)`` tensors over the caller's columns, gathered at the pruned call's ``source``
    columns ``(B, S')`` (``-1`` padding reads column 0 and is masked by the site)."""
    return tuple(None if t is None else t.gather(1, source.clamp_min(0)) for t in per_column)


def _top(model: nn.Module) -> PruningHandle | None:
    stack = model.__dict__.get(_STACK)
    return stack[-1] if stack else None


def _bind(method: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    if not args:
        return kwargs
    bound = inspect.signature(method).bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    extra = out.pop("kwargs", None)
    if isinstance(extra, dict):
        out.update(extra)
    return out


#: the models whose pruned call is running now: their inner forward calls carry the pruned
#: features (``mm_encoder_outputs``), which are refused only when the caller passes them
_RUNNING: ContextVar[frozenset[int]] = ContextVar("tokenprune_running", default=frozenset())


def _wrap(model: nn.Module, original: Any, entry: Entry):
    """The instance attribute that replaces ``forward`` or ``generate`` (``entry``)."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any):
        prompts = kwargs.pop("tokenprune_prompts", None)
        budget = kwargs.pop("tokenprune_budget", None)
        handle = _top(model)
        if handle is None:
            return original(*args, **kwargs)
        kwargs = _bind(original, args, kwargs)
        if "inputs" in kwargs:  # generate(tensor) names its first argument `inputs`
            kwargs["input_ids"] = kwargs.pop("inputs")
        if not handle.adapter.has_visuals(kwargs):  # text-only call, or a decode step: nothing to prune
            if id(model) not in _RUNNING.get():  # the caller's own call (not generate's inner forward)
                handle.adapter.refuse_unpruned_visuals(kwargs)  # ... unless it carries visuals we cannot prune
            return handle._passthrough(original, kwargs, entry)
        new = handle._prepare(kwargs, prompts, budget, entry)
        running = _RUNNING.set(_RUNNING.get() | {id(model)})
        try:
            out = handle._call(original, new, entry)
        finally:
            _RUNNING.reset(running)
        if entry == "generate":
            return _with_prompt(out, kwargs["input_ids"], new["input_ids"].shape[1])
        return out

    return wrapper


def _with_prompt(out: Any, ids: torch.Tensor, pruned_len: int) -> Any:
    """Give back the caller's own prompt followed by the new tokens, as an unpruned generate does."""
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    new_tokens = seq[:, pruned_len:]
    prompt = ids.repeat_interleave(seq.shape[0] // ids.shape[0], 0)  # beams / num_return_sequences
    full = torch.cat([prompt.to(seq.device), new_tokens], 1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out


def apply(
    model: nn.Module,
    spec: Pipeline | PipelineSpec | str | Path,
    budget: BudgetLike | None = None,
    *,
    tokenizer: Any = None,
) -> PruningHandle:
    """Prune the visual tokens of ``model``'s image prompts with ``spec``, on this instance only.

    Args:
        model: a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
            ``LlavaOnevisionForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
            ``Qwen2_5_VLForConditionalGeneration`` or ``Qwen3VLForConditionalGeneration``
            (transformers 5.x); images, and videos on OneVision and the Qwen families.
        spec: a :class:`~tokenprune.Pipeline`, a :class:`~tokenprune.PipelineSpec`, a spec file, or a
            shipped preset by name (``"clasp"``, ``"visionzip"``: :func:`tokenprune.spec.presets`).
        budget: visual tokens kept per image or video (int), a ratio of each one's tokens in
            ``(0, 1]``, one count per item (a list, in the order the images appear in a call's
            batch, then the videos), or :meth:`tokenprune.Budget.per_frame`; ``None`` takes the
            spec's ``budget``. A call may pass ``tokenprune_budget=`` in any of these forms instead.
        tokenizer: the tokenizer (or processor) that made ``input_ids``, so the router can read
            the prompt. Without it, pass ``tokenprune_prompts=[...]`` to each call, or use a router
            that reads no text (``fixed``).

    Returns:
        a :class:`PruningHandle`: use it as a context manager, or call ``.remove()``.

    Inside, call ``model(**inputs)`` or ``model.generate(**inputs)`` exactly as without pruning.
    ``generate`` returns the caller's prompt followed by the new tokens; ``forward`` returns
    outputs over the pruned sequence (``handle.last.source`` maps each position back).
    Calls without images or videos pass through unchanged; a visual input the model's family
    cannot prune raises :class:`~tokenprune.adapters.UnsupportedInput`.
    """
    pipeline = _as_pipeline(spec)
    parsed = _default_budget(budget, pipeline)
    adapter = adapter_for(model)
    if tokenizer is not None and not hasattr(tokenizer, "batch_decode"):
        raise TypeError(f"tokenizer must have batch_decode (a tokenizer or processor), got {type(tokenizer).__name__}")
    handle = PruningHandle(model, pipeline, adapter, parsed, tokenizer)
    handle._install()
    return handle
