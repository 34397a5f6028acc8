"""Running a spec: route -> fuse -> score -> split the budget -> pivots -> completion -> sorted keep.

The pipeline checks every stage's output against the contract (counts, masks, shapes), so a
faulty third-party stage fails loudly instead of producing silently wrong selections.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checks, ops
from .budget import Budget, BudgetLike, row_counts
from .contract import Fused, Provenance, Requirements, Routing, Selection, VisualTokens
from .prompts import extract_question
from .registry import stage_label
from .spec import PipelineSpec, load_spec
from .stages import KINDS, CompletionRequest

__all__ = ["Pipeline", "resolve_budget"]

Timer = Callable[[str], contextlib.AbstractContextManager]


def resolve_budget(budget: BudgetLike | None, valid_counts: Tensor) -> Tensor:
    """``R`` ``(B,)`` int64 on ``valid_counts``'s device, each row's budget clipped to its valid
    token count (:meth:`Budget.parse` then :meth:`Budget.counts`).

    A float in ``(0, 1]`` is a ratio: ``R_b = max(1, round(ratio * M_b))``.
    """
    return Budget.parse(budget).counts(valid_counts)


class Pipeline:
    """A validated spec, ready to run on :class:`~tokenprune.contract.VisualTokens`.

    >>> pipe = Pipeline.from_file("specs/clasp.toml")           # doctest: +SKIP
    >>> sel = pipe(tokens, budget=64)                             # doctest: +SKIP
    >>> sel.indices, sel.provenance, sel.routing.classes          # doctest: +SKIP
    """

    def __init__(self, spec: PipelineSpec):
        self.spec = spec

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Pipeline:
        return cls(load_spec(path, **overrides))

    # -- stages ---------------------------------------------------------------------------------
    @property
    def router(self):
        return self.spec.router

    @property
    def table(self):
        return self.spec.class_table

    def route(self, prompts: Sequence[str]) -> Routing:
        """Run the router on the questions of ``B`` prompts and check its answer.

        Each prompt is first reduced to its question (:func:`tokenprune.prompts.extract_question`:
        no chat template, system prompt, harness instruction or option list), unless the router
        sets ``reads_whole_prompt``; what it read is ``routing.questions``."""
        router = self.spec.router
        questions = [str(p) if router.reads_whole_prompt else extract_question(str(p)).text for p in prompts]
        with _inside(self.spec, "router"):
            routed = router.route(questions)
        _enforce(self.spec, "router", len(prompts), self.table.classes, answer=routed)
        return dataclasses.replace(routed, questions=tuple(questions))

    def requirements(self, routing: Routing, num_layers: int) -> Requirements:
        """What the model must supply for this batch: fused layers, attention layers, keys, text."""
        return self.spec.fusion.requirements(routing, self.table, num_layers) | self.signal_requirements(num_layers)

    def signal_requirements(self, num_layers: int) -> Requirements:
        """The attention signals (maps, keys) and text the scorer and the completion read; the same
        for every batch, so adapters can prepare the attention modules once."""
        return self.spec.scoring.requirements(num_layers) | self.spec.completion.requirements(num_layers)

    def fixed_budget(self, tokens: VisualTokens) -> Tensor | None:
        """``(B,)`` tokens per row when the completion stage fixes the count (pooling), else ``None``."""
        return self.spec.completion.fixed_budget(tokens)

    # -- running --------------------------------------------------------------------------------
    def __call__(
        self,
        tokens: VisualTokens,
        budget: BudgetLike | None = None,
        routing: Routing | None = None,
        timer: Timer | None = None,
    ) -> Selection:
        """Select the tokens to keep, with the budget a user gives (the API boundary: it is
        parsed and defaulted here, then :meth:`run` takes counts).

        Args:
            tokens: the batch.
            budget: tokens per image, a ratio, or per-sample counts; defaults to the spec's.
            routing: a routing decided earlier (adapters route before running the encoder);
                routed from ``tokens.prompts`` when ``None``.
            timer: optional ``timer(stage_name)`` context-manager factory (benchmarks).

        Returns:
            :class:`~tokenprune.contract.Selection`.
        """
        fixer = f"completion '{self.spec.stage_name('completion')}'"
        R = row_counts(self.spec.budget_or_default(budget), tokens.valid().sum(1), self.fixed_budget(tokens), fixer)
        return self.run(tokens, R, routing, timer)

    def run(
        self,
        tokens: VisualTokens,
        counts: Tensor,
        routing: Routing | None = None,
        timer: Timer | None = None,
    ) -> Selection:
        """Select ``counts[b]`` tokens of row ``b``: the budget already resolved to counts
        (:func:`tokenprune.budget.row_counts`; :class:`tokenprune.call.PrunedCall` does it once
        per call).

        Args:
            tokens: the batch.
            counts: ``(B,)`` integer tokens to keep per row, each in ``0..valid`` (the row's real
                tokens); a stage that fixes the counts (pooling) must be given exactly those.
            routing: as in :meth:`__call__`.
            timer: as in :meth:`__call__`.
        """
        tick = timer or (lambda name: contextlib.nullcontext())
        valid = tokens.valid()
        fixed = self.fixed_budget(tokens)
        R = self._checked_counts(counts, valid.sum(1), fixed)  # (B,)
        if (problem := checks.non_finite_signals(tokens, self.signal_requirements(tokens.num_layers))) is not None:
            raise ValueError(f"{problem}: the stages would select from it. Check the pixel values, and run the "
                             "vision tower in fp32 or bf16 if fp16 overflows")
        with tick("routing"):
            routing = self._routing(tokens, routing, R)
        with tick("fusion"):
            fused = self._fused(tokens, routing, valid)
        with tick("scoring"):
            phi = self._scored(tokens, fused, valid)
        with tick("budget"):
            a, k1 = self._pivot_counts(routing, R, fixed)
            k2 = R - k1
        with tick("selection"):
            with _inside(self.spec, "selection"):
                pivots = self.spec.selection.select(phi, k1, valid, fused)
            _enforce(self.spec, "selection", k1, valid, answer=pivots)
        with tick("completion"):
            extra, merged = self._completed(CompletionRequest(phi, pivots, k2, valid, tokens, fused))
        with tick("output"):
            return _selection(pivots, extra, merged, fused, routing, a)

    # -- the steps of run ---------------------------------------------------------------------------
    def _checked_counts(self, counts: Tensor, real: Tensor, fixed: Tensor | None) -> Tensor:
        """``counts`` as ``(B,)`` int64 on ``real``'s device, refused unless each is in ``0..real``
        and, when the completion fixes the counts, equal to them."""
        R = _checked_counts(counts, real)
        if fixed is not None and not torch.equal(R, fixed.to(R.device)):
            raise ValueError(f"completion '{self.spec.stage_name('completion')}' decides how many tokens each row "
                             f"keeps ({fixed.tolist()} here), but Pipeline.run was given {R.tolist()}")
        return R

    def _routing(self, tokens: VisualTokens, routing: Routing | None, R: Tensor) -> Routing:
        """The given routing (checked against the batch), else the router's on ``tokens.prompts``;
        with each row's count, which a banded class table reads."""
        B = tokens.shape[0]
        if routing is None:
            if not tokens.prompts:
                raise ValueError("no prompts to route: pass VisualTokens(prompts=[...]) or routing=Routing(...)")
            routing = self.route(tokens.prompts)
        elif len(routing.classes) != B:
            raise ValueError(f"routing has {len(routing.classes)} entries for a batch of {B}")
        return dataclasses.replace(routing, budgets=R.cpu())

    def _fused(self, tokens: VisualTokens, routing: Routing, valid: Tensor) -> Fused:
        spec = self.spec
        with _inside(spec, "fusion"):
            fused = spec.fusion.fuse(tokens, routing, self.table)
        _enforce(spec, "fusion", *tokens.shape, answer=fused)
        _check_finite(fused, tokens, valid, spec)
        return fused

    def _scored(self, tokens: VisualTokens, fused: Fused, valid: Tensor) -> Tensor:
        spec = self.spec
        with _inside(spec, "scoring"):
            phi = spec.scoring.score(tokens, fused)  # (B, M)
        _enforce(spec, "scoring", valid, answer=phi)
        if (problem := checks.non_finite_scores(phi, valid)) is not None:
            raise ValueError(f"the {stage_label(spec.scoring, spec.stage_name('scoring'))} {problem}")
        return phi

    def _pivot_counts(self, routing: Routing, R: Tensor, fixed: Tensor | None) -> tuple[Tensor, Tensor]:
        """The budget policy's pivot ratio ``a`` ``(B,)`` float64 and the pivots per row
        ``k1 = floor(a * R)`` (eq. 34), refused when no stage can choose pivots."""
        spec = self.spec
        with _inside(spec, "budget_policy"):
            a = spec.budget_policy.pivot_ratio(routing, self.table)
        _enforce(spec, "budget_policy", R.shape[0], answer=a)
        a = a.to(torch.float64)
        k1 = torch.floor(a.to(R.device) * R + 1e-6).long()  # (B,)
        if fixed is not None and bool(k1.any()):
            raise ValueError(
                f"completion '{spec.stage_name('completion')}' fixes the whole selection, so the budget "
                "policy must give no pivots: use [budget_policy] stage = \"fixed\", ratio = 0.0")
        if not spec.scoring.gives_signal and bool(k1.any()):
            raise ValueError(
                f"the {stage_label(spec.budget_policy, spec.stage_name('budget_policy'))} gives pivots "
                f"(a = {a.tolist()}), but the {stage_label(spec.scoring, spec.stage_name('scoring'))} carries no "
                "saliency to choose them by: give the spec a [scoring] stage (cls-attention, "
                "received-attention, ...) or a budget policy without pivots")
        return a, k1

    def _completed(self, req: CompletionRequest) -> tuple[Tensor, Tensor | None]:
        """The completion's ``(B, M)`` mask of ``k2`` tokens from the pool, and its merged features
        (``None`` unless it merges); a pool kept whole, or no completion budget, skips the stage."""
        pool = req.valid & ~req.pivots  # (B, M)
        if bool(torch.equal(req.k2, pool.sum(1))):  # every row keeps its whole pool
            return pool, None
        if not bool(req.k2.any()):  # pivots fill every budget
            return torch.zeros_like(pool), None
        with _inside(self.spec, "completion"):
            res = self.spec.completion.complete(req)
        _enforce(self.spec, "completion", req.k2, pool, answer=res.mask)
        return res.mask, res.features


