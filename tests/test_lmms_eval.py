"""tokenprune as an lmms-eval model: lmms-eval's own CLI and evaluator, on a local task written from
testbed scenes, score what ``tokenprune eval`` scores on the same questions, in one process and in
two (torchrun, gloo on the CPU); the model's batching, refusals and log-likelihoods by hand."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image
from tokenprune_lab.lmms.model import PrunedTokenCounts, TokenPrune
from tokenprune_lab.lmms.task import write_task
from tokenprune_lab.testbed.evaluate import Variant, evaluate
from tokenprune_lab.testbed.model import load, prompt
from tokenprune_lab.testbed.splits import examples, scene

import tokenprune as tp
from tokenprune.adapters.base import UnsupportedInput
from tokenprune.spec import load_spec, spec_file

SCENES = 2
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("task"), "test", SCENES).parent


@pytest.fixture(scope="module")
def report() -> dict:
    """``tokenprune eval --scenes 2 --budgets 64`` (CLASP and the unpruned model), in process."""
    model, processor = load()
    return evaluate(model, processor, [Variant("clasp", load_spec(spec_file("clasp")))], [64], "test",
                    scenes=SCENES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lmms_eval_command(task_dir: Path, out: Path, model_args: str, processes: int = 1) -> list[str]:
    """lmms-eval's CLI on the local task (under torchrun with ``processes`` > 1)."""
    args = ["--model", "tokenprune", "--model_args", model_args, "--tasks", "tokenprune_testbed",
            "--include_path", str(task_dir), "--batch_size", "4", "--log_samples", "--output_path", str(out)]
    if processes == 1:
        return [str(BIN / "lmms-eval"), *args]
    return [str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--master_port", str(_free_port()),
            "-m", "lmms_eval", *args]


