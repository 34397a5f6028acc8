"""The stage contract as hypothesis properties, for any registered stage of any kind.

A stage is called directly, on random batches with padding scattered through the rows, in
float32, float16 and bfloat16, on the CPU and on CUDA when present, and must:

- ``contract``: answer as its kind's record says (:data:`tokenprune.stages.KINDS`: exact counts,
  masks inside their candidates, shapes and dtypes), with finite values on real tokens;
- ``requirements``: need no signal it did not declare (the batch carries exactly what the
  stage's ``requirements`` asks for);
- ``untouched``: leave every input tensor as it was;
- ``deterministic``: give the same answer twice;
- ``batch-independent``: answer for row ``b`` of a batch what it answers for sample ``b`` alone;
- ``permutation``: for a stage that declares ``permutation_invariant``, follow a permutation of
  the tokens (float64 inputs, so no rounding ties);
- ``schedule`` (in-LLM stages): name ascending layers in ``1..L-1`` for any depth, with keep
  counts that never grow and end at the budget.

:func:`properties` lists the checks that apply to a stage, and :func:`run` runs one. The pytest
plugin (:mod:`tokenprune.testing.plugin`) runs them from ``pytest --tokenprune-stage NAME``, and
:class:`StageConformance` from a test class.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from torch import Tensor

from .. import ops
from ..checks import (
    check_fused,
    check_mask,
    check_pivot_ratio,
    check_routing,
    check_schedule,
    check_scores,
    non_finite_scores,
)
from ..classes import CLASSES, ClassTable
from ..contract import Fused, Requirements, Routing, VisualTokens
from ..registry import Registry, get_registry, stage_label
from ..stages import KINDS, CompletionRequest, LlmRequest, Stage
from .inputs import DTYPES, PROMPTS, make_tokens, permute, row

__all__ = ["StageUnderTest", "stage_under_test", "properties", "run", "StageConformance", "ConformanceError"]

L = 4  # encoder depth of the random batches; default layer indices such as -2 resolve inside it


class ConformanceError(AssertionError):
    """A stage broke its contract; the message names the stage, the property and the case."""


@dataclass(frozen=True)
class StageUnderTest:
    """A registered stage built with its parameters, and the label errors name it by."""

    kind: str
    name: str
    stage: Stage
    label: str

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"


def stage_under_test(word: str, params: Mapping[str, Any] | None = None,
                     registry: Registry | None = None) -> StageUnderTest:
    """``"divprune"`` or ``"completion:divprune"`` -> the registered stage, built with ``params``.

    Raises:
        LookupError: no stage has that name, or several kinds do and ``word`` gives no kind.
        ValueError: the parameters do not validate (a stage with required parameters needs them).
    """
    reg = registry or get_registry()
    kind, _, name = word.rpartition(":")
    if kind:
        try:
            info = reg.get(kind, name)
        except KeyError as exc:
            raise LookupError(exc.args[0]) from None
    else:
        found = [reg.get(k, name) for k in KINDS if name in reg.stages[k]]
        if len(found) != 1:
            known = ", ".join(f"{i.kind}:{i.name}" for i in reg)
            kinds = ", ".join(i.kind for i in found)
            why = (f"several kinds have a stage called '{name}' ({kinds}): give KIND:NAME" if found
                   else f"no registered stage is called '{name}'")
            raise LookupError(f"{why}; registered stages: {known}")
        info = found[0]
    try:
        stage = info.cls.model_validate(dict(params or {}))
    except Exception as exc:
        required = [p for p, v in info.parameters().items() if v["required"]]
        hint = f"; it has required parameters {required}: pass them as params" if required else ""
        raise ValueError(f"cannot build {info.kind} stage '{info.name}' with parameters {dict(params or {})}: "
                         f"{exc}{hint}") from None
    return StageUnderTest(info.kind, info.name, stage, stage_label(stage, info.name))


# -- random cases -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One random batch: sizes, padding, dtype, device and the seed of every tensor."""

    B: int
    h: int
    w: int
    valid_counts: tuple[int, ...]
    dtype: torch.dtype
    seed: int
    device: str

    @property
    def M(self) -> int:
        return self.h * self.w

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7 + salt)


