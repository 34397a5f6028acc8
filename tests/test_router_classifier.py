"""The classifier router (CLASP's default) and its development set: the shipped head meets the
issue's bar on the held-out part, the fit never reads that part, and bad heads or rows are refused."""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenprune_plugins.router_classifier import CUES, ClassifierRouter, LinearHead, cue_features, shipped_head
from tokenprune_plugins.router_fit import _temperature, fit_head, is_held_out, judge, load_dev_set
from tokenprune_plugins.routers import ROUTED, minilm_dir

import tokenprune as tp

ROWS = load_dev_set()


def test_the_development_set_has_a_few_hundred_questions_of_every_class_and_holds_out_about_30_percent():
    per_class = collections.Counter(r.klass for r in ROWS)
    assert set(per_class) == set(ROUTED) and min(per_class.values()) >= 190, per_class
    held = sum(r.held_out for r in ROWS) / len(ROWS)
    assert 0.25 < held < 0.35
    assert len({r.text.lower() for r in ROWS}) == len(ROWS)


def test_the_shipped_router_reaches_90_percent_overall_and_80_on_every_class_of_the_held_out_part():
    j = judge(ClassifierRouter(), [r for r in ROWS if r.held_out])
    assert j.accuracy >= 0.90, j.per_class
    for c, (k, n) in j.per_class.items():
        assert k / n >= 0.80, (c, k, n)
    assert sum(map(sum, j.confusion)) == j.n and j.correct == sum(k for k, _ in j.per_class.values())


def test_the_fit_never_reads_the_held_out_part():
    rows = ROWS[::5]  # every class, both parts; a small fit keeps the test quick
    relabelled = [r if not r.held_out else type(r)(ROUTED[(ROUTED.index(r.klass) + 1) % 7], r.style, r.text, True)
                  for r in rows]
    path = str(minilm_dir())
    a, report = fit_head(rows, path, folds=3, weight_decays=(1e-4,))
    b, _ = fit_head(relabelled, path, folds=3, weight_decays=(1e-4,))
    assert report["questions"] == sum(not r.held_out for r in rows)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.temperature == b.temperature


def test_the_fitted_temperature_minimises_the_negative_log_likelihood():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 7, generator=g) * 4
    y = torch.where(torch.rand(300, generator=g) < 0.7, logits.argmax(1), torch.randint(0, 7, (300,), generator=g))
    t = _temperature(logits, y)
    grid = torch.linspace(0.2, 10, 2000)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits / s, y) for s in grid])
    assert abs(t - float(grid[nll.argmin()])) < 0.02


@settings(max_examples=60, deadline=None)
@given(q=st.sampled_from([r.text for r in ROWS]))
def test_a_cue_fires_exactly_when_its_pattern_matches(q):
    import re

    got = cue_features([q])[0]
    want = [float(re.search(p, q.lower()) is not None) for p in CUES.values()]
    assert got.tolist() == want


def test_below_min_confidence_the_class_is_general_and_the_confidence_is_a_probability():
    qs = [r.question for r in ROWS[:40]]
    sure = ClassifierRouter().route(qs)
    never = ClassifierRouter(min_confidence=1.0).route(qs)
    assert set(never.classes) == {"general"} and torch.equal(sure.confidence, never.confidence)
    assert ((sure.confidence > 1 / 7) & (sure.confidence <= 1)).all()


def test_a_head_fitted_with_other_cues_is_refused(tmp_path):
    head = LinearHead.load(shipped_head())
    other = LinearHead(head.weight, head.bias, head.temperature, head.classes, head.cues[:-1] + (("x", "x"),), head.meta)
    other.save(tmp_path / "h.safetensors")
    with pytest.raises(ValueError, match="other cues.*refit it: tokenprune router fit"):
        ClassifierRouter(head=str(tmp_path / "h.safetensors")).route(["How many dogs?"])


def test_a_bad_development_set_row_names_its_line(tmp_path):
    p = tmp_path / "dev.tsv"
    p.write_text("# comment\nclass\tstyle\tquestion\nocr\tvqa\tWhat does it say?\ncolour\tvqa\tWhat color?\n")
    with pytest.raises(ValueError, match=r"dev.tsv:4: unknown class 'colour'"):
        load_dev_set(p)
    p.write_text("ocr\tvqa\tWhat does it say?\nscene\tvqa\twhat does it say?\n")
    with pytest.raises(ValueError, match=r"dev.tsv:2: the question .* repeats line 1"):
        load_dev_set(p)
    assert is_held_out("What does it say?") == is_held_out("What does it say?")


def test_the_default_spec_routes_with_the_classifier_through_a_pipeline():
    pipe = tp.Pipeline.from_file("specs/clasp.toml")
    assert type(pipe.spec.router).__name__ == "ClassifierRouter"
    r = pipe.route(["USER: <image>\nAre there two dogs in the picture?\nPlease answer yes or no. ASSISTANT:",
                    "<|im_start|>user\nIs there a red car in the image?<|im_end|>\n<|im_start|>assistant\n"])
    assert r.classes == ("counting", "attribute")


def test_router_eval_prints_the_table_and_the_confusion_matrix(capsys):
    from tokenprune.cli import main

    assert main(["router", "eval", "--router", "classifier,keyword"]) == 0
    out = capsys.readouterr().out
    assert "| classifier | " in out and "| keyword | " in out and "| labelled \\ routed |" in out


def test_the_phrasing_checks_share_no_question_with_the_development_set():
    """The check files judge the router on phrasings it was not fitted on: none of their questions
    (by text, ignoring case) is a row of the development set or of another check, and each covers
    every class."""
    from importlib import resources

    from tokenprune_plugins.router_dev import load_dev_set
    from tokenprune_plugins.routers import ROUTED

    dev = {r.text.lower() for r in load_dev_set()}
    seen: set[str] = set()
    for name in ("router_check_a.tsv", "router_check_b.tsv", "router_check_c.tsv"):
        path = resources.files("tokenprune_plugins").joinpath(f"data/{name}")
        rows = load_dev_set(str(path))
        assert not [r.text for r in rows if r.text.lower() in dev], name
        assert not [r.text for r in rows if r.text.lower() in seen], f"{name} repeats an earlier check"
        assert {r.klass for r in rows} == set(ROUTED), name
        seen |= {r.text.lower() for r in rows}
