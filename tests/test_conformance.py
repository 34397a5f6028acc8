"""The conformance kit: every built-in stage passes it, each property fails on a stage built to
break it (naming the stage), and ``pytest --tokenprune-stage`` runs it on a third-party stage."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICES
from helpers import make_dist

import tokenprune as tp
from tokenprune.registry import build_registry, get_registry
from tokenprune.stages import Completion, CompletionResult, LlmPruner, Scorer
from tokenprune.testing.conformance import ConformanceError, properties, run, stage_under_test

BUILTIN = [pytest.param(f"{i.kind}:{i.name}", id=f"{i.kind}:{i.name}") for i in get_registry()
           if i.distribution == "tokenprune"]


@pytest.mark.parametrize("word", BUILTIN)
def test_every_builtin_stage_passes_the_kit(word, device):
    sut = stage_under_test(word)
    assert {"contract", "untouched", "deterministic", "batch-independent"} <= set(properties(sut))
    for prop in properties(sut):
        run(sut, prop, device, max_examples=15)


def test_the_kit_covers_every_kind():
    kinds = {word.values[0].split(":")[0] for word in BUILTIN}
    assert kinds == set(tp.stages.KINDS)


# -- stages built to break one property each ----------------------------------------------------
class OneTooMany(Completion):
    def complete(self, req):
        return CompletionResult(req.pool.clone())  # every pool token: more than k2


class Mutates(Completion):
    def complete(self, req):
        req.scores.mul_(1.0).add_(1.0)  # in place on an input
        return CompletionResult(tp.ops.topk_mask(req.scores, req.k2, req.pool))


class ReadsUndeclared(Completion):
    def complete(self, req):  # reads keys without declaring them in requirements()
        k = req.tokens.key_features(-2).float().norm(dim=-1)  # (B, M)
        return CompletionResult(tp.ops.topk_mask(k, req.k2, req.pool))


class Unseeded(Completion):
    permutation_invariant = False

    def complete(self, req):
        return CompletionResult(tp.ops.topk_mask(torch.rand(req.pool.shape).to(req.pool.device), req.k2, req.pool))


class BatchCoupled(Completion):
    def complete(self, req):  # centres the scores on the whole batch's mean
        s = (req.scores - req.scores[req.valid].mean()).abs()
        return CompletionResult(tp.ops.topk_mask(-s, req.k2, req.pool))


class OrderBound(Completion):  # picks the first pool tokens but claims permutation invariance
    def complete(self, req):
        first = -torch.arange(req.pool.shape[1], device=req.pool.device, dtype=torch.float32).expand(req.pool.shape)
        return CompletionResult(tp.ops.topk_mask(first, req.k2, req.pool))


class HalfScore(Scorer):
    def score(self, tokens, fused):
        return fused.decoder.norm(dim=-1).half()  # float16, not float32


class LateLayer(LlmPruner):
    def schedule(self, num_layers):
        return [num_layers]  # one past the last decoder layer

    def select(self, req):
        return tp.ops.topk_mask(req.hidden.float().norm(dim=-1), req.keep, req.valid)


class Broken:
    @tp.hookimpl
    def register_completions(self, register):
        for name, cls in [("one-too-many", OneTooMany), ("mutates", Mutates), ("reads-undeclared", ReadsUndeclared),
                          ("unseeded", Unseeded), ("batch-coupled", BatchCoupled), ("order-bound", OrderBound)]:
            register(name, cls)

    @tp.hookimpl
    def register_scorers(self, register):
        register("half-score", HalfScore)

    @tp.hookimpl
    def register_llm_pruners(self, register):
        register("late-layer", LateLayer)


@pytest.mark.parametrize("word, prop, message", [
    ("one-too-many", "contract", r"chose \[.*\] tokens per row; the budget asks for"),
    ("half-score", "contract", r"returned \(.*\) torch.float16; expected \(.*\) float32"),
    ("mutates", "untouched", "it modified an input tensor"),
    ("reads-undeclared", "requirements", "did not declare in requirements.*attention keys at encoder layer 3"),
    ("unseeded", "deterministic", "two calls on the same batch disagree: 'mask' differs"),
    ("batch-coupled", "batch-independent", r"row \d of the batch differs from sample \d alone"),
    ("order-bound", "permutation", "permuting the tokens does not permute the answer"),
    ("late-layer", "schedule", r"prunes before decoder layers \[\d+\], but this LLM has \d+ layers"),
])
def test_each_property_fails_on_a_stage_that_breaks_it_and_names_the_stage(word, prop, message, monkeypatch):
    reg = build_registry(extra_plugins=(("broken", Broken()),))
    monkeypatch.setattr("tokenprune.registry.get_registry", lambda: reg)
    sut = stage_under_test(word, registry=reg)
    assert prop in properties(sut)
    with pytest.raises(ConformanceError, match=message) as err:
        run(sut, prop, "cpu", max_examples=25)
    cls = type(sut.stage)
    assert str(err.value).startswith(f"the {sut.kind} stage '{word}' ({cls.__module__}.{cls.__qualname__}, "
                                     "registered by plugin broken)")
    assert f"fails '{prop}'" in str(err.value) and "seed" in str(err.value)


def test_stage_words_are_resolved_or_refused_clearly():
    assert stage_under_test("completion:divprune").name == "divprune"
    with pytest.raises(LookupError, match="several kinds have a stage called 'random'.*give KIND:NAME"):
        stage_under_test("random")
    with pytest.raises(LookupError, match="no registered stage is called 'divprun'; registered stages: .*completion:divprune"):
        stage_under_test("divprun")
    with pytest.raises(ValueError, match="cannot build completion stage 'clasp' with parameters"):
        stage_under_test("completion:clasp", {"iterations": 0})


# -- the pytest plugin, as a stage author runs it --------------------------------------------------
FAULTY = """
    import tokenprune
    from tokenprune.stages import Completion, CompletionResult

    class OneTooMany(Completion):
        def complete(self, req):
            return CompletionResult(req.pool.clone())

    @tokenprune.hookimpl
    def register_completions(register):
        register("one-too-many", OneTooMany)
