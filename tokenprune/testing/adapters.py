"""The adapter conformance kit: what every model family must keep, checked on a tiny model of it.

A family author describes how to make a tiny model of the family and batches for it (a
:class:`FamilyCase`), then runs the properties on it::

    pytest --tokenprune-adapter llava                       # a built-in family by name
    pytest --tokenprune-adapter my_family.testing:TinyMine  # a FamilyCase of your own (module:Class)

or, in the family's own suite::

    from tokenprune.testing import AdapterConformance

    class TestMine(AdapterConformance):
        case = TinyMine()

The properties (:data:`ADAPTER_PROPERTIES`), each run on the CPU and on CUDA when present:

- ``full-budget``: at a full budget with identity stages, the pruned call's logits equal the
  unpruned model's at every kept position, and ``generate`` gives the same tokens;
- ``kept-forward``: a pruned call's logits equal a forward of the language model built by hand from
  the unpruned call's own decoder inputs at the kept columns only, at their original positions;
- ``batched-solo``: a left-padded batch with ragged per-item budgets gives each prompt the logits
  it gets alone;
- ``restored``: after ``remove()`` the model is bit-identical (parameters, buffers, attributes,
  hooks, attention kernels) and answers exactly as before;
- ``sdpa``: no configuration's attention implementation changes, before, during or after a call.

A failure is an ``AssertionError`` that names the family and the property.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ADAPTER_PROPERTIES", "AdapterConformance", "FamilyCase", "TinyFamily", "family_case", "run_property"]


class FamilyCase:
    """How the kit makes a tiny model of one family and batches for it; subclass it.

    Attributes:
        family: the name failures use.
    """

    family: str = ""

    def model(self, device: str) -> Any:
        """A tiny ``*ForConditionalGeneration`` of the family in eval mode, float32, SDPA
        attention, on ``device`` (random weights built from a config: nothing is downloaded)."""
        raise NotImplementedError

    def samples(self, n: int, seed: int) -> list[Any]:
        """``n`` prompts, each with at least one visual item, of different lengths (so a batch of
        them is left-padded); whatever :meth:`inputs` reads."""
        raise NotImplementedError

    def inputs(self, model: nn.Module, samples: Sequence[Any]) -> dict[str, Tensor]:
        """Processor-like inputs for ``samples`` (a left-padded batch), on the model's device."""
        raise NotImplementedError

    def alone(self, model: nn.Module, inputs: dict[str, Tensor], samples: Sequence[Any], b: int) -> dict[str, Tensor]:
        """Prompt ``b`` of the batch ``inputs`` (made from ``samples``) as a batch of its own,
        unpadded. The default makes it from ``samples[b]``, which is right when a sample's pixels do
        not depend on the batch it is in; override it to slice ``inputs`` instead."""
        return self.inputs(model, [samples[b]])


class TinyFamily(FamilyCase):
    """A built-in family's tiny model (:mod:`tokenprune.testing.tiny`)."""

    def __init__(self, family: str):
        from .tiny import FAMILIES

        if family not in FAMILIES:
            raise LookupError(f"no built-in tiny model for family {family!r}; built in: {', '.join(FAMILIES)}")
        self.family = family

    def model(self, device: str) -> Any:
        from .tiny import build

        return build(self.family).to(device)

    def samples(self, n: int, seed: int) -> list[Any]:
        from .tiny import samples

        return samples(self.family, n, seed)

    def inputs(self, model: nn.Module, samples: Sequence[Any]) -> dict[str, Tensor]:
        from .tiny import batch

        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in batch(model, self.family, list(samples)).items()}

    def alone(self, model: nn.Module, inputs: dict[str, Tensor], samples: Sequence[Any], b: int) -> dict[str, Tensor]:
        from .tiny import rows_of

        return rows_of(inputs, b, self.family, [len(s.sizes) for s in samples])


def family_case(word: str) -> FamilyCase:
    """The case ``--tokenprune-adapter`` names: a built-in family, or ``module:Class`` of a
    :class:`FamilyCase` subclass."""
    if ":" not in word:
        return TinyFamily(word)
    module, _, name = word.partition(":")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, FamilyCase)):
        raise LookupError(f"{word} is not a tokenprune.testing.FamilyCase subclass")
    return cls()


# -- the specs the properties run ----------------------------------------------------------------------
def _identity(budget: Any = None):
    """Stages that keep the model's own features and pick by feature norm (no attention needed,
    so every family runs them): at a full budget they keep every token."""
    from ..spec import load_spec

    return load_spec("clasp").replace(
        router={"stage": "fixed"}, fusion={"stage": "single-layer", "layer": -2, "feed": "selection"},
        scoring={"stage": "feature-norm"}, completion={"stage": "none"},
        budget_policy={"stage": "fixed", "ratio": 1.0}, budget=budget)


def _fail(case: FamilyCase, prop: str, what: str) -> AssertionError:
    return AssertionError(f"family {case.family!r} fails {prop}: {what}")


