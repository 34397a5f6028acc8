"""Discovery through the `tokenprune` entry-point group, third-party plugins, clashes."""

from __future__ import annotations

import pytest
from helpers import clasp_spec, make_dist, make_tokens

import tokenprune as tp
from tokenprune.registry import RegistryError, build_registry
from tokenprune.spec import DEFAULT_STAGES
from tokenprune.stages import KINDS

BUILTINS = {
    "router": {"keyword", "embedding", "fixed"},
    "fusion": {"class-adaptive", "single-layer", "mean"},
    "scoring": {"cls-attention", "received-attention", "text-similarity", "feature-norm", "random"},
    "selection": {"top-k"},
    "completion": {"clasp", "none", "random", "grid", "divprune"},
    "budget_policy": {"class-table", "fixed"},
}


def test_builtins_come_from_the_tokenprune_distribution_entry_points():
    reg = build_registry()
    for kind, names in BUILTINS.items():
        assert names <= set(reg.names(kind))
        for n in names:
            info = reg.get(kind, n)
            assert info.distribution == "tokenprune"
            assert info.cls.__module__.startswith("tokenprune_plugins.")
    import importlib.metadata as md

    eps = {ep.value for ep in md.entry_points(group="tokenprune") if ep.dist.metadata["Name"] == "tokenprune"}
    assert {"tokenprune_plugins.completion", "tokenprune_plugins.routers"} <= eps


CENTRE_SCORER = """
    import torch
    import tokenprune
    from tokenprune.stages import Scorer

    class Centre(Scorer):
        permutation_invariant = False
        sharpness: float = 1.0

        def score(self, tokens, fused):
            pos = tokens.positions.float()
            centre = pos.mean(1, keepdim=True)
            return (-self.sharpness * (pos - centre).norm(dim=-1)).float()

    @tokenprune.hookimpl
    def register_scorers(register):
        register("centre", Centre)
"""


def test_third_party_distribution_stage_is_used_in_a_spec(site):
    make_dist(site, "tp-thirdparty-centre", "tp_thirdparty_centre", CENTRE_SCORER)
    reg = build_registry()
    info = reg.get("scoring", "centre")
    assert (info.distribution, info.version) == ("tp-thirdparty-centre", "1.2.3")
    spec = tp.PipelineSpec.model_validate(
        {**clasp_spec().resolved(), "scoring": {"stage": "centre", "sharpness": 2.0},
         "budget_policy": {"stage": "fixed", "ratio": 1.0}},
        context={"registry": reg},
    )
    tokens = make_tokens(1, 9, grid=(3, 3))
    sel = tp.Pipeline(spec)(tokens, budget=1)
    assert sel.row(0).tolist() == [4]  # the centre patch of a 3x3 grid
    with pytest.raises(Exception, match="sharpnes"):
        tp.PipelineSpec.model_validate(
            {**clasp_spec().resolved(), "scoring": {"stage": "centre", "sharpnes": 2.0}},
            context={"registry": reg},
        )


def test_name_clash_names_both_distributions(site):
    make_dist(site, "tp-thirdparty-a", "tp_thirdparty_a", CENTRE_SCORER)
    make_dist(site, "tp-thirdparty-b", "tp_thirdparty_b", CENTRE_SCORER)
    with pytest.raises(RegistryError) as err:
        build_registry()
    msg = str(err.value)
    assert "'centre'" in msg and "tp-thirdparty-a" in msg and "tp-thirdparty-b" in msg


def test_clash_with_a_builtin_name_is_an_error(site):
    make_dist(site, "tp-thirdparty-clash", "tp_thirdparty_clash", CENTRE_SCORER.replace('"centre"', '"random"'))
    with pytest.raises(RegistryError, match="'random'.*'tokenprune'.*'tp-thirdparty-clash'"):
        build_registry()


