"""The adapter conformance kit: every built-in family passes it, a third-party InternVL family
written from docs/adapters.md with public names only passes it, and one deliberately broken
adapter per property fails it naming the family and the property."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import DEVICES
from helpers import install_page_block, page_block
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokenprune as tp
from tokenprune.adapters import LlavaAdapter
from tokenprune.testing import ADAPTER_PROPERTIES, AdapterConformance, FamilyCase, TinyFamily, run_property
from tokenprune.testing.tiny import FAMILIES

IMG, PAD, BOS = 5, 0, 1


@pytest.mark.parametrize("prop", list(ADAPTER_PROPERTIES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_builtin_family_passes_the_kit(family, prop):
    run_property(TinyFamily(family), prop, DEVICES[-1])


# -- a family that is not built in, from the page ------------------------------------------------------
class TinyInternVL(FamilyCase):
    """A tiny InternVL: a 4-layer ViT with a [CLS], 56-px images of 4x4 patches pixel-shuffled into
    4 LLM tokens, a 2-layer Qwen2 LLM; prompts of different lengths, one image each."""

    family = "internvl"

    def model(self, device):
        import transformers as tf

        torch.manual_seed(0)
        text = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2)
        vision = tf.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, image_size=[56, 56], patch_size=[14, 14])
        cfg = tf.InternVLConfig(vision_config=vision, text_config=tf.Qwen2Config(**text), image_token_id=IMG,
                                downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
        return tf.InternVLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval().to(device)

    def samples(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        return [([BOS] + torch.randint(10, 200, (2 + i,), generator=g).tolist(),
                 torch.randint(10, 200, (1 + i % 2,), generator=g).tolist(), 10 * seed + i) for i in range(n)]

    def inputs(self, model, samples):
        rows = [before + [IMG] * 4 + after for before, after, _ in samples]
        S = max(map(len, rows))
        ids = torch.tensor([[PAD] * (S - len(r)) + r for r in rows])
        pixels = torch.stack([torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(k)) for *_, k in samples])
        device = next(model.parameters()).device
        return dict(input_ids=ids.to(device), attention_mask=(ids != PAD).long().to(device),
                    pixel_values=pixels.to(device))


def _internvl_block() -> str:
    return page_block("docs/adapters.md", "# internvl_family.py")


@pytest.fixture
def internvl(site, monkeypatch):
    return install_page_block(site, monkeypatch, _internvl_block(), "tp-thirdparty-internvl", "tp_thirdparty_internvl",
                              "internvl_family")


def test_the_page_uses_public_names_only():
    """The InternVL example imports nothing private and calls no private method of tokenprune."""
    code = _internvl_block()
    assert not re.search(r"from tokenprune\S* import [^\n]*\b_", code)
    assert not re.search(r"self\._[a-z]", code)


@pytest.mark.parametrize("prop", list(ADAPTER_PROPERTIES))
def test_an_internvl_family_from_the_page_passes_the_kit(internvl, prop):
    info = internvl.adapters["InternVLForConditionalGeneration"]
    assert (info.distribution, info.cls.family) == ("tp-thirdparty-internvl", "internvl")
    run_property(TinyInternVL(), prop, DEVICES[-1])


def test_the_internvl_family_runs_clasp_on_its_cls_attention(internvl):
    case = TinyInternVL()
    model = case.model("cpu")
    inputs = case.inputs(model, case.samples(2, 0))
    with torch.no_grad(), tp.apply(model, "clasp", budget=2, tokenizer=None) as h:
        model(**inputs, tokenprune_prompts=["How many cats?", "What does the sign say?"])
    assert h.last.kept.tolist() == [2, 2] and h.last.total.tolist() == [4, 4]


# -- one broken adapter per property --------------------------------------------------------------------
class _Scaled(LlavaAdapter):
    family = "broken-features"

    def encoder_output(self, features, deepstack, modality="image"):
        return BaseModelOutputWithPooling(pooler_output=[features * 1.01])


class _Recounted(LlavaAdapter):
    family = "broken-positions"

    def pruned_positions(self, pos, src, valid, entry):
        return (valid.long().cumsum(1) - 1).clamp_min(0)  # the kept columns renumbered, not kept at their own


class _BatchDependent(LlavaAdapter):
    family = "broken-batch"

    def encode(self, inputs, need, recorder):
        enc = super().encode(inputs, need, recorder)
        others = {li: 1 + h.mean(0, keepdim=True).norm(dim=-1, keepdim=True) for li, h in enc.tokens.layers.items()}
        layers = {li: h * others[li].flip(1) for li, h in enc.tokens.layers.items()}  # (N, M, Dv): reads the batch
        return dataclasses.replace(enc, tokens=dataclasses.replace(enc.tokens, layers=layers))


class _Hooked(LlavaAdapter):
    family = "broken-restore"

    def encode(self, inputs, need, recorder):
        self.tower.register_forward_hook(lambda *args: None)  # never removed
        return super().encode(inputs, need, recorder)


class _Eager(LlavaAdapter):
    family = "broken-sdpa"

    def encode(self, inputs, need, recorder):
        self.model.config.text_config._attn_implementation = "eager"
        return super().encode(inputs, need, recorder)


@pytest.mark.parametrize("prop, broken", [("full-budget", _Scaled), ("kept-forward", _Recounted),
                                          ("batched-solo", _BatchDependent), ("restored", _Hooked),
                                          ("sdpa", _Eager)])
def test_a_broken_adapter_fails_its_property_naming_the_family(prop, broken, monkeypatch):
    adapters = tp.get_registry().adapters
    info = adapters["LlavaForConditionalGeneration"]
    monkeypatch.setitem(adapters, "LlavaForConditionalGeneration", dataclasses.replace(info, cls=broken))
    with pytest.raises(AssertionError, match=f"family 'llava' fails {prop}: "):
        run_property(TinyFamily("llava"), prop)
    monkeypatch.setitem(adapters, "LlavaForConditionalGeneration", info)
    run_property(TinyFamily("llava"), prop)  # the same property passes on the real adapter


def test_the_pytest_option_runs_the_kit_on_a_named_family(tmp_path):
    (tmp_path / "test_unrelated.py").write_text("def test_not_collected():\n    assert False\n")
    env = {**os.environ, "CI": ""}
    run = lambda *args: subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],  # noqa: E731
                                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    good = run("--tokenprune-adapter", "llava")
    n = len(ADAPTER_PROPERTIES) * len(DEVICES)
    assert good.returncode == 0 and f"{n} passed" in good.stdout, good.stdout + good.stderr
    unknown = run("--tokenprune-adapter", "lava")
    assert unknown.returncode == 4 and "--tokenprune-adapter lava: no built-in tiny model for family 'lava'" in unknown.stderr


class TestAFamilyAuthorsSuite(AdapterConformance):
    """A family author's suite: the base class gives one test per property and device."""

    case = TinyFamily("llava-next")