@st.composite
def cases(draw, device: str, dtypes=tuple(DTYPES), max_B: int = 4) -> Case:
    B = draw(st.integers(1, max_B))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    counts = tuple(draw(st.integers(1, h * w)) for _ in range(B))
    return Case(B, h, w, counts, draw(st.sampled_from(dtypes)), draw(st.integers(0, 2**31 - 1)), device)


def _tokens(case: Case, need: Requirements | None = None) -> VisualTokens:
    """The case's batch. With ``need``: only those layers (or all when it names none) and only
    those signals, so a stage that reads what it did not declare fails."""
    full = make_tokens(case.B, case.M, L=L, dtype=case.dtype, device=case.device, seed=case.seed,
                       valid_counts=list(case.valid_counts), grid=(case.h, case.w), signal_layers=range(L + 1))
    if need is None:
        return full
    keep = lambda table, wanted: {k: v for k, v in table.items() if k in wanted}  # noqa: E731
    return dataclasses.replace(
        full,
        layers=keep(full.layers, need.layers) or full.layers,
        cls_attention=keep(full.cls_attention, need.cls_attention),
        received_attention=keep(full.received_attention, need.received_attention),
        attention_keys=keep(full.attention_keys, need.attention_keys),
        cls_token=keep(full.cls_token, need.cls_token),
        text_embedding=full.text_embedding if need.text_embedding else None,
    )


def _routing(case: Case, table: ClassTable) -> Routing:
    g = case.generator(1)
    names = list(table.classes)
    picks = torch.randint(len(names), (case.B,), generator=g).tolist()
    return Routing(tuple(names[i] for i in picks), torch.rand(case.B, generator=g))


def _subset(valid: Tensor, g: torch.Generator, share: float) -> Tensor:
    """A random subset of each row's true entries, about ``share`` of them."""
    return valid & (torch.rand(valid.shape, generator=g) < share).to(valid.device)


def _counts_up_to(available: Tensor, g: torch.Generator) -> Tensor:
    """``(B,)`` int64 uniform in ``0..available[b]``."""
    u = torch.rand(available.shape, generator=g).to(available.device)
    return torch.floor(u * (available + 1).double()).long().clamp(max=available)


# -- one call of a stage of each kind: its inputs, its answer as rows, its contract ---------------
@dataclass
class Call:
    """The inputs of one direct call: the batch and the kind's other arguments (row-sliceable)."""

    tokens: VisualTokens
    args: dict[str, Any]


def _base_fused(tokens: VisualTokens) -> Fused:
    h = tokens.layer(-2)
    return Fused(h, tokens.project(h) if tokens.project else h)


class Kind(ABC):
    """How the kit calls a stage of one kind; one subclass per kind."""

    table = ClassTable.default()

    def need(self, sut: StageUnderTest, case: Case) -> Requirements | None:
        """What the batch carries (``None``: everything)."""
        return None

    @abstractmethod
    def call_for(self, sut: StageUnderTest, case: Case) -> Call:
        """The inputs of one direct call on ``case``."""

    @abstractmethod
    def answer(self, sut: StageUnderTest, call: Call) -> Any:
        """The stage's answer to ``call``."""

    @abstractmethod
    def problem(self, answer: Any, call: Call) -> str | None:
        """The contract violation in ``answer``, or ``None``."""

    @abstractmethod
    def rows(self, answer: Any, call: Call) -> dict[str, Tensor]:
        """The answer as tensors whose first dimension is the batch (compared row by row);
        values on padding zeroed."""

    #: the rows' keys that are per-token (permuted with the tokens)
    per_token: tuple[str, ...] = ()

    def for_permutation(self, call: Call) -> Call:
        """The call the permutation property compares (default: as drawn)."""
        return call


class RouterKind(Kind):
    def call_for(self, sut, case):
        g = case.generator(2)
        picks = torch.randint(len(PROMPTS), (case.B,), generator=g).tolist()
        return Call(_tokens(case), {"prompts": [PROMPTS[i] for i in picks]})

    def answer(self, sut, call):
        return sut.stage.route(list(call.args["prompts"]))

    def problem(self, answer, call):
        return check_routing(answer, len(call.args["prompts"]), self.table.classes)

    def rows(self, answer, call):
        return {"class": torch.tensor([CLASSES.index(c) for c in answer.classes]), "confidence": answer.confidence}


