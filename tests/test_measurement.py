"""Measurement that can rank: Wilson intervals, exact McNemar tests, evidence cells and recall,
and the tower memo that makes many-run evaluations affordable."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenprune_lab.testbed.evaluate import Variant, evaluate, kept_cells
from tokenprune_lab.testbed.questions import QA_CLASSES, ask
from tokenprune_lab.testbed.scenes import GRID
from tokenprune_lab.testbed.splits import scene
from tokenprune_lab.testbed.stats import Z95, bootstrap_mean, detectable, mcnemar, paired_mean_test, paired_se, wilson

ROOT = Path(__file__).resolve().parents[1]


# -- Wilson ----------------------------------------------------------------------------------------
@given(st.integers(0, 400).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_solves_its_defining_equation(kn):
    """The bounds are the p where |k/n - p| = z sqrt(p (1 - p) / n): the score test's boundary."""
    k, n = kn
    lo, hi = wilson(k, n)
    if n == 0:
        assert (lo, hi) == (0.0, 1.0)
        return
    phat = k / n
    assert 0 <= lo <= phat <= hi <= 1
    for p in (lo, hi):
        if 0 < p < 1:
            assert abs(abs(phat - p) - Z95 * math.sqrt(p * (1 - p) / n)) < 1e-9


def test_wilson_known_values_and_errors():
    lo, hi = wilson(8, 10)  # textbook: [0.490, 0.943]
    assert round(lo, 3) == 0.490 and round(hi, 3) == 0.943
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(5, 3)


# -- McNemar ---------------------------------------------------------------------------------------
def _exact_p_by_enumeration(b: int, c: int) -> float:
    """Two-sided exact p written out: the probability, under Binomial(b + c, 1/2), of every
    outcome no more likely than the observed one."""
    n = b + c
    if n == 0:
        return 1.0
    probs = [Fraction(math.comb(n, i), 2**n) for i in range(n + 1)]
    return float(min(Fraction(1), sum(q for q in probs if q <= probs[b])))


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=120))
def test_mcnemar_counts_and_exact_p(pairs):
    a = [x for x, _ in pairs]
    b = [y for _, y in pairs]
    t = mcnemar(a, b)
    assert t["a_only"] == sum(x and not y for x, y in pairs)
    assert t["b_only"] == sum(y and not x for x, y in pairs)
    assert t["delta"] == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert t["p"] == pytest.approx(_exact_p_by_enumeration(t["a_only"], t["b_only"]), abs=1e-12)
    assert mcnemar(b, a)["p"] == pytest.approx(t["p"])  # symmetric


def test_mcnemar_refuses_unpaired_inputs_and_se_matches_the_formula():
    with pytest.raises(ValueError, match="pair the same ones"):
        mcnemar([True], [True, False])
    # 10 + 4 discordant of 100: var = (0.14 - 0.06^2) / 100
    assert paired_se(10, 4, 100) == pytest.approx(math.sqrt((0.14 - 0.0036) / 100))


# -- evidence cells --------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 149), st.sampled_from(QA_CLASSES), st.integers(0, 3))
def test_evidence_cells_hold_what_the_question_names(index, klass, draw):
    s = scene("test", index)
    q = ask(s, klass, draw)
    if q is None:
        return
    ev = np.array(q.evidence, dtype=int)
    assert len(set(q.evidence)) == len(q.evidence) and all(0 <= c < GRID * GRID for c in q.evidence)
    colour = s.labels.color.reshape(-1)
    digit = s.labels.digit.reshape(-1)
    if klass in ("ocr", "reasoning"):
        assert set(ev) == set(np.flatnonzero(digit > 0))
    elif klass == "scene":
        assert len(ev) == 0
    elif klass == "counting":
        assert len(ev) == 0 if q.answer == "0" else (colour[ev] > 0).all()
        assert sum(s.labels.anchor.reshape(-1)[ev]) == int(q.answer)  # one anchor per counted object
    elif klass in ("attribute", "spatial") or (klass == "existence" and q.answer == "yes"):
        assert len(ev) and (colour[ev] > 0).all()
        assert sum(s.labels.anchor.reshape(-1)[ev]) == (2 if klass == "spatial" else 1)