def _checked_counts(counts: Tensor, real: Tensor) -> Tensor:
    """``counts`` as ``(B,)`` int64 on ``real``'s device, refused unless each is in ``0..real``."""
    if not isinstance(counts, Tensor) or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise TypeError(f"Pipeline.run takes the counts per row as an integer tensor, got {counts!r}: "
                        "call the pipeline itself (pipe(tokens, budget=64)) to give a budget")
    if counts.shape != real.shape:
        raise ValueError(f"Pipeline.run got counts of shape {tuple(counts.shape)} for {real.shape[0]} rows: "
                         "give one count per row")
    R = counts.to(device=real.device, dtype=torch.int64)
    bad = (R < 0) | (real < R)
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise ValueError(f"Pipeline.run was asked to keep {int(R[b])} tokens of row {b}, which has {int(real[b])} "
                         "real tokens: a count is in 0..(real tokens); Budget.counts clips a budget to them")
    return R


def _selection(pivots: Tensor, extra: Tensor, merged: Tensor | None, fused: Fused, routing: Routing,
               pivot_ratio: Tensor) -> Selection:
    """The kept tokens as sorted indices with their provenance, and the features the LLM should
    read instead of its own (merged ones from the completion, or the fused mix), if any."""
    keep = pivots | extra  # (B, M)
    indices, counts = ops.mask_to_indices(keep)  # (B, K)
    prov = torch.where(pivots, int(Provenance.PIVOT), int(Provenance.COMPLETION)).to(torch.int8)
    sel_prov = prov.gather(1, indices.clamp_min(0)).masked_fill(indices < 0, int(Provenance.PAD))
    features = None
    if merged is not None or fused.feed_llm:
        out = Selection(indices, counts, sel_prov, routing)
        features = out.gather(fused.decoder)  # (B, K, D)
        if merged is not None:  # the completion's rows, gathered then picked: no (B, M, D) pass
            from_completion = (sel_prov == int(Provenance.COMPLETION)).unsqueeze(-1)  # (B, K, 1)
            features = torch.where(from_completion, out.gather(merged), features)
    return Selection(indices=indices, counts=counts, provenance=sel_prov, routing=routing, features=features,
                     alpha=fused.alpha, pivot_ratio=pivot_ratio.float())


