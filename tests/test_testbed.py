"""The testbed: scenes, questions, the packed training layout, training (a miniature model, with
resume), evaluation (single process and 2-process gloo), ablation, calibration and the demo."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenprune_lab.testbed import model as tb_model
from tokenprune_lab.testbed.questions import QA_CLASSES, answer_words, ask, ask_all
from tokenprune_lab.testbed.scenes import CELL, COLORS, SHAPES, make_scene
from tokenprune_lab.testbed.splits import SPLITS, examples, scene
from tokenprune_lab.testbed.train import Packer, TrainConfig, pixels, train

from tokenprune.classes import ClassTable
from tokenprune.cli import main

REPO = Path(__file__).resolve().parent.parent
MINI = {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "num_key_value_heads": 2}}


def mini_config(**kw) -> TrainConfig:
    base = dict(tower_steps=2, qa_steps=3, tower_batch=2, qa_batch=2, warmup=1, log_every=1, check_scenes=1,
                checkpoint_every=1, arch=MINI)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """A miniature testbed model trained for a few steps (the CI keeps the training path alive)."""
    out = tmp_path_factory.mktemp("mini")
    record = train(mini_config(), out, log=lambda m: None)
    assert record["finished"] and (out / "model.safetensors").exists()
    return out


# -- scenes and questions -------------------------------------------------------------------------
@given(st.integers(0, 10**6), st.sampled_from(sorted(SPLITS)))
@settings(max_examples=25)
def test_scene_is_deterministic_and_labels_match_pixels(index, split):
    a, b = scene(split, index), scene(split, index)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.objects == b.objects
    img = np.asarray(a.image).astype(int)
    for o in a.objects:
        # the object's centre pixel has the object's colour (every shape covers its centre)
        cy, cx = int((o.row + o.span / 2) * CELL), int((o.col + o.span / 2) * CELL)
        assert np.abs(img[cy, cx] - np.array(COLORS[o.color])).max() <= 2, (o, img[cy, cx])
        block = np.s_[o.row:o.row + o.span, o.col:o.col + o.span]
        assert (a.labels.color[block] == 1 + list(COLORS).index(o.color)).all()
        assert (a.labels.shape[block] == 1 + SHAPES.index(o.shape)).all()
        assert a.labels.anchor[o.row, o.col] == 1
    assert a.labels.anchor.sum() == len(a.objects)
    assert len({(o.color, o.shape) for o in a.objects}) == len(a.objects)
    first, second = divmod(a.number, 10)
    digits = a.labels.digit[a.labels.digit > 0]
    assert set(digits.tolist()) == {1 + first, 11 + second}
    assert digits.size == 2 * a.text_span ** 2


def test_splits_share_no_scene_and_hard_is_small():
    seen = {}
    for name in SPLITS:
        for i in range(30):
            key = np.asarray(scene(name, i).image).tobytes()
            assert key not in seen, f"{name}[{i}] equals {seen[key]}"
            seen[key] = (name, i)
    for i in range(30):
        s = scene("hard", i)
        assert s.text_span == 1 and all(o.span == 1 for o in s.objects)


@given(st.integers(0, 10**6), st.integers(0, 3))
@settings(max_examples=40)
def test_answers_follow_from_the_scene(index, draw):
    s = make_scene(77, index)
    objs = s.objects
    for k in QA_CLASSES:
        q = ask(s, k, draw)
        if q is None:
            continue
        text = q.text.lower()
        if k == "ocr":
            assert q.answer == str(s.number)
        elif k == "scene":
            assert q.answer == s.background
        elif k == "reasoning":
            expect = str(sum(map(int, str(s.number)))) if "digit" in text else ("yes" if s.number > 50 else "no")
            assert q.answer == expect
        elif k == "counting":
            named = [c for c in COLORS if re.search(rf"\b{c}\b", text)]
            if named:
                assert q.answer == str(sum(o.color == named[0] for o in objs))
            else:
                shape = next(sh for sh in SHAPES if sh in text)
                assert q.answer == str(sum(o.shape == shape for o in objs))
        elif k == "existence":
            pair = next((c, sh) for c in COLORS for sh in SHAPES if f"{c} {sh}" in text)
            assert q.answer == ("yes" if pair in {(o.color, o.shape) for o in objs} else "no")
        elif k == "attribute":
            if q.answer in COLORS:
                shape = next(sh for sh in SHAPES if sh in text)
                assert [o.color for o in objs if o.shape == shape] == [q.answer]
            else:
                colour = next(c for c in COLORS if c in text)
                assert [o.shape for o in objs if o.color == colour] == [q.answer]
        elif k == "spatial":
            pairs = [(o, text.index(f"{o.color} {o.shape}")) for o in objs if f"{o.color} {o.shape}" in text]
            (a, _), (b, _) = sorted(pairs, key=lambda p: p[1])
            if text.startswith("relative to"):
                a, b = b, a
            (ar, ac), (br, bc) = a.center, b.center
            truth = {"left of": ac < bc, "right of": ac > bc, "above": ar < br, "below": ar > br}
            rel = next(r for r in truth if r in text)
            assert q.answer == ("yes" if truth[rel] else "no")


def test_every_question_and_answer_tokenises_without_unknowns():
    tok = tb_model.build_tokenizer()
    unk = tok.unk_token_id
    for w in answer_words():
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    for i in range(60):
        for q in ask_all(make_scene(5, i), draws=3):
            ids = tok(tb_model.prompt(q.text), add_special_tokens=False)["input_ids"]
            assert unk not in ids, q.text


def test_split_examples_never_repeat_a_question_of_a_scene():
    ex = examples("test", 80)
    keys = [(e.index, e.question.klass, e.question.text) for e in ex]
    assert len(keys) == len(set(keys))
    # two draws: some class has a second, different question for most scenes
    assert sum(e.question.klass == "counting" for e in ex) > 1.5 * 80


def test_existence_negatives_are_adversarial():
    hard = total = 0
    for e in examples("test", 60):
        if e.klass == "existence" and e.question.answer == "no":
            s = scene("test", e.index)
            pair = next((c, sh) for c in COLORS for sh in SHAPES if f"{c} {sh}" in e.question.text)
            total += 1
            hard += pair[0] in {o.color for o in s.objects} and pair[1] in {o.shape for o in s.objects}
    assert total > 10 and hard / total > 0.8


# -- the training layout --------------------------------------------------------------------------
def test_pixels_equal_the_processor():
    _, tok = tb_model.build(0)
    proc = tb_model.build_processor(tok)
    imgs = [scene("val", i).image for i in range(2)]
    ref = proc(images=imgs, text=[tb_model.prompt("What color is the square?")] * 2, return_tensors="pt")
    assert torch.equal(pixels(imgs), ref["pixel_values"])


def test_packed_questions_equal_single_prompts(mini):
    """A packed training sequence computes each question exactly as its single-turn prompt."""
    model, proc = tb_model.load(mini)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # make the check sensitive: large random weights
    packer = Packer(proc.tokenizer, 576)
    scenes = [scene("val", 3), scene("val", 4)]
    qs = [ask_all(s, draws=2) for s in scenes]
    ids, mask, pos, slots, _ = packer.pack(qs)
    with torch.no_grad():
        feats = model.model.vision_tower(pixels([s.image for s in scenes]), output_hidden_states=True).hidden_states[-1][:, 1:]
        emb = model.get_input_embeddings()(ids).masked_scatter((ids == packer.image_id)[..., None],
                                                              model.model.multi_modal_projector(feats))
        h = model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
        packed = model.lm_head(h[slots[:, 0], slots[:, 1]])
        flat = [(s, q) for s, ql in zip(scenes, qs, strict=True) for q in ql]
        batch = proc(images=[s.image for s, _ in flat], text=[tb_model.prompt(q.text) for _, q in flat],
                     return_tensors="pt", padding=True)
        solo = model(**batch).logits[:, -1]
    assert packed.shape == solo.shape
    torch.testing.assert_close(packed, solo, atol=1e-4, rtol=1e-4)
    assert packed.std() > 0.1
    # the answers in the slots are the questions' answers
    assert [proc.tokenizer.decode([int(a)]) for a in slots[:, 2]] == [q.answer for _, q in flat]


# -- training -------------------------------------------------------------------------------------
def test_training_resumes_to_the_same_weights(tmp_path):
    straight = train(mini_config(), tmp_path / "a", log=lambda m: None)
    part = train(mini_config(checkpoint_every=2), tmp_path / "b", log=lambda m: None, max_minutes=0)
    assert not part["finished"] and part["step"] == 2  # paused after the first checkpoint
    resumed = train(mini_config(checkpoint_every=2), tmp_path / "b", log=lambda m: None)
    assert resumed["finished"] and straight["finished"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [p["loss"] for p in straight["curve"]] == [p["loss"] for p in resumed["curve"]]


# -- eval, data parallel, ablate, calibrate, demo --------------------------------------------------
def _strip(report: dict) -> dict:
    """A report without wall-clock fields and the process count."""
    out = json.loads(json.dumps(report))
    out.pop("processes")
    for r in [out["unpruned"], *out["runs"]]:
        r.pop("prefill_ms_per_example")
    return out


def test_eval_cli_writes_json_png_and_matches_the_api(mini, tmp_path, capsys):
    from tokenprune_lab.testbed.evaluate import Variant, evaluate

    from tokenprune.spec import load_spec

    assert main(["eval", "--model", str(mini), "--scenes", "2", "--budgets", "16,64", "--quiet",
                 "--out", str(tmp_path), "--name", "r"]) == 0
    text = capsys.readouterr().out
    assert "unpruned" in text and "clasp" in text
    report = json.loads((tmp_path / "r.json").read_text())
    assert (tmp_path / "r.png").stat().st_size > 10_000
    assert [r["budget"] for r in report["runs"]] == [16, 64]
    assert report["runs"][0]["retained"] == pytest.approx(16 / 576, abs=1e-3)
    model, proc = tb_model.load(mini)
    api = evaluate(model, proc, [Variant("clasp", load_spec(REPO / "specs/clasp.toml"))], [16, 64], "test", scenes=2)
    assert _strip(api) == _strip(report)


def test_eval_cli_runs_own_count_and_in_llm_presets(tmp_path):
    """Pooling runs once at its own count; FastV's budget is what is left after layer 1 (the
    shipped model: the miniature LLM has one layer)."""
    assert main(["eval", "--scenes", "1", "--budgets", "32", "--quiet", "--out", str(tmp_path),
                 "--name", "m", "--spec", str(REPO / "specs/methods/pool-3x3.toml"),
                 "--spec", str(REPO / "specs/methods/fastv-matched.toml")]) == 0
    runs = {r["variant"]: r for r in json.loads((tmp_path / "m.json").read_text())["runs"]}
    assert runs["pool-3x3"]["budget"] is None and runs["pool-3x3"]["tokens_per_image"] == 64
    assert runs["fastv-matched"]["budget"] == 32 and runs["fastv-matched"]["tokens_per_image"] == 32


def test_data_parallel_eval_equals_single_process(mini, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU) gives the single-process result."""
    common = ["eval", "--model", str(mini), "--scenes", "3", "--budgets", "32", "--batch", "4", "--quiet",
              "--threads", "1", "--spec", str(REPO / "specs/clasp.toml"), "--spec",
              str(REPO / "specs/variants/random.toml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port, so parallel or back-to-back runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = [
        [sys.executable, "-m", "tokenprune.cli", *common, "--out", str(tmp_path / "one"), "--name", "r"],
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "-m", "tokenprune.cli", *common, "--out", str(tmp_path / "two"), "--name", "r"],
    ]
    for cmd in runs:
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd[:6])} ... failed:\n{done.stderr[-3000:]}"
    one = json.loads((tmp_path / "one" / "r.json").read_text())
    two = json.loads((tmp_path / "two" / "r.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2
    assert _strip(one) == _strip(two)


def test_ablate_cli(mini, tmp_path, capsys):
    assert main(["ablate", str(REPO / "specs/ablations/router.toml"), "--model", str(mini), "--scenes", "1",
                 "--budgets", "32", "--quiet", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "ablation-router.md").read_text()
    for name in ("oracle (true class)", "classifier (CLASP default)", "keyword", "embedding (MiniLM)", "none (general)"):
        assert f"| {name} | 32 |" in md
    report = json.loads((tmp_path / "ablation-router.json").read_text())
    oracle = next(r for r in report["runs"] if r["oracle_router"])
    assert oracle["routing_accuracy"] == 1.0


def test_every_shipped_ablation_loads():
    from tokenprune_lab.testbed.ablation import load_ablation

    files = sorted((REPO / "specs/ablations").glob("*.toml"))
    assert {f.stem for f in files} >= {"fusion", "scoring", "completion", "pivot-ratio", "router", "alternatives"}
    for f in files:
        _, variants = load_ablation(f)
        assert len(variants) >= 2


def test_ablation_errors_name_the_variant(tmp_path):
    from tokenprune_lab.testbed.ablation import load_ablation

    f = tmp_path / "bad.toml"
    f.write_text(f'name = "x"\nbase = "{REPO / "specs/clasp.toml"}"\n[[variant]]\nname = "v"\n'
                 'completion = { stage = "nope" }\n')
    with pytest.raises(ValueError, match="variant 'v'.*nope"):
        load_ablation(f)
    f.write_text(f'name = "x"\nbase = "{REPO / "specs/clasp.toml"}"\n[[variant]]\nname = "v"\nbudget_typo = 3\n')
    with pytest.raises(ValueError, match="unknown keys"):
        load_ablation(f)
    f.write_text('name = "x"\nbudgets = "many"\n')  # the file's own fields: a clear error, not a NameError
    with pytest.raises(ValueError, match=r"ablation file '.*bad.toml': 2 problems\n  - missing base, variant\n  - 'budgets': Input should be a valid list"):
        load_ablation(f)


@pytest.mark.parametrize("objective", ["agreement", "accuracy", "kl"])
def test_calibrate_writes_a_table_a_spec_can_use(mini, tmp_path, objective):
    out = tmp_path / "table.toml"
    assert main(["calibrate", "--model", str(mini), "--scenes", "1", "--budgets", "32", "--strategies", "A,E",
                 "--ratios", "0.25,0.75", "--quiet", "--out", str(out), "--guard-z", "0",
                 "--objective", objective]) == 0
    table = ClassTable.load(out)
    grid = json.loads(out.with_suffix(".json").read_text())["grid"]
    rank = {"accuracy": lambda m: (m["accuracy"], m["mean_logp"]), "agreement": lambda m: (m["agreement"], -m["kl"]),
            "kl": lambda m: (-m["kl"], m["agreement"])}[objective]
    for c in QA_CLASSES:
        cells = {k: v for k, v in grid[c].items() if k != "unpruned"}
        assert set(cells) == {"A/0.25", "A/0.75", "E/0.25", "E/0.75"}
        best = max(cells, key=lambda k: rank(cells[k]))
        e = table.classes[c]
        assert f"{e.strategy}/{e.pivot_ratio:g}" == best and e.bands == ()  # one budget: no bands
    spec = tmp_path / "spec.toml"
    spec.write_text((REPO / "specs/clasp.toml").read_text().replace('class_table = "default"', 'class_table = "table.toml"'))
    from tokenprune.spec import load_spec

    assert load_spec(spec).class_table == table


def test_an_interrupted_calibration_keeps_every_finished_class(mini, tmp_path, monkeypatch):
    """Each class's evaluation keeps its checkpoint until every class is fitted: stopped in its
    second class, a calibration resumes without answering the first class again, fits the table
    an uninterrupted run fits, and only then deletes the checkpoints."""
    from tokenprune_lab.testbed import calibrate as cal
    from tokenprune_lab.testbed.model import load as load_model
    from tokenprune_lab.testbed.resume import Interrupted

    from tokenprune.spec import load_spec

    model, processor = load_model(mini)
    base = load_spec(REPO / "specs/clasp.toml")
    args = dict(scenes=1, budgets=(32,), strategies=("A",), ratios=(0.5,), batch_size=4)
    whole, _ = cal.calibrate(model, processor, base, **args)
    files = lambda c: tmp_path / f".table-{c}.partial.json"  # noqa: E731
    real, calls = cal.evaluate, []

    def stop_in_the_second_class(*a, **kw):
        calls.append(kw["classes"][0])
        if len(calls) == 2:
            raise Interrupted("kept 0 of 1 finished batches in f.json; the same command resumes from them")
        return real(*a, **kw)

    monkeypatch.setattr(cal, "evaluate", stop_in_the_second_class)
    with pytest.raises(Interrupted) as stop:
        cal.calibrate(model, processor, base, **args, checkpoint=files)
    assert str(stop.value) == (f"calibration: classes finished: {calls[0]} (kept until every class is fitted); "
                               f"class '{calls[1]}': kept 0 of 1 finished batches in f.json; the same command "
                               "resumes from them")
    assert files(calls[0]).exists()
    monkeypatch.setattr(cal, "evaluate", real)
    seen: list[tuple[int, int, str]] = []
    table, _ = cal.calibrate(model, processor, base, **args, checkpoint=files,
                             progress=lambda done, total, c: seen.append((done, total, c)))
    assert [d for d, _, c in seen if c == calls[0]] == [seen[0][0]]  # the finished class is read back, not re-run
    assert {t for _, t, _ in seen} == {seen[-1][0]}  # one estimate for the whole calibration, reached at its end
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    assert table == whole
    assert not list(tmp_path.glob(".table-*"))


def test_calibration_guard_keeps_the_pooled_row_unless_a_cell_beats_it_beyond_noise():
    from tokenprune_lab.testbed.calibrate import _guarded

    pooled = [True] * 50 + [False] * 50
    clear = [True] * 80 + [False] * 20            # +0.30 over 100 paired questions: far beyond 2 SE
    noise = [True] * 52 + [False] * 48            # +0.02: noise
    win = _guarded("A/0.5", "E/0.25", {"A/0.5": clear, "E/0.25": pooled}, 1.96)
    assert win["chosen"] == "A/0.5" and win["delta"] == 0.3 and win["p"] < 0.001
    keep = _guarded("A/0.5", "E/0.25", {"A/0.5": noise, "E/0.25": pooled}, 1.96)
    assert keep["chosen"] == "E/0.25" and "pooled row kept" in keep["why"]
    assert _guarded("A/0.5", "E/0.25", {"A/0.5": noise, "E/0.25": pooled}, 0)["chosen"] == "A/0.5"  # no guard
    # 4 discordant pairs to 0 on 104 questions: +0.038 passes 1.96 normal SEs (0.037) but the exact
    # McNemar p is 0.125, so the pooled row stays
    base = [True] * 52 + [False] * 52
    few = [True] * 56 + [False] * 48
    t = _guarded("A/0.5", "E/0.25", {"A/0.5": few, "E/0.25": base}, 1.96)
    assert t["delta"] > 1.96 * t["se"] and t["p"] == 0.125 and t["chosen"] == "E/0.25"


def test_bands_are_one_per_budget_up_to_the_last_that_differs_and_merge_equal_neighbours():
    from tokenprune_lab.testbed.calibrate import _bands

    def decided(*cells):
        return [{"budget": b, "chosen": c} for b, c in zip((8, 16, 32, 64), cells, strict=True)]

    assert _bands(decided("X", "X", "own", "own"), "own") == [(16, "X")]
    assert _bands(decided("X", "own", "Y", "own"), "own") == [(8, "X"), (16, "own"), (32, "Y")]
    assert _bands(decided("own", "own", "own", "own"), "own") == []
    assert _bands(decided("own", "own", "own", "Z"), "own") == [(32, "own"), (64, "Z")]


def test_calibrate_fits_bands_where_a_budget_prefers_another_cell(mini, tmp_path):
    """Without the guard, every budget's best cell is its band (unless it is the own cell), the
    table round-trips through TOML, and a spec that reads it gets each budget's band."""
    out = tmp_path / "table.toml"
    assert main(["calibrate", "--model", str(mini), "--scenes", "2", "--budgets", "8,32", "--strategies", "A,E",
                 "--ratios", "0,1", "--quiet", "--out", str(out), "--guard-z", "0"]) == 0
    table = ClassTable.load(out)
    grid = json.loads(out.with_suffix(".json").read_text())
    for c in QA_CLASSES:
        own = grid["guard"][c]["chosen"]
        best = {d["budget"]: d["best"] for d in grid["bands"][c]}
        assert [d["chosen"] for d in grid["bands"][c]] == [best[8], best[32]]
        e = table.classes[c]
        for b in (8, 32):
            cell = e.cell(b)
            assert f"{cell.strategy}/{cell.pivot_ratio:g}" == best[b]
        assert f"{e.cell(None).strategy}/{e.cell(None).pivot_ratio:g}" == own
    assert table.classes["general"].bands == ()


def test_calibrate_with_the_guard_records_each_decision(mini, tmp_path):
    out = tmp_path / "table.toml"
    assert main(["calibrate", "--model", str(mini), "--scenes", "1", "--budgets", "32", "--strategies", "A,E",
                 "--ratios", "0.25", "--quiet", "--out", str(out)]) == 0
    table = ClassTable.load(out)
    grid = json.loads(out.with_suffix(".json").read_text())
    for c in QA_CLASSES:
        g = grid["guard"][c]
        e = table.classes[c]
        assert f"{e.strategy}/{e.pivot_ratio:g}" == g["chosen"] and g["chosen"] in (g["best"], g["pooled"])
        # one scene: no difference can beat its noise, so every class keeps the pooled row
        assert g["chosen"] == g["pooled"]


def test_the_demo_says_when_routing_changes_nothing():
    from tokenprune_lab.testbed.demo import routing_note

    import tokenprune as tp
    from tokenprune.classes import ClassTable
    from tokenprune.spec import load_spec

    spec = load_spec(REPO / "specs/clasp.toml")
    rows = {c: {"strategy": "B", "pivot_ratio": 0.5} for c in ClassTable.default().classes}
    uniform = tp.Pipeline(spec.replace(class_table={"classes": rows}))
    assert "same cell at 8 tokens, so routing changes nothing" in routing_note(uniform, 8)
    rows["ocr"] = {"strategy": "B", "pivot_ratio": 0.5, "bands": [{"up_to": 16, "strategy": "B", "pivot_ratio": 0.0}]}
    banded = tp.Pipeline(spec.replace(class_table={"classes": rows}))
    assert routing_note(banded, 8) == "" and "same cell at 64" in routing_note(banded, 64)
    assert "reads no class" in routing_note(tp.Pipeline(load_spec(REPO / "specs/variants/divprune.toml")), 8)


def test_demo_writes_overlays(mini, tmp_path, capsys):
    assert main(["demo", "--model", str(mini), "--out", str(tmp_path), "--budget", "48"]) == 0
    out = capsys.readouterr().out
    assert out.count("routed to") == 9 and "kept 48/576" in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["scene0.png", "scene1.png", "scene2.png"]


def test_training_curve_plot(mini, tmp_path):
    record = json.loads((mini / "training.json").read_text())
    assert {p["stage"] for p in record["curve"]} == {1, 2}
    assert all(k in p for p in record["curve"] if p["stage"] == 2 for k in ("loss", "max_objects"))
    out = tmp_path / "curve.png"
    assert main(["testbed", "curve", "--model", str(mini), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
