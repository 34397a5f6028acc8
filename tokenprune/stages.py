"""Base classes of the seven stage kinds, and :data:`KINDS`, the one record of each kind.

A stage is a small typed object: a pydantic model whose fields are its hyper-parameters (validated
with ``extra="forbid"``, so a misspelt parameter is an error) and one method that does the work.
Plugins subclass one of these and register the subclass under a name through the matching hook in
:mod:`tokenprune.hookspecs`. Stage instances are immutable and hold no per-call state.

The methods' shapes use the alphabet of :mod:`tokenprune.contract`.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from . import checks, ops
from .classes import ClassTable
from .contract import Fused, Requirements, Routing, VisualTokens

__all__ = [
    "Stage",
    "Router",
    "Fusion",
    "Scorer",
    "Selector",
    "Completion",
    "BudgetPolicy",
    "CompletionRequest",
    "CompletionResult",
    "LlmPruner",
    "LlmRequest",
    "StageKind",
    "KINDS",
]


class Stage(BaseModel):
    """Common base: parameters are pydantic fields; instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    #: the kind's name in :data:`KINDS` (set on each kind's base class): its spec table
    kind: ClassVar[str] = ""
    #: whether selection by this stage commutes with permuting the tokens (no use of token order
    #: or positions beyond tie-breaking). Property tests check equivariance for these.
    permutation_invariant: ClassVar[bool] = True


class Router(Stage):
    """Maps prompt texts to question classes. Registered through ``register_routers``."""

    kind: ClassVar[str] = "router"
    #: whether :meth:`route` reads the prompt text. Adapters need a tokenizer (or explicit
    #: prompts) to recover the text only when this is true.
    reads_text: ClassVar[bool] = True
    #: ``False`` (the default): :meth:`tokenprune.Pipeline.route` hands :meth:`route` each
    #: prompt's question only (:func:`tokenprune.prompts.extract_question`: no chat template,
    #: system prompt, harness instruction or option list). ``True``: the whole prompt text.
    reads_whole_prompt: ClassVar[bool] = False

    @abstractmethod
    def route(self, prompts: Sequence[str]) -> Routing:
        """Classify ``B`` prompts.

        Args:
            prompts: the question texts, without image tokens and never with the answer (through
                a pipeline: the questions taken out of their chat templates, see
                ``reads_whole_prompt``).

        Returns:
            :class:`~tokenprune.contract.Routing`: one class from
            :data:`~tokenprune.classes.CLASSES` per prompt and a ``(B,)`` float32 confidence in
            ``[0, 1]``.
        """

    def explain(self, prompt: str) -> list[str]:
        """Why :meth:`route` gives ``prompt`` its class, as lines for ``tokenprune route
        --explain`` (the rules that matched, the nearest exemplars, ...). Optional."""
        return [f"router '{type(self).__name__}' gives no explanation"]


class Fusion(Stage):
    """Fuses the encoder's per-layer features. Registered through ``register_fusions``."""

    kind: ClassVar[str] = "fusion"

    @abstractmethod
    def requirements(self, routing: Routing, table: ClassTable, num_layers: int) -> Requirements:
        """The hidden-state indices (``0..L``) :meth:`fuse` will read for this batch."""

    @abstractmethod
    def fuse(self, tokens: VisualTokens, routing: Routing, table: ClassTable) -> Fused:
        """Fuse layers and project into decoder space.

        Must not stack the ``L`` layer tensors (that costs more than the fusion); accumulate in
        place instead. Must not modify the inputs.

        Returns:
            :class:`~tokenprune.contract.Fused` with ``encoder`` ``(B, M, Dv)`` and ``decoder``
            ``(B, M, D)`` in the input dtype.
        """


class Scorer(Stage):
    """Per-token saliency ``phi``. Registered through ``register_scorers``."""

    kind: ClassVar[str] = "scoring"
    #: ``False`` for a scorer that carries no saliency (``none``): pivots may not be chosen from it
    gives_signal: ClassVar[bool] = True

    def requirements(self, num_layers: int) -> Requirements:
        """Signals :meth:`score` reads (attention layers, text embedding). Default: none."""
        return Requirements()

    @abstractmethod
    def score(self, tokens: VisualTokens, fused: Fused) -> Tensor:
        """Return ``phi`` ``(B, M)`` float32; higher = more salient. Values on padding are ignored."""


class Selector(Stage):
    """Chooses the pivots under budget ``K1``. Registered through ``register_selectors``."""

    kind: ClassVar[str] = "selection"

    @abstractmethod
    def select(self, scores: Tensor, k1: Tensor, valid: Tensor, fused: Fused) -> Tensor:
        """Pick pivots.

        Args:
            scores: ``(B, M)`` float32 ``phi``.
            k1: ``(B,)`` int64 pivots per row, ``0 <= k1[b] <= valid[b].sum()``.
            valid: ``(B, M)`` bool real tokens.
            fused: the fused features (for selectors that look at them).

        Returns:
            ``(B, M)`` bool with exactly ``k1[b]`` true entries in row ``b``, within ``valid``.
        """


