"""A third-party model family, added through ``register_adapters`` from a temporary distribution:
the worked example of docs/adapters.md, installed from the page itself."""

from __future__ import annotations

import pytest
import torch
from helpers import install_page_block, page_block
from tiny_models import BOS, IMG, _clip, _text, left_pad
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokenprune as tp
from tokenprune.adapters import UnsupportedModel
from tokenprune.registry import RegistryError, build_registry


def _worked_example() -> str:
    return page_block("docs/adapters.md", "# pooled_llava.py")


@pytest.fixture
def pooled(site, monkeypatch):
    """The page's module as the distribution tp-thirdparty-pooled, and the registry that sees it."""
    reg = install_page_block(site, monkeypatch, _worked_example(), "tp-thirdparty-pooled", "tp_thirdparty_pooled",
                             "pooled_llava")
    import tp_thirdparty_pooled

    return tp_thirdparty_pooled, reg


def _model(module):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlavaConfig(vision_config=_clip(56), text_config=tf.LlamaConfig(**_text(2)), image_token_id=IMG,
                         vision_feature_layer=-2)
    return module.PooledLlavaForConditionalGeneration(cfg).eval()


def _inputs(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Left-padded prompts, each with one 56-px image (4 pooled placeholders)."""
    ids, mask = left_pad(rows)
    pixels = torch.randn(len(rows), 3, 56, 56, generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


ROWS = [[BOS, 11, 12] + [IMG] * 4 + [13, 14, 15], [BOS, 21] + [IMG] * 4 + [22]]
SPEC = tp.load_spec("specs/clasp.toml").replace(router={"stage": "fixed", "class_name": "counting"})


def test_the_family_is_registered_with_its_distribution(pooled):
    module, reg = pooled
    info = reg.adapters["PooledLlavaForConditionalGeneration"]
    assert info.cls is module.PooledLlavaAdapter and info.distribution == "tp-thirdparty-pooled"
    assert type(tp.adapters.adapter_for(_model(module))) is module.PooledLlavaAdapter
    assert reg.adapters["LlavaForConditionalGeneration"].distribution == "tokenprune"  # the built-ins, same path


def test_a_full_budget_reproduces_the_unpruned_logits(pooled):
    module, _ = pooled
    m = _model(module)
    inp = _inputs(ROWS)
    with torch.no_grad():
        plain = m(**inp).logits[:, -1]
        with tp.apply(m, SPEC, budget=4) as h:
            full = m(**inp).logits[:, -1]
    assert h.last.kept.tolist() == [4, 4] and h.last.total.tolist() == [4, 4]
    torch.testing.assert_close(full, plain, rtol=1e-5, atol=1e-5)


def test_pruned_logits_equal_a_forward_built_by_hand_with_only_the_kept_pooled_tokens(pooled):
    module, _ = pooled
    m = _model(module)
    inp = _inputs(ROWS)
    with torch.no_grad():
        with tp.apply(m, SPEC, budget=2) as h:
            pruned = m(**inp).logits[:, -1]
        own = m.model.get_image_features(pixel_values=inp["pixel_values"], vision_feature_layer=-2,
                                         vision_feature_select_strategy="default").pooler_output
        assert [o.shape[0] for o in own] == [4, 4]
        sel = h.last.selection
        for b, row in enumerate(ROWS):  # one prompt at a time, no padding: positions are 0..len-1
            kept = sel.row(b).tolist()
            assert len(kept) == 2
            img_at = [i for i, t in enumerate(row) if t == IMG]
            cols = [i for i, t in enumerate(row) if t != IMG or img_at.index(i) in kept]
            ids = torch.tensor([[row[i] for i in cols]])
            out = m(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.tensor([cols]),
                    mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[own[b][kept]])})
            torch.testing.assert_close(pruned[b], out.logits[0, -1], rtol=1e-4, atol=1e-4)


def test_without_its_adapter_the_parent_familys_refuses_instead_of_pruning_wrongly(pooled, monkeypatch):
    module, _ = pooled
    m = _model(module)
    builtin = build_registry()
    builtin.adapters.pop("PooledLlavaForConditionalGeneration")
    monkeypatch.setattr("tokenprune.registry.get_registry", lambda: builtin)
    with tp.apply(m, SPEC, budget=2), pytest.raises(UnsupportedModel, match=r"PooledLlavaForConditionalGeneration feeds "
                                                                            r"its LLM 4 features per image, but its tower "
                                                                            r"makes 16 patch tokens.*register an adapter"):
        m(**_inputs(ROWS))


def test_two_adapters_for_one_class_are_refused_naming_both(pooled):
    module, _ = pooled

    class Again:
        @tp.hookimpl
        def register_adapters(self, register):
            register("PooledLlavaForConditionalGeneration", module.PooledLlavaAdapter)

    with pytest.raises(RegistryError, match="PooledLlavaForConditionalGeneration has two adapters: ") as err:
        build_registry(extra_plugins=(("again", Again()),))
    assert "distribution 'tp-thirdparty-pooled'" in str(err.value) and "distribution '<local>'" in str(err.value)

    class NotAnAdapter:
        @tp.hookimpl
        def register_adapters(self, register):
            register("SomethingForConditionalGeneration", dict)

    with pytest.raises(RegistryError, match="not a concrete subclass of tokenprune.adapters.Adapter"):
        build_registry(extra_plugins=(("bad", NotAnAdapter()),))


def test_an_adapter_that_overrides_image_token_id_is_obeyed(monkeypatch):
    """The placeholders are found through ``Adapter.image_token_id`` (the documented override), not
    by reading the config behind the adapter's back."""
    from test_models import IDENTITY
    from tiny_models import batch, build, samples

    m = build("llava")
    inp = batch(m, "llava", samples("llava", 2))
    with torch.no_grad():
        with tp.apply(m, IDENTITY, budget=3) as h:
            m(**inp)
            want = h.last.keep_mask
        monkeypatch.setattr(tp.adapters.LlavaAdapter, "image_token_id", property(lambda self: IMG))
        m.config.image_token_id = 199  # this test's own model: its config no longer names the placeholder
        adapter = tp.adapters.adapter_for(m)
        assert adapter.placeholder_ids == (IMG,)
        _, record = tp.PrunedCall(adapter, tp.Pipeline(IDENTITY), tp.Budget.parse(3), tp.KEEP_ALL).run(inp)
    assert torch.equal(record.keep_mask, want)


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_a_budget_is_parsed_once_and_defaulted_once_per_handle(family, monkeypatch):
    """Follow a budget through ``apply``: the handle parses and defaults it once; each call turns it
    into counts (``PrunedCall.item_budgets``) and hands counts down, so neither parsing nor the
    spec's default runs again below it, however many calls follow. A call's own
    ``tokenprune_budget=`` is parsed once, at that call."""
    from test_models import IDENTITY
    from tiny_models import batch, build, samples

    spec = IDENTITY.replace(budget=3)
    seen = {"parse": 0, "default": 0, "counts": []}
    parse, default, counts = tp.Budget.parse.__func__, tp.PipelineSpec.budget_or_default, tp.Budget.counts

    def counted_parse(cls, value):
        seen["parse"] += 1
        return parse(cls, value)

    def counted_default(self, budget=None):
        seen["default"] += 1
        return default(self, budget)

    def counted_counts(self, valid):
        seen["counts"].append(str(self))
        return counts(self, valid)

    monkeypatch.setattr(tp.Budget, "parse", classmethod(counted_parse))
    monkeypatch.setattr(tp.PipelineSpec, "budget_or_default", counted_default)
    monkeypatch.setattr(tp.Budget, "counts", counted_counts)
    m = build(family)
    inp = batch(m, family, samples(family, 2))
    with torch.no_grad(), tp.apply(m, spec) as h:
        assert (seen["parse"], seen["default"]) == (1, 1)
        m(**inp)
        m(**inp)
        assert h.last.kept.tolist() == [3, 3]
        assert (seen["parse"], seen["default"]) == (1, 1)  # two calls: nothing parsed or defaulted again
        assert seen["counts"] == ["3 tokens per image"] * 2  # one resolution to counts per call
        m(**inp, tokenprune_budget=2)
        assert h.last.kept.tolist() == [2, 2]
        assert (seen["parse"], seen["default"]) == (2, 1)