"""

OWN_SUITE = """
    from tokenprune.testing import StageConformance

    class TestDivPrune(StageConformance):
        stage = "completion:divprune"
        max_examples = 5

    def test_something_else():
        pass
"""


def _pytest(args: list[str], cwd, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath, "CI": ""}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def test_pytest_option_runs_the_kit_on_a_third_party_stage_and_names_it(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    make_dist(site, "tp-thirdparty-kit", "tp_thirdparty_kit", FAULTY)
    work = tmp_path / "work"
    work.mkdir()
    (work / "test_unrelated.py").write_text("def test_not_collected():\n    assert False\n")
    good = _pytest(["--tokenprune-stage", "divprune", "--tokenprune-examples", "5"], work, str(site))
    n = len(properties(stage_under_test("divprune"))) * len(DEVICES)
    assert good.returncode == 0 and f"{n} passed" in good.stdout, good.stdout + good.stderr
    bad = _pytest(["--tokenprune-stage", "completion:one-too-many", "--tokenprune-examples", "5"], work, str(site))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert ("the completion stage 'one-too-many' (tp_thirdparty_kit.OneTooMany, distribution tp-thirdparty-kit 1.2.3) "
            "fails 'contract': chose") in bad.stdout
    unknown = _pytest(["--tokenprune-stage", "divprun"], work, str(site))
    assert unknown.returncode == 4 and "--tokenprune-stage divprun: no registered stage is called 'divprun'" in unknown.stderr


def test_a_stage_authors_suite_subclasses_the_kit(tmp_path):
    (tmp_path / "test_mine.py").write_text(OWN_SUITE.replace("\n    ", "\n").lstrip())
    out = _pytest([], tmp_path)
    n = len(properties(stage_under_test("divprune"))) * len(DEVICES) + 1
    assert out.returncode == 0 and f"{n} passed" in out.stdout, out.stdout + out.stderr