@dataclass(frozen=True)
class CompletionRequest:
    """Everything a completion stage may read.

    Attributes:
        scores: ``(B, M)`` float32 saliency ``phi``.
        pivots: ``(B, M)`` bool pivots already kept.
        k2: ``(B,)`` int64 completion tokens to add per row
            (``k2[b] <= (valid & ~pivots)[b].sum()``).
        valid: ``(B, M)`` bool real tokens.
        tokens: the stage inputs (positions, sample keys, ...).
        fused: the fused features.
        given_unit: ``u_t`` if the caller already has them, else ``None`` (see :attr:`unit`).
    """

    scores: Tensor
    pivots: Tensor
    k2: Tensor
    valid: Tensor
    tokens: VisualTokens
    fused: Fused
    given_unit: Tensor | None = None

    @functools.cached_property
    def unit(self) -> Tensor:
        """``(B, M, D)`` unit-norm decoder-space features ``u_t`` (input dtype), computed on first
        use: a stage that never reads them (merges, pooling, random) does not pay the pass."""
        return self.given_unit if self.given_unit is not None else ops.unit(self.fused.decoder)

    def similarity_or_unit(self, picks: int, force: bool | None = None) -> tuple[Tensor | None, Tensor | None]:
        """What the greedy solvers read: ``(gram, None)`` with the ``(B, M, M)`` cosine matrix of the
        decoder features when computing it once costs less than a product per pick
        (:func:`tokenprune.ops.similarity_rows`; ``force`` overrides), else ``(None, unit)``."""
        gram = ops.similarity_rows(self.fused.decoder, picks, force)
        return gram, (self.unit if gram is None else None)

    @property
    def pool(self) -> Tensor:
        """``(B, M)`` bool candidates: valid non-pivot tokens ``U = V \\ P``."""
        return self.valid & ~self.pivots


@dataclass(frozen=True)
class CompletionResult:
    """A completion stage's answer.

    Attributes:
        mask: ``(B, M)`` bool with exactly ``k2[b]`` true entries per row, within the pool.
        features: optional ``(B, M, D)`` replacement decoder-space features for kept tokens
            (merge-based methods write merged features at the kept positions), else ``None``.
            Only the rows of the tokens in ``mask`` are read.
    """

    mask: Tensor
    features: Tensor | None = None


class Completion(Stage):
    """Fills the remaining ``K2`` of the budget. Registered through ``register_completions``."""

    kind: ClassVar[str] = "completion"

    def requirements(self, num_layers: int) -> Requirements:
        """Signals :meth:`complete` reads from ``request.tokens`` (e.g. attention keys). Default: none."""
        return Requirements()

    def fixed_budget(self, tokens: VisualTokens) -> Tensor | None:
        """``(B,)`` int64 if this stage decides how many tokens each row keeps (pooling keeps one
        per window), else ``None``. The pipeline then keeps exactly that many and rejects any
        other budget."""
        return None

    @abstractmethod
    def complete(self, request: CompletionRequest) -> CompletionResult:
        """Choose ``k2[b]`` tokens of row ``b`` from ``request.pool``."""


class BudgetPolicy(Stage):
    """Maps classes to pivot ratios. Registered through ``register_budget_policies``."""

    kind: ClassVar[str] = "budget_policy"

    @abstractmethod
    def pivot_ratio(self, routing: Routing, table: ClassTable) -> Tensor:
        """``a`` ``(B,)`` float32 in ``[0, 1]``; ``K1 = floor(a * R)``, ``K2 = R - K1``."""