def test_wrong_kind_and_abstract_classes_are_rejected():
    class NotAStage:
        pass

    class Plugin:
        @tp.hookimpl
        def register_scorers(self, register):
            register("bad", NotAStage)

    with pytest.raises(RegistryError, match="not a subclass of tokenprune.stages.Scorer"):
        build_registry(extra_plugins=(("bad", Plugin()),))

    from tokenprune.stages import Completion

    class Half(Completion):
        pass

    class Plugin2:
        @tp.hookimpl
        def register_completions(self, register):
            register("half", Half)

    with pytest.raises(RegistryError, match="abstract methods"):
        build_registry(extra_plugins=(("half", Plugin2()),))


def test_misspelt_hook_is_reported():
    class Typo:
        @tp.hookimpl
        def register_scorer(self, register):  # missing "s"
            pass

    with pytest.raises(RegistryError, match="unknown hook"):
        build_registry(extra_plugins=(("typo", Typo()),))


def test_broken_entry_point_names_its_distribution(site):
    make_dist(site, "tp-thirdparty-broken", "tp_thirdparty_broken", "raise ImportError('boom')\n")
    with pytest.raises(RegistryError, match="tp-thirdparty-broken.*boom"):
        build_registry()


def test_one_record_per_kind_names_it_everywhere():
    """Each kind's one name is its spec table, its base class's ``kind`` and its registry key; every
    hookspec registers exactly one kind."""
    import inspect

    hooks = {n for n, f in inspect.getmembers(tp.hookspecs, inspect.isfunction) if n.startswith("register_")}
    others = {"register_adapters", "register_commands"}
    assert {k.hook for k in KINDS.values()} | others == hooks and len(hooks) == len(KINDS) + len(others)
    assert list(KINDS) == [f for f in tp.PipelineSpec.model_fields if f in KINDS]
    for name, kind in KINDS.items():
        assert kind.base.kind == name and issubclass(kind.base, tp.stages.Stage)
        field = tp.PipelineSpec.model_fields[name]
        # only a completion has no default: a left-out kind gets DEFAULT_STAGES' stage, or none when optional
        assert field.is_required() == (name == "completion")
        assert kind.optional == (field.default is None and name not in DEFAULT_STAGES)
    assert set(build_registry().stages) == set(KINDS)


FAULTY = """
import torch
import tokenprune
from tokenprune.stages import Completion, CompletionResult


class OneTooMany(Completion):
    def complete(self, req):
        keep = req.pool.clone()  # every pool token: more than the budget asks
        return CompletionResult(keep, None)


class Raises(Completion):
    def complete(self, req):
        raise ZeroDivisionError("bad arithmetic in a third-party stage")


@tokenprune.hookimpl
def register_completions(register):
    register("one-too-many", OneTooMany)
    register("raises", Raises)
"""


def test_a_faulty_third_party_stage_is_named_with_its_distribution(site, monkeypatch):
    make_dist(site, "tp-thirdparty-faulty", "tp_thirdparty_faulty", FAULTY)
    reg = build_registry()
    monkeypatch.setattr("tokenprune.registry.get_registry", lambda: reg)  # as after get_registry.cache_clear()
    tokens = make_tokens(2, 9, grid=(3, 3))

    def run(name):
        spec = tp.PipelineSpec.model_validate({**clasp_spec().resolved(), "completion": {"stage": name}},
                                              context={"registry": reg})
        return tp.Pipeline(spec)(tokens, budget=4)

    with pytest.raises(RuntimeError, match=r"the completion stage 'one-too-many' \(tp_thirdparty_faulty\.OneTooMany, "
                                           r"distribution tp-thirdparty-faulty 1\.2\.3\) chose \[\d, \d\] tokens per row"):
        run("one-too-many")
    with pytest.raises(ZeroDivisionError, match="bad arithmetic") as err:
        run("raises")
    assert err.value.__notes__ == ["raised inside the completion stage 'raises' (tp_thirdparty_faulty.Raises, "
                                   "distribution tp-thirdparty-faulty 1.2.3)"]
