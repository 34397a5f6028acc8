"""The router reads the question, not the wrapper: chat templates, system prompts, harness
instructions and option lists never change the routed class."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenprune_lab.testbed.questions import QA_CLASSES, ask
from tokenprune_lab.testbed.splits import scene

import tokenprune as tp
from tokenprune.prompts import extract_question

#: Chat templates as the families render one user turn with one image (the image placeholder as
#: the processor writes it); "-skipped" forms are what a tokenizer decodes with special tokens off.
TEMPLATES = {
    "llava-1.5 (llava-hf)": "USER: <image>\n{q} ASSISTANT:",
    "llava-1.5 (vicuna_v1 system)": "A chat between a curious human and an artificial intelligence assistant. The "
                                    "assistant gives helpful, detailed, and polite answers to the human's questions. "
                                    "USER: <image>\n{q} ASSISTANT:",
    "llava-next (mistral)": "[INST] <image>\n{q} [/INST]",
    "llava-next (llama-3)": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\n{q}<|eot_id|>"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llava-onevision": "<|im_start|>user <image>\n{q}<|im_end|>\n<|im_start|>assistant\n",
    "qwen2-vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n",
    "qwen2-vl (special tokens skipped)": "system\nYou are a helpful assistant.\nuser\n{q}\nassistant\n",
    "gemma-style": "<start_of_turn>user\n<image>{q}<end_of_turn>\n<start_of_turn>model\n",
    "### Human": "### Human: <image>\n{q}\n### Assistant:",
    "testbed": "<s>user: <image>\n{q} assistant:",
    "plain": "{q}",
}
#: What evaluation harnesses append (lmms-eval's and LLaVA's post-prompts, MMBench-style options).
SUFFIXES = (
    "",
    "\nAnswer the question using a single word or phrase.",
    "\nPlease answer yes or no.",
    " Please answer yes or no.",
    "\nAnswer with the option's letter from the given choices directly.",
    "\nA. 2\nB. 3\nC. 4\nAnswer with the option's letter from the given choices directly.",
    "\nOptions:\nA. left\nB. right\nPlease select the correct answer from the options above.",
    " (A) yes (B) no",
    "\nGive a short answer.",
    "\nAnswer the question with a single word.",
)
PREFIXES = ("", "Hint: The picture was taken indoors.\nQuestion: ",
            "First please perform reasoning, and think step by step to provide best answer to the following question. ")
#: Real-benchmark-style questions (written for this test) beside the testbed's own.
REAL = (
    "What is written on the sign above the door?", "How many people are sitting at the table?",
    "Is the cat to the left of the laptop?", "What color is the umbrella?", "Is there a dog in the image?",
    "Where was this photo taken?", "Why is the man holding an umbrella?", "What is the total of the two prices?",
    "What word is printed on the mug?", "Which is larger, the plate or the cup?",
)


def _questions() -> list[str]:
    qs = [q.text for i in range(3) for c in QA_CLASSES if (q := ask(scene("test", i), c)) is not None]
    return qs + list(REAL)


@settings(max_examples=150, deadline=None)
@given(q=st.sampled_from(_questions()), template=st.sampled_from(sorted(TEMPLATES)),
       suffix=st.sampled_from(SUFFIXES), prefix=st.sampled_from(PREFIXES))
def test_the_question_comes_out_of_every_template_and_harness_wrapper(q, template, suffix, prefix):
    got = extract_question(TEMPLATES[template].format(q=prefix + q + suffix))
    assert got.text == q


@pytest.mark.parametrize("router", ["keyword", "embedding", "classifier"])
def test_templates_and_harness_suffixes_do_not_change_the_routed_class(router):
    pipe = tp.Pipeline(tp.load_spec("specs/clasp.toml").replace(router={"stage": router}))
    qs = _questions()
    plain = pipe.route(qs).classes
    for template in TEMPLATES.values():
        for suffix in SUFFIXES:
            wrapped = [template.format(q=q + suffix) for q in qs]
            routing = pipe.route(wrapped)
            assert routing.classes == plain, (template, suffix)
            assert routing.questions == tuple(qs)


def test_options_context_and_instructions_are_set_aside_not_lost():
    got = extract_question("Hint: A farm in spring.\nQuestion: Which animal is the largest?\nOptions:\nA. cow\n"
                           "B. hen\nPlease select the correct answer from the options above.")
    assert got.text == "Which animal is the largest?"
    assert got.options == ("cow", "hen") and got.context == ("A farm in spring.",)
    assert got.dropped == ("Please select the correct answer from the options above.",)
    assert extract_question("Which is red? (A) ball (B) box").options == ("ball", "box")


@pytest.mark.parametrize("text", [
    "What word is written on the sign?", "Describe this image in detail.", "Is there a user in the picture?",
    "user manual: which page is open?", "Answer the question using a single word or phrase.",
    "What letter comes after A. in the alphabet shown?", "How many words are on the page?",
])
def test_a_question_that_only_looks_like_a_wrapper_is_kept_whole(text):
    assert extract_question(text).text == text


def test_a_router_may_ask_for_the_whole_prompt():
    from tokenprune_plugins.routers import KeywordRouter

    class Raw(KeywordRouter):
        reads_whole_prompt = True

    spec = tp.load_spec("specs/clasp.toml")
    pipe = tp.Pipeline(spec)
    object.__setattr__(pipe.spec, "router", Raw())
    text = "USER: <image>\nWhat color is it? Answer the question using a single word or phrase. ASSISTANT:"
    assert pipe.route([text]).questions == (text,)


def test_the_adapter_routes_the_question_of_a_harness_prompt_on_a_real_model():
    """Through ``tp.apply`` on the shipped testbed LLaVA: a harness suffix after the question
    leaves the routed class (and so the kept tokens) as they were."""
    from tokenprune_lab.testbed.model import load, prompt

    model, processor = load("v1")
    sc = scene("test", 1)
    qs = [q for c in QA_CLASSES if (q := ask(sc, c)) is not None]
    kept = {}
    for suffix in ("", " Answer the question using a single word or phrase."):
        inputs = processor(images=[sc.image] * len(qs), text=[prompt(q.text + suffix) for q in qs],
                           return_tensors="pt", padding=True)
        with tp.apply(model, "specs/clasp.toml", budget=64, tokenizer=processor) as handle, torch.inference_mode():
            model(**inputs)
        kept[suffix] = (handle.last.classes, handle.last.selection.indices.tolist())
    assert kept[""] == kept[" Answer the question using a single word or phrase."]
    assert kept[""][0] == tp.Pipeline.from_file("specs/clasp.toml").route([q.text for q in qs]).classes


def test_route_command_prints_class_question_and_why(capsys):
    from tokenprune.cli import main

    prompt = "USER: <image>\nWhat word is on the sign? Answer the question using a single word or phrase. ASSISTANT:"
    assert main(["route", "--router", "keyword", "--explain", prompt]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "ocr" and out[0].endswith("What word is on the sign?")
    assert "set aside: ['Answer the question using a single word or phrase.']" in out[1]
    assert any("ocr: 2 rule(s) match" in line for line in out)
    assert main(["route", "--explain", prompt]) == 0  # the default router: the classifier
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "ocr" and any(line.strip().startswith("cues that match") and "text" in line for line in out)
    assert any("nearest ocr question of the development set" in line for line in out)
    assert main(["route", "--router", "embedding", "--explain", "Is there a dog in the picture?"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("existence") and "nearest existence exemplar" in out.out and out.err == ""