class FusionKind(Kind):
    per_token = ("encoder", "decoder")

    def need(self, sut, case):
        return sut.stage.requirements(_routing(case, self.table), self.table, L)

    def call_for(self, sut, case):
        return Call(_tokens(case, self.need(sut, case)), {"routing": _routing(case, self.table)})

    def answer(self, sut, call):
        return sut.stage.fuse(call.tokens, call.args["routing"], self.table)

    def problem(self, answer, call):
        B, M = call.tokens.shape
        problem = check_fused(answer, B, M)
        if problem is None and (answer.encoder.dtype, answer.decoder.dtype) != (call.tokens.dtype,) * 2:
            problem = f"returned features in {answer.encoder.dtype}/{answer.decoder.dtype}; expected the input dtype {call.tokens.dtype}"
        return problem

    def rows(self, answer, call):
        v = call.tokens.valid().unsqueeze(-1)
        out = {"encoder": answer.encoder.float() * v, "decoder": answer.decoder.float() * v}
        if answer.alpha is not None:
            out["alpha"] = answer.alpha
        return out


class ScoringKind(Kind):
    per_token = ("phi",)

    def need(self, sut, case):
        return sut.stage.requirements(L) | Requirements(layers=frozenset({L - 1}))

    def call_for(self, sut, case):
        tokens = _tokens(case, self.need(sut, case))
        return Call(tokens, {"fused": _base_fused(tokens)})

    def answer(self, sut, call):
        return sut.stage.score(call.tokens, call.args["fused"])

    def problem(self, answer, call):
        valid = call.tokens.valid()
        return check_scores(answer, valid) or non_finite_scores(answer, valid)

    def rows(self, answer, call):
        return {"phi": answer.masked_fill(~call.tokens.valid(), 0.0)}


class SelectionKind(Kind):
    per_token = ("scores", "mask")

    def call_for(self, sut, case):
        tokens = _tokens(case)
        g = case.generator(3)
        valid = tokens.valid()
        scores = torch.rand(valid.shape, generator=g).to(valid.device)  # (B, M) float32
        return Call(tokens, {"scores": scores, "k1": _counts_up_to(valid.sum(1), g), "fused": _base_fused(tokens)})

    def answer(self, sut, call):
        a = call.args
        return sut.stage.select(a["scores"], a["k1"], call.tokens.valid(), a["fused"])

    def problem(self, answer, call):
        return check_mask(answer, call.args["k1"], call.tokens.valid())

    def rows(self, answer, call):
        return {"mask": answer}


class CompletionKind(Kind):
    per_token = ("scores", "pivots", "mask", "features")

    def need(self, sut, case):
        return sut.stage.requirements(L) | Requirements(layers=frozenset({L - 1}))

    def call_for(self, sut, case):
        tokens = _tokens(case, self.need(sut, case))
        g = case.generator(4)
        valid = tokens.valid()
        scores = torch.rand(valid.shape, generator=g).to(valid.device)
        fixed = sut.stage.fixed_budget(tokens)
        if fixed is not None:  # the stage decides the count: no pivots, its own k2
            pivots, k2 = torch.zeros_like(valid), fixed.to(valid.device)
        else:
            pivots = _subset(valid, g, 0.3)
            k2 = _counts_up_to((valid & ~pivots).sum(1), g)
        return Call(tokens, {"scores": scores, "pivots": pivots, "k2": k2, "fused": _base_fused(tokens)})

    def for_permutation(self, call):
        """At least one pivot per row: without pivots a stage may seed from token order (CLASP's
        spread seeding, DivPrune's first pick) or meet exact ties, both legitimately order-bound."""
        a, valid = call.args, call.tokens.valid()
        first = ops.topk_mask(a["scores"], torch.ones_like(a["k2"]), valid)  # (B, M) one real token per row
        pivots = a["pivots"] | first
        k2 = torch.minimum(a["k2"], (valid & ~pivots).sum(1))
        return Call(call.tokens, {**a, "pivots": pivots, "k2": k2})

    def request(self, call: Call) -> CompletionRequest:
        a = call.args
        return CompletionRequest(a["scores"], a["pivots"], a["k2"], call.tokens.valid(), call.tokens, a["fused"])

    def answer(self, sut, call):
        return sut.stage.complete(self.request(call))

    def problem(self, answer, call):
        req = self.request(call)
        problem = check_mask(answer.mask, req.k2, req.pool)
        f = answer.features
        if problem is None and f is not None:
            D = req.fused.decoder.shape[-1]
            if f.shape != (*req.valid.shape, D) or f.dtype != req.fused.decoder.dtype:
                problem = f"returned features {tuple(f.shape)} {f.dtype}; expected {(*req.valid.shape, D)} {req.fused.decoder.dtype}"
            elif (found := non_finite_scores(f.float().sum(-1), answer.mask)) is not None:
                problem = "returned non-finite merged features on kept tokens: " + found.removeprefix("gave ")
        return problem

    def rows(self, answer, call):
        out = {"mask": answer.mask}
        if answer.features is not None:
            out["features"] = torch.where(answer.mask.unsqueeze(-1), answer.features.float(), 0.0)  # rows not kept: any
        return out