def test_kept_cells_reads_the_columns_that_reached_the_llm():
    IMG = 9
    ids = torch.tensor([[0, 1, IMG, IMG, IMG, IMG, 5], [1, 3, 4, IMG, IMG, IMG, IMG]])  # 4 cells each
    # row 0 kept cells 1 and 3 (columns 3, 5), row 1 kept cells 0 and 3 (columns 3, 6); -1 is padding
    source = torch.tensor([[1, 3, 5, 6], [-1, 0, 3, 6]])
    record = SimpleNamespace(source=source, llm_source=None)
    got = kept_cells({"input_ids": ids}, record, IMG, 4)
    assert got.tolist() == [[False, True, False, True], [True, False, False, True]]
    after_llm = SimpleNamespace(source=source, llm_source=torch.tensor([[1, 5, 6], [-1, 0, 6]]))
    assert kept_cells({"input_ids": ids}, after_llm, IMG, 4).tolist() == [[False, False, False, True], [False, False, False, True]]


# -- means of per-question quantities (KL) -------------------------------------------------------------
def _bootstrap_by_hand(x, resamples, seed):
    """The percentile bootstrap written as a loop over resamples, drawing the same indices."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(resamples, len(x)))
    means = sorted(sum(x[j] for j in row) / len(x) for row in idx)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


@given(st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=40), st.integers(0, 3))
@settings(max_examples=30)
def test_bootstrap_interval_equals_the_loop_and_holds_the_mean(x, seed):
    lo, hi = bootstrap_mean(x, resamples=200, seed=seed)
    ref = _bootstrap_by_hand(x, 200, seed)
    assert lo == pytest.approx(ref[0], abs=1e-9) and hi == pytest.approx(ref[1], abs=1e-9)
    assert min(x) - 1e-12 <= lo <= hi <= max(x) + 1e-12
    assert bootstrap_mean([2.0] * 7) == (2.0, 2.0)
    assert all(math.isnan(v) for v in bootstrap_mean([]))


@given(st.lists(st.tuples(st.floats(0, 3, allow_nan=False), st.floats(0, 3, allow_nan=False)), min_size=2,
                max_size=30))
@settings(max_examples=30)
def test_sign_flip_test_counts_the_flips_as_written(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    t = paired_mean_test(a, b, resamples=300, seed=1)
    d = [x - y for x, y in pairs]
    rng = np.random.default_rng(1)
    signs = np.where(rng.random((300, len(d))) < 0.5, -1.0, 1.0)
    observed = abs(sum(d) / len(d))
    hits = sum(abs(sum(s * v for s, v in zip(row, d, strict=True)) / len(d)) >= observed - 1e-15 for row in signs)
    assert t["p"] == pytest.approx((1 + hits) / 301)
    assert t["delta"] == pytest.approx(sum(d) / len(d))
    assert t["se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(len(d)))
    assert 0 < t["p"] <= 1


def test_sign_flip_test_finds_a_shift_and_not_its_absence():
    rng = np.random.default_rng(0)
    base = rng.exponential(1.0, 400)
    assert paired_mean_test(base + 0.3, base)["p"] < 0.001            # every pair moves the same way
    same = paired_mean_test(base, base)
    assert same["p"] == 1.0 and same["delta"] == 0.0
    with pytest.raises(ValueError, match="pair the same questions"):
        paired_mean_test([1.0], [1.0, 2.0])


def test_detectable_difference_is_the_power_formula():
    # (1.95996 + 0.84162) * se: the textbook 2.8 standard errors
    assert detectable(0.01) == pytest.approx(0.0280158, abs=1e-6)
    assert detectable(0.01, power=0.5) == pytest.approx(Z95 * 0.01)


# -- the evaluation report -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report():
    from tokenprune_lab.testbed.model import load

    from tokenprune.spec import load_spec

    model, processor = load()
    variants = [Variant("clasp", load_spec("specs/clasp.toml")),
                Variant("random", load_spec("specs/variants/random.toml"))]
    return evaluate(model, processor, variants, [32, 576], "test", scenes=3)


def test_every_accuracy_has_an_interval_and_every_run_a_paired_test(report):
    runs = report["runs"]
    assert report["reference"] == "clasp"
    for row in [report["unpruned"], *runs]:
        for c, acc in row["accuracy"].items():
            lo, hi = row["interval"][c]
            assert lo <= acc <= hi
    for r in runs:
        assert set(r["vs_unpruned"]) == set(r["accuracy"])
        assert ("vs_reference" in r) == (r["variant"] != "clasp")
    rand = next(r for r in runs if r["variant"] == "random" and r["budget"] == 32)
    clasp = next(r for r in runs if r["variant"] == "clasp" and r["budget"] == 32)
    both = [(x, y) for x, y in zip(rand["correct"], clasp["correct"], strict=True)]
    assert rand["vs_reference"]["overall"]["only_this"] == sum(x and not y for x, y in both)


def test_evidence_recall_is_one_when_every_token_is_kept(report):
    full = [r for r in report["runs"] if r["budget"] == 576]
    assert full and all(set(r["evidence_recall"].values()) == {1.0} for r in full)
    assert "scene" not in full[0]["evidence_recall"]  # scene questions have no evidence cells
    small = [r for r in report["runs"] if r["budget"] == 32]
    assert all(0 <= v <= 1 for r in small for v in r["evidence_recall"].values())


def test_tower_memo_gives_the_same_report_and_restores_the_tower():
    from tokenprune_lab.testbed.memo import memoized_tower
    from tokenprune_lab.testbed.model import load

    from tokenprune.spec import load_spec

    model, processor = load()
    variants = [Variant("clasp", load_spec("specs/clasp.toml")),
                Variant("vz", load_spec("specs/methods/visionzip.toml"))]
    few = ["ocr", "attribute", "existence"]  # the default (v2) tower is slow without the memo
    a = evaluate(model, processor, variants, [48], "test", scenes=2, classes=few, memo=True)
    b = evaluate(model, processor, variants, [48], "test", scenes=2, classes=few, memo=False)
    for x, y in zip([a["unpruned"], *a["runs"]], [b["unpruned"], *b["runs"]], strict=True):
        assert x["predictions"] == y["predictions"] and x.get("evidence_recall") == y.get("evidence_recall")
        assert x["mean_logp"] == pytest.approx(y["mean_logp"], abs=1e-4)
    assert "forward" not in model.model.vision_tower.__dict__
    with memoized_tower(model) as stats:
        px = processor.image_processor([scene("test", 0).image] * 3, return_tensors="pt")["pixel_values"]
        model.model.vision_tower(px, output_hidden_states=True)
        model.model.vision_tower(px[:1], output_hidden_states=True)
    assert (stats["misses"], stats["hits"]) == (1, 3)  # one image, computed once


def test_tower_memo_serves_any_choice_of_hidden_states_from_one_pass():
    """A row holds every hidden state, so fusions over different layers and the unpruned forward
    share one tower pass; each call gets back exactly what the tower itself returns for its
    arguments (the states it asked for, ``None`` for the others)."""
    from tokenprune_lab.testbed.memo import memoized_tower
    from tokenprune_lab.testbed.model import load

    model, processor = load("v1")
    tower = model.model.vision_tower
    px = processor.image_processor([scene("test", i).image for i in range(2)], return_tensors="pt")["pixel_values"]
    asks = [[2, -1], True, None, [0]]
    with torch.no_grad():
        plain = [tower(px, output_hidden_states=a) if a is not None else tower(px) for a in asks]
        with memoized_tower(model) as stats:
            memo = [tower(px, output_hidden_states=a) if a is not None else tower(px) for a in asks]
    assert (stats["misses"], stats["hits"]) == (2, 6)
    for p, m in zip(plain, memo, strict=True):
        torch.testing.assert_close(m.last_hidden_state, p.last_hidden_state)
        assert (m.hidden_states is None) == (p.hidden_states is None)
        for hp, hm in zip(p.hidden_states or (), m.hidden_states or (), strict=True):
            assert (hm is None) == (hp is None)
            if hp is not None:
                torch.testing.assert_close(hm, hp)


def test_a_memoized_tower_is_timed_as_if_it_had_run(monkeypatch):
    """Each row's compute time is charged to every call it serves, so a forward timed with
    ``tower_cost`` reports the same tower cost whether its rows were computed or replayed (on a
    fake clock: the tower costs 1 s per image row, replaying costs nothing)."""
    from tokenprune_lab.testbed import memo
    from tokenprune_lab.testbed.model import load

    model, processor = load("v1")
    tower = model.model.vision_tower
    now = [0.0]
    monkeypatch.setattr(memo, "clock", lambda: now[0])
    real = tower.forward

    def slow(pixel_values, *args, **kwargs):
        now[0] += pixel_values.shape[0]
        return real(pixel_values, *args, **kwargs)

    monkeypatch.setattr(tower, "forward", slow)
    px = processor.image_processor([scene("test", i).image for i in range(2)], return_tensors="pt")["pixel_values"]
    with torch.no_grad(), memo.memoized_tower(model) as stats:
        with memo.tower_cost(stats) as first:
            tower(px)
        with memo.tower_cost(stats) as again:
            tower(px)
        with memo.tower_cost(stats) as one:
            tower(px[:1])
    assert (first["seconds"], again["seconds"], one["seconds"]) == (2.0, 2.0, 1.0)
    assert (stats["tower_seconds"], stats["charged_seconds"]) == (2.0, 5.0)
    with memo.tower_cost(None) as plain:  # no memo: the wall time
        now[0] += 3
    assert plain["seconds"] == 3.0


# -- make results: a plan that resumes ------------------------------------------------------------
def _results_fixture(tmp_path):
    from tokenprune_lab.testbed.results import Step

    model = tmp_path / "model"
    model.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (model / f).write_text(f)
    spec = tmp_path / "a.toml"
    spec.write_text((ROOT / "specs/variants/random.toml").read_text())
    steps = [Step(n, ("eval", "--spec", str(spec), "--name", n), (tmp_path / f"{n}.json",), specs=(str(spec),))
             for n in ("one", "two")]
    calls = []

    def run(argv):
        calls.append(argv[-1])
        (tmp_path / f"{argv[-1]}.json").write_text("{}")
        return 0

    return model, spec, steps, calls, run


def test_results_plan_resumes_and_reruns_exactly_what_changed(tmp_path):
    from tokenprune_lab.testbed.results import run_plan

    model, spec, steps, calls, run = _results_fixture(tmp_path)
    manifest = tmp_path / "manifest.json"
    kw = dict(manifest=manifest, run=run, log=lambda s: None)
    run_plan(steps, model, **kw)
    assert calls == ["one", "two"]
    run_plan(steps, model, **kw)  # nothing changed: nothing runs
    assert calls == ["one", "two"]
    (tmp_path / "two.json").unlink()  # a lost output re-runs its step only
    run_plan(steps, model, **kw)
    assert calls == ["one", "two", "two"]
    spec.write_text(spec.read_text().replace("seed = 0", "seed = 7"))
    run_plan(steps, model, **kw)  # a changed spec re-runs every step that reads it
    assert calls[3:] == ["one", "two"]
    (model / "model.safetensors").write_text("new weights")
    run_plan(steps, model, only=["two"], **kw)
    assert calls[5:] == ["two"]
    run_plan(steps, model, force=True, **kw)
    assert calls[6:] == ["one", "two"]


def test_results_plan_reruns_every_step_when_the_code_changes(tmp_path):
    """A change to a source file of the packages (the DPP rule, say) marks each step to run again,
    and ``stale_because`` says it was the code; an untouched tree re-runs nothing."""
    from tokenprune_lab.testbed.results import code_digest, run_plan, stale_because

    model, spec, steps, calls, run = _results_fixture(tmp_path)
    src = tmp_path / "src" / "pkg"
    (src / "sub").mkdir(parents=True)
    (src / "ops.py").write_text("def pick(): return 1\n")
    (src / "sub" / "stage.py").write_text("X = 1\n")
    kw = dict(manifest=tmp_path / "manifest.json", run=run, log=lambda s: None)
    before = code_digest([src])
    run_plan(steps, model, code=before, **kw)
    assert calls == ["one", "two"]
    run_plan(steps, model, code=code_digest([src]), **kw)
    assert calls == ["one", "two"]
    (src / "sub" / "stage.py").write_text("X = 2\n")  # a nested module changes
    after = code_digest([src])
    assert after != before
    done = json.loads((tmp_path / "manifest.json").read_text())
    assert stale_because(steps[0], model, done, after) == "the code changed since it ran"
    assert stale_because(steps[0], model, done, before) is None
    run_plan(steps, model, code=after, **kw)
    assert calls[2:] == ["one", "two"]
    (src / "sub" / "stage.py").rename(src / "stage2.py")  # a moved file is a change too
    assert code_digest([src]) != after
    moved = code_digest([src])
    (src / "data").mkdir()
    (src / "data" / "router_head.safetensors").write_bytes(b"\x00\x01")  # data the code reads is code too
    with_head = code_digest([src])
    assert with_head != moved
    (src / "data" / "router_head.safetensors").write_bytes(b"\x00\x02")
    assert code_digest([src]) != with_head
    with_head = code_digest([src])
    (src / "data" / ".class_table-ocr.partial.json").write_text("{}")  # a checkpoint is not
    (src / "data" / "class_table.toml").write_text("")  # calibrate's output: the specs' resolved form covers it
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "ops.cpython-311.pyc").write_bytes(b"x")
    assert code_digest([src]) == with_head


def test_the_code_digest_covers_the_installed_packages_the_plugins_and_the_lab():
    from tokenprune_lab.testbed.results import code_roots

    names = {p.name for p in code_roots()}
    assert names in ({"tokenprune", "plugins", "tokenprune_lab"}, {"tokenprune", "tokenprune_plugins", "tokenprune_lab"})
    assert any((r / "completion.py").exists() for r in code_roots())
    assert any((r / "testbed" / "evaluate.py").exists() for r in code_roots())


def test_results_plan_stops_at_a_failing_step_and_names_it(tmp_path):
    from tokenprune_lab.testbed.results import run_plan

    model, _, steps, calls, run = _results_fixture(tmp_path)
    manifest = tmp_path / "manifest.json"
    with pytest.raises(RuntimeError, match="results step 'one' failed"):
        run_plan(steps, model, manifest=manifest, run=lambda argv: 1, log=lambda s: None)
    assert not manifest.exists()
    with pytest.raises(ValueError, match="unknown results step"):
        run_plan(steps, model, manifest=manifest, run=run, only=["three"], log=lambda s: None)
    assert calls == []


def test_ctrl_c_keeps_the_finished_batches_says_so_in_one_line_and_the_same_command_resumes(tmp_path, capsys,
                                                                                                   monkeypatch):
    """A real SIGINT to an ``eval`` after its second batch: the command ends with exit 130 and one
    ``interrupted`` line naming what it kept and how to resume (no traceback); the same command then
    says it resumed, answers the rest and gives the uninterrupted report."""
    import os
    import signal

    from tokenprune_lab.testbed import evaluate as ev

    from tokenprune.cli import main

    argv = ["eval", "--scenes", "1", "--budgets", "32", "--out", str(tmp_path), "--name", "e"]
    runs = 2  # unpruned and CLASP at 32

    armed = [True]

    def progress_bar(desc):
        def update(done, total, label=""):
            if done == 2 * runs and armed[0]:
                os.kill(os.getpid(), signal.SIGINT)
        return update

    monkeypatch.setattr(ev, "progress_bar", progress_bar)
    assert main(argv) == 130
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "interrupted" in x]
    partial = tmp_path / ".e.partial.json"
    assert "Traceback" not in err and len(lines) == 1
    assert lines[0].startswith("tokenprune: interrupted: kept 2 of ") and str(partial) in lines[0]
    assert lines[0].endswith("the same command resumes from them") and partial.exists()
    total = int(lines[0].split("kept 2 of ")[1].split()[0])

    armed[0] = False
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"resuming from {partial}: 2 of {total} batches already answered by every run" in err
    assert not partial.exists()
    resumed = json.loads((tmp_path / "e.json").read_text())
    assert main([*argv[:-1], "whole"]) == 0
    whole = json.loads((tmp_path / "whole.json").read_text())
    for x, y in zip([whole["unpruned"], *whole["runs"]], [resumed["unpruned"], *resumed["runs"]], strict=True):
        assert x["predictions"] == y["predictions"] and x.get("agreement") == y.get("agreement")


def test_an_interrupt_without_a_checkpoint_says_nothing_was_kept(capsys, monkeypatch):
    from tokenprune_lab import cli as lab_cli

    from tokenprune.cli import main

    def stop(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(lab_cli, "cmd_bench_stages", stop)
    assert main(["bench", "stages", "--quick"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tokenprune: interrupted: nothing was kept; run the same command to start again"]


def test_an_interrupted_results_step_names_the_step_and_what_it_kept(tmp_path):
    from tokenprune_lab.testbed.results import run_plan
    from tokenprune_lab.testbed.resume import Interrupted

    model, _, steps, calls, run = _results_fixture(tmp_path)
    log = []

    def interrupted(argv):
        raise Interrupted("kept 3 of 9 finished batches in x.json; the same command resumes from them")

    with pytest.raises(Interrupted) as stop:
        run_plan(steps, model, manifest=tmp_path / "m.json", run=interrupted, log=log.append)
    assert str(stop.value) == ("results step 'one': kept 3 of 9 finished batches in x.json; the same command "
                               "resumes from them (`tokenprune results` resumes at this step)")
    assert log[0] == f"results: {len(steps)} of {len(steps)} steps to run"


def test_results_plan_covers_every_shipped_ablation():
    from tokenprune_lab.testbed.results import plan

    names = {s.name for s in plan()}
    assert {p.stem for p in (ROOT / "specs/ablations").glob("*.toml")} <= names
    assert [s.name for s in plan()][0] == "calibrate"


# -- checkpoints: an interrupted evaluation resumes ------------------------------------------------
def test_an_interrupted_evaluation_resumes_from_its_checkpoint_and_reports_the_same(tmp_path):
    """Stopped inside a batch, an evaluation with the same model and arguments answers only the
    batches that were not saved, gives the uninterrupted report (predictions, accuracies,
    evidence recall) and deletes its checkpoint; other arguments ignore the file."""
    import json

    from tokenprune_lab.testbed import resume
    from tokenprune_lab.testbed.model import load

    from tokenprune.spec import load_spec

    model, processor = load("v1")
    variants = [Variant("top-r", load_spec("specs/variants/top-r.toml"))]
    ck = tmp_path / ".eval.partial.json"
    # 4 batches of one question, each answered by 2 runs (unpruned, top-r at 32)
    args = dict(budgets=[32], split="test", scenes=1, classes=["ocr", "counting"], batch_size=1)
    whole = evaluate(model, processor, variants, **args)

    class Stop(Exception):
        pass

    def stop_at(n):
        def progress(done, total):
            if done == n:
                raise Stop
        return progress

    with pytest.raises(Stop):  # the 5th answer is the first run of the 3rd batch
        evaluate(model, processor, variants, **args, checkpoint=ck, progress=stop_at(5))
    assert not ck.exists()  # saved at most once a minute: nothing yet
    with pytest.MonkeyPatch.context() as monkey:
        monkey.setattr(resume.Checkpoint, "maybe_save", resume.Checkpoint.save)  # save after every batch
        with pytest.raises(Stop):
            evaluate(model, processor, variants, **args, checkpoint=ck, progress=stop_at(5))
    saved = json.loads(ck.read_text())["results"]
    assert {len(v) for v in saved.values()} == {2}  # two whole batches kept, the third lost

    seen = []
    resumed = evaluate(model, processor, variants, **args, checkpoint=ck,
                       progress=lambda done, total: seen.append(done))
    assert seen == [4, 5, 6, 7, 8]  # started at the 4 saved answers (the bar starts there, not at 0)
    assert not ck.exists()
    for x, y in zip([whole["unpruned"], *whole["runs"]], [resumed["unpruned"], *resumed["runs"]], strict=True):
        assert x["predictions"] == y["predictions"] and x["accuracy"] == y["accuracy"]
        assert x.get("evidence_recall") == y.get("evidence_recall")

    ck.write_text(json.dumps({"key": "another evaluation", "results": {"0": {"0": {}}, "1": {"0": {}}}}))
    other = evaluate(model, processor, variants, **args, checkpoint=ck)
    assert other["unpruned"]["predictions"] == whole["unpruned"]["predictions"]


# -- docs/results.md: its tables are rendered from the committed results ----------------------------
def test_fill_report_renders_each_marked_block_from_its_json(tmp_path):
    from tokenprune_lab.testbed.results import fill_report, render

    results = tmp_path / "results"
    results.mkdir()
    (results / "ablation-x.json").write_text((ROOT / "docs/results/ablation-alternatives.json").read_text())
    doc = tmp_path / "results.md"
    doc.write_text("prose\n<!-- results: ablation-x table -->\nstale\n<!-- end -->\nmore prose\n"
                   "<!-- results: ablation-x paired -->\n<!-- end -->\n")
    assert fill_report(doc, results) == 2
    table, paired = render("ablation-x", "table", results), render("ablation-x", "paired", results)
    assert doc.read_text() == (f"prose\n<!-- results: ablation-x table -->\n{table}\n<!-- end -->\nmore prose\n"
                               f"<!-- results: ablation-x paired -->\n{paired}\n<!-- end -->\n")
    assert "| CLASP | 64 |" in table and fill_report(doc, results) == 0
    doc.write_text("<!-- results: ablation-y table -->\n<!-- end -->\n")
    with pytest.raises(FileNotFoundError, match="ablation-y.json, which does not exist"):
        fill_report(doc, results)
    with pytest.raises(ValueError, match="the kind must be one of"):
        render("ablation-x", "plot", results)
    doc.write_text("<!-- results: ablation-x recall only=DivPrune; random -->\n<!-- end -->\n")
    fill_report(doc, results)
    rows = [line.split(" | ")[0] for line in doc.read_text().splitlines() if line.startswith("| ")][1:]
    runs = json.loads((results / "ablation-x.json").read_text())["runs"]
    budgets = {r["budget"] for r in runs if r["variant"] == "DivPrune"}
    assert set(rows) == {"| DivPrune", "| random"} and len(rows) == 2 * len(budgets)  # 2 variants x the budgets
    with pytest.raises(ValueError, match=r"asks for variants \['CDPruner'\]"):
        render("ablation-x", "table", results, ["CDPruner"])


def test_the_tables_of_results_md_are_the_committed_results():
    """docs/results.md and docs/routing.md show what docs/results/*.json hold (`tokenprune
    results` re-renders them)."""
    from tokenprune_lab.testbed.results import _BLOCK, REPORTS, _only, render

    for doc in REPORTS:
        blocks = list(_BLOCK.finditer((ROOT / doc).read_text()))
        assert len(blocks) >= (3 if doc.name == "results.md" else 1), f"{doc} has no rendered table"
        for m in blocks:
            assert m["body"] == render(m["name"], m["kind"], ROOT / "docs/results", _only(m)) + "\n", (
                f"the '{m['name']} {m['kind']}' table of {doc} is stale: run `tokenprune results`")


def test_full_budget_agrees_with_unpruned_and_moves_no_probability(report):
    """At every token kept, the pruned model is the unpruned one: agreement 1, KL 0, and the
    decisive questions are those whose unpruned margin is at least 0.1."""
    full = [r for r in report["runs"] if r["budget"] == 576]
    assert full
    for r in full:
        assert all(r["agree"]) and r["agreement"]["overall"] == 1.0
        assert max(r["kl_per_question"]) < 1e-4
    margins = report["unpruned"]["margin"]
    assert all(0 <= m <= 1 for m in margins)
    assert report["decisive_per_class"]["overall"] == sum(m >= 0.1 for m in margins)


def test_kl_and_agreement_equal_a_forward_by_hand(report):
    """The recorded KL and agreement of a pruned run equal what the public API gives: the next-token
    distributions of the unpruned and the pruned model on the same questions."""
    from tokenprune_lab.testbed.model import load, prompt
    from tokenprune_lab.testbed.splits import examples

    import tokenprune as tp
    from tokenprune.spec import load_spec

    model, processor = load()
    exs = examples("test", 3)
    pick = [0, 5, 17, 30]  # questions of several classes
    inputs = processor(images=[scene("test", exs[i].index).image for i in pick],
                       text=[prompt(exs[i].question.text) for i in pick], return_tensors="pt", padding=True)
    with torch.inference_mode():
        ref = torch.log_softmax(model(**inputs).logits[:, -1].float(), -1)
        with tp.apply(model, load_spec("specs/variants/random.toml"), budget=32, tokenizer=processor.tokenizer):
            got = torch.log_softmax(model(**inputs).logits[:, -1].float(), -1)
    kl = (ref.exp() * (ref - got)).sum(-1)
    run = next(r for r in report["runs"] if r["variant"] == "random" and r["budget"] == 32)
    assert [run["kl_per_question"][i] for i in pick] == pytest.approx(kl.clamp_min(0).tolist(), abs=1e-4)
    assert [run["agree"][i] for i in pick] == (got.argmax(-1) == ref.argmax(-1)).tolist()
    top2 = ref.exp().topk(2, -1).values
    assert [report["unpruned"]["margin"][i] for i in pick] == pytest.approx((top2[:, 0] - top2[:, 1]).tolist(), abs=1e-4)


def test_fidelity_has_intervals_and_paired_tests_against_the_reference(report):
    rand = next(r for r in report["runs"] if r["variant"] == "random" and r["budget"] == 32)
    clasp = next(r for r in report["runs"] if r["variant"] == "clasp" and r["budget"] == 32)
    for row in (rand, clasp):
        for c, v in row["agreement"].items():
            lo, hi = row["agreement_interval"][c]
            assert lo <= v <= hi
        for c, v in row["kl"].items():
            lo, hi = row["kl_interval"][c]
            assert lo - 1e-5 <= v <= hi + 1e-5
    assert "fidelity_vs_reference" not in clasp
    tests = rand["fidelity_vs_reference"]
    both = list(zip(rand["agree"], clasp["agree"], strict=True))
    assert tests["agreement"]["overall"]["only_this"] == sum(x and not y for x, y in both)
    assert tests["kl"]["overall"]["delta"] == pytest.approx(rand["kl"]["overall"] - clasp["kl"]["overall"], abs=1e-4)
    decisive = [m >= 0.1 for m in report["unpruned"]["margin"]]
    dec = [(x, y) for (x, y), d in zip(both, decisive, strict=True) if d]
    assert tests["decisive_agreement"]["overall"]["only_reference"] == sum(y and not x for x, y in dec)


def test_fidelity_tables_and_plot_render(report, tmp_path):
    from tokenprune_lab.testbed.report import detectable_table, fidelity_class_table, fidelity_table, plot_fidelity

    table = fidelity_table(report)
    assert table.count("\n") == len(report["runs"]) + 1 and "| random | 32 |" in table
    assert "ocr" in fidelity_class_table(report, "kl").splitlines()[0]
    with pytest.raises(ValueError, match="fidelity metric"):
        fidelity_class_table(report, "accuracy")
    assert detectable_table(report).splitlines()[2].startswith("| accuracy |")
    plot_fidelity(report, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 20_000