def _check_finite(fused: Fused, tokens: VisualTokens, valid: Tensor, spec) -> None:
    """Refuse NaN/inf features on real tokens (they would decide the selection and reach the LLM),
    naming the row, the token and the encoder layers that carry them. One reduction per fused
    tensor; the layers are read only on the error path."""
    found = checks.first_non_finite(valid, fused.encoder, fused.decoder)
    if found is None:
        return
    b, m, count = found
    layers = sorted(k for k, h in tokens.layers.items() if not bool(torch.isfinite(h[b, m]).all()))
    where = (f"the encoder's hidden states {layers} already hold them" if layers else
             f"the encoder's layers are finite there, so fusion '{spec.stage_name('fusion')}' or the projector made them")
    raise ValueError(
        f"visual features are not finite (NaN or inf) at row {b}, token {m} ({count} real tokens in the "
        f"batch): {where}. Check the pixel values, and run the vision tower in fp32 or bf16 if fp16 overflows; "
        "tokenprune does not select from non-finite features")


@contextlib.contextmanager
def _inside(spec: PipelineSpec, kind: str):
    """An exception raised inside a stage leaves with a note that names the stage."""
    try:
        yield
    except Exception as exc:
        exc.add_note(f"raised inside the {stage_label(spec.stage(kind), spec.stage_name(kind))}")
        raise


def _enforce(spec: PipelineSpec, kind: str, *context: Any, answer: Any) -> None:
    """Run the kind's output check (:data:`tokenprune.stages.KINDS`) on a stage's answer; a
    violation raises naming the stage."""
    problem = KINDS[kind].check(answer, *context)
    if problem is not None:
        raise RuntimeError(f"the {stage_label(spec.stage(kind), spec.stage_name(kind))} {problem}")