class BudgetPolicyKind(Kind):
    def call_for(self, sut, case):
        return Call(_tokens(case), {"routing": _routing(case, self.table)})

    def answer(self, sut, call):
        return sut.stage.pivot_ratio(call.args["routing"], self.table)

    def problem(self, answer, call):
        return check_pivot_ratio(answer, call.tokens.shape[0])

    def rows(self, answer, call):
        return {"ratio": answer}


class LlmKind(Kind):
    per_token = ("hidden", "valid", "attention", "key_norms", "index", "mask")

    def call_for(self, sut, case):
        tokens = _tokens(case)
        g = case.generator(5)
        valid = tokens.valid()
        dev, dt = valid.device, case.dtype
        N, M, T, D = case.B, case.M, 3, 8
        req = dict(
            hidden=torch.randn(N, M, D, generator=g).to(dev, dt), valid=valid,
            keep=_counts_up_to(valid.sum(1), g), attention=torch.rand(N, M, generator=g).to(dev),
            key_norms=torch.rand(N, M, generator=g).to(dev), text_hidden=torch.randn(N, T, D, generator=g).to(dev, dt),
            text_valid=torch.ones(N, T, dtype=torch.bool, device=dev), text_key_norms=torch.rand(N, T, generator=g).to(dev),
            index=(torch.arange(M, device=dev) + 5).expand(N, M).contiguous(),
            text_index=(torch.arange(T, device=dev) + 5 + M).expand(N, T).contiguous(),
        )
        return Call(tokens, req)

    def request(self, call: Call) -> LlmRequest:
        return LlmRequest(layer=2, step=0, norm=lambda h: h, **call.args)

    def answer(self, sut, call):
        return sut.stage.select(self.request(call))

    def problem(self, answer, call):
        return check_mask(answer, call.args["keep"], call.args["valid"])

    def rows(self, answer, call):
        return {"mask": answer}


KIND_CALLS: dict[str, Kind] = {
    "router": RouterKind(), "fusion": FusionKind(), "scoring": ScoringKind(), "selection": SelectionKind(),
    "completion": CompletionKind(), "budget_policy": BudgetPolicyKind(), "llm": LlmKind(),
}