def run_lmms_eval(commands: dict[str, list[str]], root: Path) -> dict[str, tuple[dict, dict, Path]]:
    """Run the commands side by side (one CPU thread each); per name ``(results, samples by doc_id,
    output folder)``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf"),
           "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in commands.items()}
    out = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}: {log[-4000:]}"
        folder = root / name
        (results,) = folder.glob("*/*_results.json")
        (samples,) = folder.glob("*/*_samples_tokenprune_testbed.jsonl")
        by_doc = {s["doc_id"]: s for s in map(json.loads, samples.read_text().splitlines())}
        out[name] = (json.loads(results.read_text()), by_doc, folder)
    return out


@pytest.fixture(scope="module")
def runs(task_dir, tmp_path_factory) -> dict:
    """The lmms-eval runs, once each: unpruned and CLASP at 64 in one process (side by side), then
    CLASP at 64 in two processes."""
    root = tmp_path_factory.mktemp("lmms")
    single = run_lmms_eval({f"{spec}-1": lmms_eval_command(task_dir, root / f"{spec}-1",
                                                           f"pretrained=testbed,spec={spec},budget=64")
                            for spec in ("none", "clasp")}, root)
    double = run_lmms_eval({"clasp-2": lmms_eval_command(task_dir, root / "clasp-2",
                                                         "pretrained=testbed,spec=clasp,budget=64", 2)}, root)
    return {(name.split("-")[0], int(name.split("-")[1])): run for name, run in {**single, **double}.items()}


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    assert get_model("tokenprune") is TokenPrune


def test_task_questions_and_prompts_are_tokenprune_evals(task_dir):
    exs = examples("test", SCENES)
    docs = [json.loads(x) for x in (task_dir / "questions.jsonl").read_text().splitlines()]
    assert [(d["scene"], d["question"], d["answer"]) for d in docs] == \
        [(e.index, e.question.text, e.question.answer) for e in exs]
    _, processor = load()
    chat = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": docs[0]["question"]}]}],
                                         add_generation_prompt=True, tokenize=False)
    assert chat == prompt(docs[0]["question"])
    with Image.open(task_dir / docs[0]["image"]) as im:
        assert im.convert("RGB").tobytes() == scene("test", docs[0]["scene"]).image.convert("RGB").tobytes()


@pytest.mark.parametrize("spec", ["none", "clasp"])
def test_lmms_eval_scores_equal_tokenprune_eval(spec, runs, report):
    results, samples, _ = runs[(spec, 1)]
    ours = report["unpruned"] if spec == "none" else report["runs"][0]
    tok = load()[1].tokenizer
    assert [samples[i]["accuracy"] == 1.0 for i in range(len(samples))] == ours["correct"]
    assert [samples[i]["filtered_resps"] for i in range(len(samples))] == tok.convert_ids_to_tokens(ours["predictions"])
    accuracy = results["results"]["tokenprune_testbed"]["accuracy,none"]
    assert accuracy == pytest.approx(sum(ours["correct"]) / len(ours["correct"]), abs=1e-12)
    assert round(accuracy, 4) == ours["accuracy"]["overall"]
    counts = [samples[i]["token_counts"][0] for i in range(len(samples))]
    if spec == "clasp":
        assert all(c["visual_tokens"] == [576] and c["visual_tokens_kept"] == [64] and c["spec"] == "clasp"
                   for c in counts)
        assert {c["routed_class"] for c in counts} <= set(tp.CLASSES)
    else:
        assert all("visual_tokens_kept" not in c for c in counts)
    assert all(c["output_tokens"] == 1 for c in counts)


def test_data_parallel_equals_one_process(runs):
    (one, one_samples, _), (two, two_samples, _) = runs[("clasp", 1)], runs[("clasp", 2)]
    keep = ("filtered_resps", "accuracy", "token_counts")
    assert {i: [s[k] for k in keep] for i, s in two_samples.items()} == \
        {i: [s[k] for k in keep] for i, s in one_samples.items()}
    # the score itself; its standard error's last digit follows the order of the summation
    assert two["results"]["tokenprune_testbed"]["accuracy,none"] == one["results"]["tokenprune_testbed"]["accuracy,none"]
    assert two["n-samples"] == one["n-samples"]


def test_the_table_pairs_each_run_with_the_unpruned_one(runs, report):
    from tokenprune_lab.lmms.table import collect, markdown
    from tokenprune_lab.testbed.stats import mcnemar

    table = markdown(collect([runs[("none", 1)][2], runs[("clasp", 1)][2]])).splitlines()
    assert table[0].startswith("| run | model | spec | budget | tokenprune_testbed accuracy | rel. |")
    unpruned, clasp = report["unpruned"], report["runs"][0]
    acc = [sum(r["correct"]) / len(r["correct"]) for r in (unpruned, clasp)]
    t = mcnemar(clasp["correct"], unpruned["correct"])
    assert table[2] == f"| none-1 | testbed | none | - | {acc[0]:.4g} | 100.0 % |  |"
    assert table[3] == (f"| clasp-1 | testbed | clasp | 64 | {acc[1]:.4g} | {100 * acc[1] / acc[0]:.1f} % | "
                        f"tokenprune_testbed: {100 * t['delta']:+.1f} (p={t['p']:.3g}) |")


# -- the model by hand -------------------------------------------------------------------------------
def _requests(docs: list[dict], kind: str = "generate_until", gen: dict | None = None) -> list[Instance]:
    second = (gen or {"max_new_tokens": 2, "until": ["\n"]}) if kind == "generate_until" else None
    out = []
    for i, doc in enumerate(docs):
        arg2 = second if kind == "generate_until" else " ".join([doc["answer"]] * (i % 3 + 1))
        out.append(Instance(request_type=kind, idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1},
                            arguments=(doc["question"], arg2, lambda d: d["visuals"], i, "t", "test")))
    return out


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [{"question": e.question.text, "answer": e.question.answer, "visuals": [scene("test", e.index).image]}
            for e in examples("test", 1)[:5]]


@pytest.fixture(scope="module")
def clasp_lm(docs) -> TokenPrune:
    lm = TokenPrune(pretrained="testbed", spec="clasp", budget=64, batch_size=3)
    lm.task_dict = {"t": {"test": docs}}
    return lm


def test_batched_generation_equals_one_at_a_time(clasp_lm, docs):
    reqs = _requests(docs)
    batched = clasp_lm.generate_until(reqs)
    clasp_lm.batch_size_per_gpu = 1
    try:
        single = clasp_lm.generate_until(reqs)
    finally:
        clasp_lm.batch_size_per_gpu = 3
    assert [(r.text, r.token_counts.to_dict()) for r in batched] == [(r.text, r.token_counts.to_dict()) for r in single]
    assert all(isinstance(r.token_counts, PrunedTokenCounts) and r.token_counts.visual_tokens_kept == [64]
               for r in batched)


def test_a_hugging_face_folder_answers_as_the_testbed(clasp_lm, docs, tmp_path):
    """``pretrained=<folder>`` (AutoModelForImageTextToText + AutoProcessor) on the testbed model saved
    the Hugging Face way: the same answers and records as ``pretrained=testbed``."""
    model, processor = load()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    hf = TokenPrune(pretrained=str(tmp_path), spec="clasp", budget=64, batch_size=3)
    hf.task_dict = {"t": {"test": docs}}
    reqs = _requests(docs)
    assert [(r.text, r.token_counts.to_dict()) for r in hf.generate_until(reqs)] == \
        [(r.text, r.token_counts.to_dict()) for r in clasp_lm.generate_until(reqs)]


def test_an_in_llm_spec_records_the_tokens_after_its_last_layer(docs):
    lm = TokenPrune(pretrained="testbed", spec="fastv-matched", budget=64, batch_size=3)
    lm.task_dict = {"t": {"test": docs}}
    counts = [r.token_counts for r in lm.generate_until(_requests(docs))]
    ids = lm.processor(text=[prompt(d["question"]) for d in docs], images=[d["visuals"][0] for d in docs],
                       return_tensors="pt", padding=True)["attention_mask"].sum(1).tolist()
    assert [(c.visual_tokens, c.visual_tokens_kept) for c in counts] == [([576], [64])] * len(docs)
    assert [c.input_tokens for c in counts] == ids  # every token enters the LLM; it prunes inside


def test_batches_never_mix_generation_arguments(clasp_lm, docs):
    reqs = _requests(docs[:3], gen={"max_new_tokens": 1}) + _requests(docs[3:], gen={"max_new_tokens": 2})
    batches = clasp_lm._batches(reqs)
    assert sorted(i for b in batches for i in b) == list(range(len(reqs)))
    assert all(len({json.dumps(reqs[i].args[1], sort_keys=True) for i in b}) == 1 for b in batches)
    assert all(len(b) <= 3 for b in batches)


def test_stop_sequences_cut_the_answer(clasp_lm, docs):
    free = [r.text for r in clasp_lm.generate_until(_requests(docs, gen={"max_new_tokens": 4}))]
    words = [t.split() for t in free]
    assert any(len(set(w)) >= 3 for w in words), free  # the test needs an answer with distinct words
    row = next(i for i, w in enumerate(words) if len(set(w)) >= 3)
    until = [words[row][2], words[row][-1]]
    cut = [r.text for r in clasp_lm.generate_until(_requests(docs, gen={"max_new_tokens": 4, "until": until}))]
    assert cut == [t.split(until[0])[0].split(until[1])[0] for t in free]
    assert cut[row] == " ".join(words[row][:2]) + " "


def test_a_video_input_is_refused_by_name(clasp_lm, docs):
    clasp_lm.task_dict = {"t": {"test": docs[:1] + [{**docs[1], "visuals": ["clip.mp4"]}]}}
    try:
        with pytest.raises(UnsupportedInput, match=r"task 't', doc 1: .*str"):
            clasp_lm.generate_until(_requests(clasp_lm.task_dict["t"]["test"]))
    finally:
        clasp_lm.task_dict = {"t": {"test": docs}}


def test_an_unpruned_image_batch_is_an_error(docs):
    lm = TokenPrune(pretrained="testbed", spec="clasp", budget=64, batch_size=2)
    lm.task_dict = {"t": {"test": docs}}
    lm.handle.remove()  # the model answers unpruned while the lmms-eval model believes it prunes
    with pytest.raises(RuntimeError, match=r"did not prune a batch with 2 images \(task 't', docs \[0, 1\]\)"):
        lm.generate_until(_requests(docs[:2]))


def test_bad_model_args_are_named():
    with pytest.raises(TypeError, match="does not take bugdet; its model_args are pretrained, spec, budget"):
        TokenPrune(pretrained="testbed", bugdet=64)
    with pytest.raises(FileNotFoundError, match="spec file 'clsap' does not exist and no preset has that name; presets: clasp"):
        TokenPrune(pretrained="testbed", spec="clsap")
    with pytest.raises(ValueError, match="fixed --batch_size"):
        TokenPrune(pretrained="testbed", batch_size="auto")


@pytest.mark.parametrize("spec", ["none", "clasp", "dart-llm"])
def test_loglikelihood_equals_a_forward_by_hand(spec, docs):
    """Batched (3 rows of different continuation lengths) equals one forward per request, before the
    LLM (CLASP) and inside it (DART: the logits cover the positions left after its layer)."""
    lm = TokenPrune(pretrained="testbed", spec=spec, budget=64, batch_size=3)
    lm.task_dict = {"t": {"test": docs}}
    reqs = _requests(docs, kind="loglikelihood")
    got = lm.loglikelihood(reqs)
    lm.handle and lm.handle.remove()
    model, processor = load()
    want = []
    for doc, req in zip(docs, reqs, strict=True):
        ctx = processor(text=[prompt(doc["question"])], images=doc["visuals"], return_tensors="pt")
        full = processor(text=[prompt(doc["question"]) + req.args[1]], images=doc["visuals"], return_tensors="pt")
        n = full["input_ids"].shape[1] - ctx["input_ids"].shape[1]
        assert n == req.args[3] % 3 + 1
        use = tp.apply(model, spec_file(spec), budget=64, tokenizer=processor.tokenizer) if spec != "none" else None
        with torch.inference_mode():
            logits = model(**full).logits[0]
        if use is not None:
            use.remove()
        logp = torch.log_softmax(logits[-n - 1:-1].float(), -1)
        target = full["input_ids"][0, -n:]
        want.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