@dataclass(frozen=True)
class LlmRequest:
    """One pruning step inside the LLM, after decoder layer ``layer - 1`` and before ``layer``.

    Rows are images (``N``), columns the image's visual tokens still in the sequence (``M``,
    padded). Shapes use ``T`` for the text tokens of the image's prompt.

    Attributes:
        layer: the decoder layer ``K`` that will see the pruned sequence first (0-based).
        step: the step's ordinal in the stage's schedule.
        hidden: ``(N, M, D)`` hidden states of the visual tokens leaving layer ``K - 1``.
        valid: ``(N, M)`` bool real visual tokens.
        keep: ``(N,)`` int64 tokens to keep per image (``<= valid.sum(1)``).
        attention: ``(N, M)`` float32 attention the text paid to each visual token at layer
            ``K - 1`` (heads averaged; rows as the stage's ``query`` asks), or ``None``.
        key_norms: ``(N, M)`` float32 norm of each visual token's keys (all heads) at layer
            ``K - 1`` (L2, or the L1 norm of the rotated keys for a stage whose ``key_norm`` field
            is ``"l1-rotated"``), or ``None``.
        text_hidden: ``(N, T, D)`` hidden states of the question's text tokens (what follows the
            image), ``text_valid`` ``(N, T)`` bool, ``text_key_norms`` ``(N, T)`` or ``None``.
        norm: the LLM's final norm (DART compares normalised states), a callable on ``(..., D)``.
        index / text_index: ``(N, M)`` / ``(N, T)`` int64 each token's index in its prompt as the
            model received it (0 = the prompt's first non-padding token), for rules that depend on
            sequence order (DART as released processes its pivots in that order's hash order).
    """

    layer: int
    step: int
    hidden: Tensor
    valid: Tensor
    keep: Tensor
    attention: Tensor | None
    key_norms: Tensor | None
    text_hidden: Tensor
    text_valid: Tensor
    text_key_norms: Tensor | None
    norm: Callable[[Tensor], Tensor]
    index: Tensor | None = None
    text_index: Tensor | None = None

    def read(self, name: str) -> Tensor:
        """The signal ``name`` (``attention``, ``key_norms``, ``text_key_norms``, ``index``,
        ``text_index``), or a clear error when this step was not given it: the site records only
        what the pruner's ``reads`` names."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"the in-LLM step at layer {self.layer} was given no {name}: list it in the "
                             "pruner's reads (\"attention\" and/or \"key_norms\"), which the site records")
        return value


class LlmPruner(Stage):
    """Drops visual tokens inside the LLM at prefill. Registered through ``register_llm_pruners``.

    A spec with an ``[llm]`` stage keeps every visual token before the LLM (or its
    ``pre_llm_budget``); the budget is the number of visual tokens per image left after the last
    step of the schedule.
    """

    kind: ClassVar[str] = "llm"
    #: what :meth:`select` reads: ``"attention"`` and/or ``"key_norms"``. Stages that read
    #: attention also have a ``query`` field: ``"last"`` (the last token's attention row) or
    #: ``"text"`` (the mean over the question's tokens). Stages that read key norms may have a
    #: ``key_norm`` field: ``"l2"`` (the default; rotation-invariant) or ``"l1-rotated"``.
    reads: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def schedule(self, num_layers: int) -> list[int]:
        """The layers ``K`` (ascending, ``1 <= K < num_layers``) before which tokens are dropped."""

    def keep_counts(self, total: Tensor, budget: Tensor, steps: int) -> list[Tensor]:
        """Tokens per image after each step: ``total`` ``(N,)`` entering the LLM, ``budget``
        ``(N,)`` after the last step. Default: a geometric schedule
        ``round(total * (budget / total) ** ((s + 1) / steps))``, exact at the last step."""
        out = []
        for s in range(steps):
            frac = (budget.double() / total.double().clamp_min(1)) ** ((s + 1) / steps)
            k = torch.round(total.double() * frac).long() if s < steps - 1 else budget.clone()
            out.append(torch.maximum(torch.minimum(k, total), budget))
        return out

    @abstractmethod
    def select(self, req: LlmRequest) -> Tensor:
        """``(N, M)`` bool with exactly ``req.keep[n]`` true entries per row, within ``req.valid``."""


@dataclass(frozen=True)
class StageKind:
    """One kind of stage, with every name the library gives it.

    Attributes:
        name: the kind's one name: its spec table (``[scoring]``), its key in the registry and
            in :data:`KINDS`, its heading in ``tokenprune plugins``, and the word errors use
            ("the scoring stage 'centre' ...").
        hook: the hookspec in :mod:`tokenprune.hookspecs` that registers stages of this kind.
        base: the class a registered stage must subclass.
        summary: what a stage of this kind does, in one line (``tokenprune plugins``, docs).
        check: the output contract (:mod:`tokenprune.checks`) that the pipeline, the in-LLM site
            and the conformance kit run on every answer of such a stage.
        optional: whether a spec may leave the table out.
    """

    name: str
    hook: str
    base: type[Stage]
    summary: str
    check: Callable[..., str | None]
    optional: bool = False


#: every stage kind by name, in pipeline order
KINDS: dict[str, StageKind] = {k.name: k for k in (
    StageKind("router", "register_routers", Router, "prompt -> question class and confidence",
              checks.check_routing),
    StageKind("fusion", "register_fusions", Fusion, "encoder layers -> fused features (encoder and decoder space)",
              checks.check_fused),
    StageKind("scoring", "register_scorers", Scorer, "tokens -> saliency phi (B, M) float32",
              checks.check_scores),
    StageKind("selection", "register_selectors", Selector, "saliency -> exactly K1 pivots per row",
              checks.check_mask),
    StageKind("completion", "register_completions", Completion,
              "the remaining K2 tokens per row (coverage, diversity, merges)", checks.check_mask),
    StageKind("budget_policy", "register_budget_policies", BudgetPolicy, "class -> pivot share a in [0, 1]",
              checks.check_pivot_ratio),
    StageKind("llm", "register_llm_pruners", LlmPruner, "drops visual tokens inside the LLM at prefill",
              checks.check_mask, optional=True),
)}