# -- slicing a call ---------------------------------------------------------------------------------
def _slice(value: Any, pick: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return pick(value)
    if isinstance(value, Routing):
        idx = pick(torch.arange(len(value.classes)).unsqueeze(-1)).flatten().tolist()
        return Routing(tuple(value.classes[i] for i in idx), value.confidence[idx])
    if isinstance(value, Fused):
        return dataclasses.replace(value, encoder=pick(value.encoder), decoder=pick(value.decoder),
                                   alpha=None if value.alpha is None else pick(value.alpha))
    if isinstance(value, list):
        idx = pick(torch.arange(len(value)).unsqueeze(-1)).flatten().tolist()
        return [value[i] for i in idx]
    return value


def _row_call(call: Call, b: int) -> Call:
    return Call(row(call.tokens, b), {k: _slice(v, lambda t: t[b : b + 1]) for k, v in call.args.items()})


def _permuted_call(call: Call, perm: Tensor, kind: Kind) -> Call:
    p = perm.to(call.tokens.device)

    def along_tokens(t: Tensor) -> Tensor:
        return t[:, p] if t.dim() >= 2 and t.shape[1] == len(p) else t

    args = {k: (_slice(v, along_tokens) if k in kind.per_token or isinstance(v, Fused) else v)
            for k, v in call.args.items()}
    return Call(permute(call.tokens, perm), args)


def _tensors(call: Call) -> list[Tensor]:
    """Every tensor a call hands the stage (for the untouched check)."""
    t = call.tokens
    out = list(t.layers.values()) + list(t.cls_attention.values()) + list(t.received_attention.values())
    out += list(t.attention_keys.values()) + list(t.cls_token.values())
    out += [x for x in (t.mask, t.positions, t.text_embedding, t.sample_keys) if x is not None]
    for v in call.args.values():
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, Fused):
            out += [v.encoder, v.decoder]
        elif isinstance(v, Routing):
            out.append(v.confidence)
    return out


# -- the properties ---------------------------------------------------------------------------------
def _fail(sut: StageUnderTest, prop: str, case: Case, problem: str) -> None:
    raise ConformanceError(f"the {sut.label} fails '{prop}': {problem} "
                           f"[B={case.B}, M={case.M} ({case.h}x{case.w}), real tokens {list(case.valid_counts)}, "
                           f"{case.dtype}, {case.device}, seed {case.seed}]")


def _same(a: dict[str, Tensor], b: dict[str, Tensor], exact: bool) -> str | None:
    if a.keys() != b.keys():
        return f"answers differ in kind: {sorted(a)} vs {sorted(b)}"
    for key in a:
        x, y = a[key].cpu(), b[key].cpu()
        if x.shape != y.shape:
            return f"'{key}' has shape {tuple(x.shape)} vs {tuple(y.shape)}"
        same = torch.equal(x, y) if exact or not x.dtype.is_floating_point else \
            torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-3)
        if not same:
            return f"'{key}' differs"
    return None


def _contract(sut, kind, case):
    call = kind.call_for(sut, case)
    problem = kind.problem(kind.answer(sut, call), call)
    if problem is not None:
        _fail(sut, "contract", case, problem)


def _requirements(sut, kind, case):
    call = kind.call_for(sut, case)  # the batch carries only what the stage declared
    try:
        kind.answer(sut, call)
    except KeyError as exc:
        _fail(sut, "requirements", case, f"it read a signal it did not declare in requirements(): {exc.args[0]}")


def _untouched(sut, kind, case):
    call = kind.call_for(sut, case)
    before = [t.clone() for t in _tensors(call)]
    kind.answer(sut, call)
    for old, new in zip(before, _tensors(call), strict=True):
        if not torch.equal(old, new):
            _fail(sut, "untouched", case, f"it modified an input tensor of shape {tuple(new.shape)}")


def _deterministic(sut, kind, case):
    call = kind.call_for(sut, case)
    first, second = (kind.rows(kind.answer(sut, call), call) for _ in range(2))
    if (problem := _same(first, second, exact=True)) is not None:
        _fail(sut, "deterministic", case, f"two calls on the same batch disagree: {problem}")


def _batch_independent(sut, kind, case):
    call = kind.call_for(sut, case)
    whole = kind.rows(kind.answer(sut, call), call)
    for b in range(case.B):
        one = _row_call(call, b)
        alone = kind.rows(kind.answer(sut, one), one)
        if (problem := _same({k: v[b : b + 1] for k, v in whole.items()}, alone, exact=False)) is not None:
            _fail(sut, "batch-independent", case, f"row {b} of the batch differs from sample {b} alone: {problem}")