def _logits(model: nn.Module, inputs: dict[str, Tensor], **extra: Any) -> Tensor:
    with torch.no_grad():
        return model(**inputs, **extra).logits


# -- 1. full budget ------------------------------------------------------------------------------------
def full_budget(case: FamilyCase, device: str) -> None:
    import tokenprune as tp

    model = case.model(device)
    inputs = case.inputs(model, case.samples(3, seed=0))
    with torch.no_grad():
        ref = _logits(model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with tp.apply(model, _identity(), budget=1.0) as handle:
            got = _logits(model, inputs)
            got_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    rec = handle.last
    assert rec is not None
    if not torch.equal(rec.kept, rec.total):
        raise _fail(case, "full-budget", f"a full budget kept {rec.kept.tolist()} of {rec.total.tolist()} tokens")
    src = rec.source
    want = ref.gather(1, src.clamp_min(0).unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
    if not torch.equal(want[src >= 0], got[src >= 0]):
        raise _fail(case, "full-budget", "the logits differ from the unpruned model's at a full budget "
                    f"(largest gap {float((want[src >= 0] - got[src >= 0]).abs().max()):.3g})")
    if not torch.equal(gen, got_gen):
        raise _fail(case, "full-budget", "generate's tokens differ from the unpruned model's at a full budget")


# -- 2. the kept tokens equal a forward built from them ------------------------------------------------
def kept_forward(case: FamilyCase, device: str) -> None:
    import tokenprune as tp

    from ..adapters import adapter_for

    model = case.model(device)
    inputs = case.inputs(model, case.samples(3, seed=1))
    decoder = adapter_for(model).language_model()
    seen = _decoder_inputs(model, decoder, inputs)
    with tp.apply(model, _identity(), budget=0.5) as handle:
        got = _logits(model, inputs)
    rec = handle.last
    assert rec is not None
    if bool((rec.kept >= rec.total).all()):
        raise _fail(case, "kept-forward", "a budget of half the tokens kept every token")
    for b in range(inputs["input_ids"].shape[0]):
        want = _hand_built(model, decoder, seen, rec.keep_mask, b)
        mine = got[b][rec.source[b] >= 0]
        if mine.shape != want.shape or not torch.allclose(mine, want, rtol=1e-4, atol=1e-4):
            gap = float((mine - want).abs().max()) if mine.shape == want.shape else float("nan")
            raise _fail(case, "kept-forward", f"prompt {b}'s logits differ from a forward of the language model on "
                        f"its kept columns at their original positions (shapes {tuple(mine.shape)} and "
                        f"{tuple(want.shape)}, largest gap {gap:.3g})")


def _decoder_inputs(model: nn.Module, decoder: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Any]:
    """The keyword arguments the unpruned model passes its language model."""
    seen: dict[str, Any] = {}

    def grab(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen.update(kwargs)

    hook = decoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _logits(model, inputs)
    finally:
        hook.remove()
    return seen


def _hand_built(model: Any, decoder: Any, seen: dict[str, Any], keep: Tensor, b: int) -> Tensor:
    """Prompt ``b``'s logits from the language model run by hand on the unpruned call's decoder
    inputs at the kept columns (``keep`` ``(B, S)``), at their original positions."""
    embeds = seen["inputs_embeds"]  # (B, S, D)
    B, S = embeds.shape[:2]
    cols = keep[b].nonzero().squeeze(1)  # (K,)
    pos = seen.get("position_ids")
    pos = torch.arange(S, device=embeds.device).expand(B, S) if pos is None else pos  # (..., B, S)
    kwargs: dict[str, Any] = {"inputs_embeds": embeds[b, cols][None], "position_ids": pos[..., b, cols][..., None, :],
                              "attention_mask": torch.ones(1, cols.numel(), dtype=torch.long, device=embeds.device)}
    visual = seen.get("visual_pos_masks")
    if visual is not None:  # features added inside the decoder at the visual positions (Qwen3-VL's deepstack)
        rows = keep[visual] & (torch.arange(B, device=keep.device)[:, None].expand(B, S)[visual] == b)
        kwargs["visual_pos_masks"] = visual[b, cols][None]
        kwargs["deepstack_visual_embeds"] = [d[rows] for d in seen["deepstack_visual_embeds"]]
    with torch.no_grad():
        hidden = decoder(**kwargs).last_hidden_state  # (1, K, D)
        return model.lm_head(hidden)[0]


# -- 3. batched equals solo ------------------------------------------------------------------------------
def batched_solo(case: FamilyCase, device: str) -> None:
    import tokenprune as tp

    model = case.model(device)
    samples = case.samples(3, seed=2)
    inputs = case.inputs(model, samples)
    with tp.apply(model, _identity(), budget=1.0) as handle:
        _logits(model, inputs)
        assert handle.last is not None
        owner = handle.last.image_sample.tolist()  # (N,) the prompt of each item
        budgets = [1 + (3 * i) % 5 for i in range(len(owner))]  # ragged, one per item
        got = _logits(model, inputs, tokenprune_budget=budgets)
        source = handle.last.source
        for b in range(len(samples)):
            alone = _logits(model, case.alone(model, inputs, samples, b),
                            tokenprune_budget=[n for n, o in zip(budgets, owner, strict=True) if o == b])[0]
            mine = got[b][source[b] >= 0]
            if mine.shape != alone.shape or not torch.allclose(mine, alone, rtol=1e-4, atol=1e-4):
                raise _fail(case, "batched-solo", f"prompt {b} in a left-padded batch with per-item budgets "
                            f"{budgets} does not get the logits it gets alone")


# -- 4. restored after removal -------------------------------------------------------------------------
#: what transformers itself leaves on a sub-model the first time a call asks it for hidden states
#: (its output-capturing hooks, installed once and kept): not the adapter's doing
_TRANSFORMERS_LAZY = "transformers.utils.output_capturing"


def _own(hooks: dict[int, Any]) -> int:
    """How many of a module's hooks are not transformers' lazily installed output capture."""
    return sum(not getattr(getattr(h, "func", h), "__module__", "").startswith(_TRANSFORMERS_LAZY) for h in hooks.values())


def _state(model: nn.Module) -> dict[str, Any]:
    """What removal must restore: tensors, every module's attributes and hooks, attention kernels."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "attributes": {name: sorted(set(m.__dict__) - {"_output_capturing_hooks_installed"})
                       for name, m in model.named_modules()},
        "hooks": {name: (_own(m._forward_hooks), _own(m._forward_pre_hooks)) for name, m in model.named_modules()},
        "kernels": _kernels(model),
    }


def _kernels(model: nn.Module) -> dict[str, Any]:
    """Each module's config's attention implementation (the object and the name it holds)."""
    return {name: (id(m.config), getattr(m.config, "_attn_implementation", None))
            for name, m in model.named_modules() if getattr(m, "config", None) is not None}


def restored(case: FamilyCase, device: str) -> None:
    import tokenprune as tp

    model = case.model(device)
    inputs = case.inputs(model, case.samples(2, seed=3))
    ref = _logits(model, inputs)
    with torch.no_grad():  # whatever generate itself leaves on a model is there before apply() too
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    before = _state(model)
    with tp.apply(model, _identity(), budget=0.5):
        _logits(model, inputs)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    after = _state(model)
    for part in ("attributes", "hooks", "kernels"):
        changed = sorted(k for k in before[part] if before[part][k] != after[part].get(k))
        if changed:
            raise _fail(case, "restored", f"after remove() the {part} of {changed[:3]} differ from before apply()")
    moved = [k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])]
    if moved:
        raise _fail(case, "restored", f"after remove() the tensors {moved[:3]} differ from before apply()")
    if not torch.equal(ref, _logits(model, inputs)):
        raise _fail(case, "restored", "after remove() the model answers differently than before apply()")


# -- 5. SDPA stays on ----------------------------------------------------------------------------------
def sdpa(case: FamilyCase, device: str) -> None:
    import tokenprune as tp

    from ..adapters import adapter_for

    model = case.model(device)
    inputs = case.inputs(model, case.samples(2, seed=4))
    want = _implementations(model)
    during: list[dict[str, str]] = []
    decoder: Any = adapter_for(model).language_model()
    hook = decoder.register_forward_pre_hook(lambda *_: during.append(_implementations(model)))
    try:
        with tp.apply(model, _identity(), budget=0.5):
            _logits(model, inputs)
    finally:
        hook.remove()
    for when, got in [("during a pruned call", d) for d in during] + [("after remove()", _implementations(model))]:
        changed = {k: (want[k], v) for k, v in got.items() if want.get(k) != v}
        if changed:
            raise _fail(case, "sdpa", f"{when} the attention implementation changed: {changed}")


def _implementations(model: nn.Module) -> dict[str, str]:
    """The attention implementation of the model's config and each of its sub-configs."""
    cfg: Any = model.config
    found = {"config": str(cfg._attn_implementation)}
    for key in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            found[key] = str(sub._attn_implementation)
    return found


#: the properties by name, in the order they run
ADAPTER_PROPERTIES: dict[str, Callable[[FamilyCase, str], None]] = {
    "full-budget": full_budget, "kept-forward": kept_forward, "batched-solo": batched_solo,
    "restored": restored, "sdpa": sdpa,
}


def run_property(case: FamilyCase, prop: str, device: str = "cpu") -> None:
    """Run one property on ``case``; an ``AssertionError`` naming the family says what failed."""
    ADAPTER_PROPERTIES[prop](case, device)


class AdapterConformance:
    """Subclass in a family's own suite and set :attr:`case`: one test per property and device."""

    case: FamilyCase | None = None

    def test_adapter_property(self, adapter_case: tuple[FamilyCase, str, str]) -> None:
        case, prop, device = adapter_case
        run_property(case, prop, device)