def _permutation(sut, kind, case):
    call = kind.for_permutation(kind.call_for(sut, case))
    perm = torch.randperm(case.M, generator=case.generator(6))
    base = kind.rows(kind.answer(sut, call), call)
    moved_call = _permuted_call(call, perm, kind)
    moved = kind.rows(kind.answer(sut, moved_call), moved_call)
    expected = {k: (v[:, perm.to(v.device)] if k in kind.per_token else v) for k, v in base.items()}
    if (problem := _same(expected, moved, exact=False)) is not None:
        _fail(sut, "permutation", case, f"permuting the tokens does not permute the answer: {problem} "
                                        "(set permutation_invariant = False if the stage reads token order)")


def _schedule(sut, kind, case):
    deep = list(sut.stage.schedule(64))
    for depth in range(2, 40):
        steps = list(sut.stage.schedule(depth))
        problem = check_schedule(steps, depth)
        if problem is not None:
            if steps == deep and "set [llm] layer" in problem:
                continue  # fixed layer parameters a shallow LLM cannot hold: the adapter refuses them clearly
            _fail(sut, "schedule", case, f"the {sut.label} {problem}")
        total = torch.tensor(list(case.valid_counts))
        budget = _counts_up_to(total, case.generator(7)).clamp_min(1).minimum(total)
        counts = sut.stage.keep_counts(total, budget, len(steps))
        if len(counts) != len(steps) or not torch.equal(counts[-1], budget):
            _fail(sut, "schedule", case, f"keep_counts gave {[c.tolist() for c in counts]} for {len(steps)} steps; "
                                         f"the last must equal the budget {budget.tolist()}")
        prev = total
        for c in counts:
            if bool((c > prev).any()) or bool((c < budget).any()):
                _fail(sut, "schedule", case, f"keep_counts {[x.tolist() for x in counts]} grow or fall below the "
                                             f"budget {budget.tolist()} (entering with {total.tolist()})")
            prev = c


PROPERTIES: dict[str, Callable[[StageUnderTest, Kind, Case], None]] = {
    "contract": _contract,
    "requirements": _requirements,
    "untouched": _untouched,
    "deterministic": _deterministic,
    "batch-independent": _batch_independent,
    "permutation": _permutation,
    "schedule": _schedule,
}


def properties(sut: StageUnderTest) -> list[str]:
    """The properties that apply to this stage."""
    names = ["contract", "untouched", "deterministic", "batch-independent"]
    if sut.kind in ("fusion", "scoring", "completion"):
        names.append("requirements")
    if sut.stage.permutation_invariant and sut.kind not in ("router", "budget_policy"):
        names.append("permutation")
    if sut.kind == "llm":
        names.append("schedule")
    return names


def run(sut: StageUnderTest, prop: str, device: str = "cpu", max_examples: int = 25) -> None:
    """Run one property on random cases; raises :class:`ConformanceError` naming the stage."""
    check, kind = PROPERTIES[prop], KIND_CALLS[sut.kind]
    dtypes = (torch.float64,) if prop == "permutation" else tuple(DTYPES)

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None)
    @given(case=cases(device, dtypes))
    def examples(case: Case) -> None:
        check(sut, kind, case)

    try:
        examples()
    except Flaky as exc:  # failed, then passed when hypothesis replayed the case
        first = next((e for e in getattr(exc, "exceptions", ()) if isinstance(e, ConformanceError)), exc)
        raise ConformanceError(f"{first} -- and the same case passed when replayed: the stage's answer depends on "
                               "something besides its inputs (an unseeded random draw, global state)") from exc


class StageConformance:
    """Subclass in a test module to run the kit on a stage::

        from tokenprune.testing import StageConformance

        class TestGreedy(StageConformance):
            stage = "completion:greedy"          # or "greedy" when the name is unique
            params = {"steps": 3}                # optional

    Each property becomes a test, on the CPU and on CUDA when present.
    """

    stage: str = ""
    params: Mapping[str, Any] = {}
    max_examples: int = 25

    def test_conformance(self, conformance_case: tuple[StageUnderTest, str, str],
                         tokenprune_examples: int | None) -> None:
        sut, prop, device = conformance_case
        run(sut, prop, device, tokenprune_examples or self.max_examples)
