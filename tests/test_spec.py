"""Spec loading, validation errors that name the field and the choices, and stage swapping."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from helpers import clasp_spec, make_tokens
from pydantic import ValidationError

import tokenprune as tp
from tokenprune.classes import CLASSES, ClassTable

# Pipeline specs; specs/ablations/ holds ablation files (tests/test_testbed.py loads those).
SPECS = sorted(p for p in Path("specs").rglob("*.toml") if "ablations" not in p.parts)
ALTERNATIVES = {
    "router": ["keyword", "embedding", "fixed"],
    "fusion": ["class-adaptive", "single-layer", "mean"],
    "scoring": ["cls-attention", "received-attention", "text-similarity", "feature-norm", "random"],
    "selection": ["top-k"],
    "completion": ["clasp", "none", "random", "grid", "divprune", "visionzip", "vispruner", "dpp", "dart",
                   "prumerge+"],
    "budget_policy": ["class-table", "fixed"],
}


def _data(**changes):
    d = tp.load_spec("specs/clasp.toml").resolved()
    d.update(changes)
    return d


@pytest.mark.parametrize("path", SPECS, ids=str)
def test_every_shipped_spec_validates_and_runs(path):
    spec = tp.load_spec(path)
    L = 24
    tokens = make_tokens(2, 16, L=L, grid=(4, 4))
    pipe = tp.Pipeline(spec)
    fixed = pipe.fixed_budget(tokens)
    if fixed is not None:  # pooling keeps one token per cell and takes no budget
        sel = pipe(tokens)
        window = spec.completion.window
        assert sel.counts.tolist() == fixed.tolist() == [math.ceil(4 / window) ** 2] * 2
        return
    sel = pipe(tokens, budget=5)
    assert sel.counts.tolist() == [5, 5]


@pytest.mark.parametrize("field,stage", [(f, s) for f, ss in ALTERNATIVES.items() for s in ss])
def test_any_one_stage_swaps_without_code_changes(field, stage):
    """The 'done when' criterion: swap one stage of specs/clasp.toml and run."""
    text = Path("specs/clasp.toml").read_text()
    spec = tp.load_spec("specs/clasp.toml").replace(**{field: {"stage": stage}})
    assert spec.stage_name(field) == stage
    tokens = make_tokens(3, 16, L=24, grid=(4, 4), valid_counts=[16, 9, 12])
    sel = tp.Pipeline(spec)(tokens, budget=6)
    assert sel.counts.tolist() == [6, 6, 6]
    assert Path("specs/clasp.toml").read_text() == text


def test_unknown_stage_lists_the_choices():
    with pytest.raises(ValidationError) as err:
        tp.PipelineSpec.model_validate(_data(completion={"stage": "kmeanz"}))
    msg = str(err.value)
    assert "completion" in msg and "unknown completion 'kmeanz'" in msg
    for name in ALTERNATIVES["completion"]:
        assert name in msg


def test_bad_stage_parameter_names_the_field():
    with pytest.raises(ValidationError, match=r"completion\.iterations"):
        tp.PipelineSpec.model_validate(_data(completion={"stage": "clasp", "iterations": 0}))
    with pytest.raises(ValidationError, match=r"completion\.iteration: unknown parameter; its parameters are .*iterations"):
        tp.PipelineSpec.model_validate(_data(completion={"stage": "clasp", "iteration": 3}))


@pytest.mark.parametrize("budget", [0, -3])
def test_budget_must_be_positive(budget):
    with pytest.raises(ValidationError, match="budget"):
        tp.PipelineSpec.model_validate(_data(budget=budget))
    with pytest.raises(ValueError, match="budget must be > 0"):
        tp.Pipeline(clasp_spec())(make_tokens(1, 8), budget=budget)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratios_outside_unit_interval_are_rejected(ratio):
    with pytest.raises(ValidationError, match=r"budget_policy\.ratio"):
        tp.PipelineSpec.model_validate(_data(budget_policy={"stage": "fixed", "ratio": ratio}))
    table = tp.load_spec("specs/clasp.toml").resolved()["class_table"]
    table["classes"]["ocr"]["pivot_ratio"] = ratio
    with pytest.raises(ValidationError, match="pivot_ratio"):
        ClassTable.model_validate(table)
    with pytest.raises(ValidationError, match="budget_ratio"):
        tp.PipelineSpec.model_validate(_data(budget=None, budget_ratio=ratio if ratio > 1 else 0))


def test_class_table_with_missing_classes_names_them():
    table = tp.load_spec("specs/clasp.toml").resolved()["class_table"]
    del table["classes"]["counting"], table["classes"]["scene"]
    with pytest.raises(ValidationError, match=r"missing classes \['counting', 'scene'\]"):
        ClassTable.model_validate(table)


def test_class_table_with_wrong_number_of_layers():
    rows = {c: {"weights": [0.0, 1.0, 2.0], "pivot_ratio": 0.5} for c in CLASSES}
    with pytest.raises(ValidationError, match="needs 'num_layers'"):
        ClassTable.model_validate({"classes": rows})
    rows["ocr"] = {"weights": [0.0, 1.0], "pivot_ratio": 0.5}
    with pytest.raises(ValidationError, match="'ocr' has 2 layer weights but num_layers = 3"):
        ClassTable.model_validate({"num_layers": 3, "classes": rows})
    rows["ocr"] = {"weights": [0.0, 1.0, 2.0], "pivot_ratio": 0.5}
    table = ClassTable.model_validate({"num_layers": 3, "classes": rows})
    spec = clasp_spec(L=4, class_table=table.model_dump())
    with pytest.raises(ValueError, match="explicit weights for 3 encoder layers, but this encoder has 4"):
        tp.Pipeline(spec)(make_tokens(1, 8, L=4), budget=3)


def test_minus_inf_weights_switch_layers_off_and_are_never_read():
    rows = {c: {"weights": [-math.inf, 0.0, 1.0, -math.inf], "pivot_ratio": 0.5} for c in CLASSES}
    spec = clasp_spec(L=4, class_table={"num_layers": 4, "classes": rows})
    tokens = make_tokens(2, 10, L=4)
    pipe = tp.Pipeline(spec)
    req = pipe.requirements(pipe.route(tokens.prompts), 4)
    assert req.layers == {2, 3} and req.cls_attention == {3}
    only = tp.VisualTokens(**{**tokens.__dict__, "layers": {2: tokens.layers[2], 3: tokens.layers[3]}})
    assert torch.equal(pipe(only, budget=4).indices, pipe(tokens, budget=4).indices)


def test_extra_top_level_key_is_forbidden():
    with pytest.raises(ValidationError, match="budgett"):
        tp.PipelineSpec.model_validate(_data(budgett=3))


def test_both_budget_forms_is_an_error():
    with pytest.raises(ValidationError, match="at most one"):
        tp.PipelineSpec.model_validate(_data(budget=3, budget_ratio=0.5))


def test_class_table_path_is_relative_to_the_spec(tmp_path):
    table = ClassTable.default().model_dump(exclude_none=True)
    table["classes"]["ocr"]["pivot_ratio"] = 0.9
    import json

    def keys(row: dict) -> str:
        return "\n".join(f"{k} = {json.dumps(v)}" for k, v in row.items() if k != "bands")

    body = "\n".join(  # a band is an array-of-tables entry under its class
        f"[classes.{c}]\n{keys(row)}" + "".join(f"\n[[classes.{c}.bands]]\n{keys(b)}" for b in row.get("bands", ()))
        for c, row in table["classes"].items()
    )
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "mine.toml").write_text(body + "\n")
    spec_text = Path("specs/clasp.toml").read_text().replace('class_table = "default"', 'class_table = "tables/mine.toml"')
    (tmp_path / "s.toml").write_text(spec_text)
    spec = tp.load_spec(tmp_path / "s.toml")
    assert spec.class_table.classes["ocr"].pivot_ratio == 0.9
    assert spec.class_table.classes["ocr"].bands == ClassTable.default().classes["ocr"].bands
    (tmp_path / "s2.toml").write_text(spec_text.replace("tables/mine.toml", "tables/none.toml"))
    with pytest.raises(ValueError, match=r"spec file '.*s2\.toml': \[class_table\] .*none\.toml' does not exist"):
        tp.load_spec(tmp_path / "s2.toml")


def test_budget_forms():
    counts = torch.tensor([10, 4, 7])
    assert tp.resolve_budget(5, counts).tolist() == [5, 4, 5]
    assert tp.resolve_budget(0.5, counts).tolist() == [5, 2, 4]
    assert tp.resolve_budget([1, 9, 2], counts).tolist() == [1, 4, 2]
    with pytest.raises(ValueError, match="needs 3 entries"):
        tp.resolve_budget([1, 2], counts)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        tp.resolve_budget(1.5, counts)
    with pytest.raises(TypeError):
        tp.resolve_budget(True, counts)
    with pytest.raises(TypeError, match="integers"):
        tp.resolve_budget(torch.tensor([1.0, 2.0, 3.0]), counts)


def test_contract_rejects_bad_inputs():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"\(B, M, Dv\)"):
        tp.VisualTokens(layers={1: torch.randn(5, 4)}, num_layers=2)
    with pytest.raises(TypeError, match="float32"):
        tp.VisualTokens(layers={1: x.long()}, num_layers=2)
    with pytest.raises(ValueError, match="all layers must agree"):
        tp.VisualTokens(layers={1: x, 2: x.half()}, num_layers=2)
    with pytest.raises(ValueError, match=r"mask must be a \(2, 5\) bool"):
        tp.VisualTokens(layers={1: x}, num_layers=2, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="out of range"):
        tp.VisualTokens(layers={7: x}, num_layers=2)
    with pytest.raises(ValueError, match="3 prompts for a batch of 2"):
        tp.VisualTokens(layers={1: x}, num_layers=2, prompts=["a", "b", "c"])
    tokens = tp.VisualTokens(layers={1: x}, num_layers=2, prompts=["a", "b"])
    with pytest.raises(KeyError, match=r"encoder layer 2 \(asked as 2\) was not supplied; the inputs carry layers \[1\]"):
        tp.Pipeline(clasp_spec(L=2, fusion={"stage": "single-layer", "layer": 2}))(tokens, budget=2)
    with pytest.raises(KeyError, match="cls_attention at encoder layer 1"):
        tp.Pipeline(clasp_spec(L=2, fusion={"stage": "single-layer", "layer": 1}))(tokens, budget=2)
    spec = clasp_spec(L=2, scoring={"stage": "text-similarity"}, fusion={"stage": "single-layer", "layer": 1})
    with pytest.raises(KeyError, match="text_embedding"):
        tp.Pipeline(spec)(tokens, budget=2)
    spec = clasp_spec(L=2, completion={"stage": "grid"}, fusion={"stage": "single-layer", "layer": 1},
                      scoring={"stage": "feature-norm"})
    with pytest.raises(ValueError, match="needs token positions"):
        tp.Pipeline(spec)(tokens, budget=2)
    spec = clasp_spec(L=2, scoring={"stage": "feature-norm"}, fusion={"stage": "single-layer", "layer": 1})
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 3, 0] = bad  # one value of one real token of row 1
        with pytest.raises(ValueError, match=r"not finite \(NaN or inf\) at row 1, token 3 \(1 real tokens.*"
                                             r"hidden states \[1\] already hold them"):
            tp.Pipeline(spec)(tp.VisualTokens(layers={1: y}, num_layers=2, prompts=["a", "b"]), budget=2)
    y = x.clone()
    y[1, 3, 0] = float("nan")  # on a padding token: never kept, so not an error
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    mask[1, 3] = False
    tp.Pipeline(spec)(tp.VisualTokens(layers={1: y}, num_layers=2, prompts=["a", "b"], mask=mask), budget=2)
    attn = torch.rand(2, 5)
    attn[0, 2] = float("nan")
    spec = clasp_spec(L=2, scoring={"stage": "cls-attention", "layer": 1}, fusion={"stage": "single-layer", "layer": 1})
    with pytest.raises(ValueError, match=r"cls_attention at encoder layer 1 is not finite \(NaN or inf\) at row 0, token 2 "
                                         r"\(1 real tokens in the batch\): the stages would select from it"):
        tp.Pipeline(spec)(tp.VisualTokens(layers={1: x}, num_layers=2, prompts=["a", "b"], cls_attention={1: attn}),
                          budget=2)
    keys = torch.randn(2, 5, 3)
    keys[1, 4, 2] = float("inf")
    with pytest.raises(ValueError, match=r"attention_keys at encoder layer 1 is not finite \(NaN or inf\) at row 1, token 4"):
        tp.Pipeline(spec.replace(completion={"stage": "visionzip", "key_layer": 1}))(
            tp.VisualTokens(layers={1: x}, num_layers=2, prompts=["a", "b"], cls_attention={1: attn.nan_to_num()},
                            attention_keys={1: keys}), budget=2)
    spec = clasp_spec(L=2, scoring={"stage": "feature-norm"}, fusion={"stage": "single-layer", "layer": 1})
    big = x.clone()
    big[0, 2, 0] = 3e38  # a finite feature whose squared norm overflows float32: the scorer itself makes the inf
    with pytest.raises(ValueError, match=r"the scoring stage 'feature-norm' \(tokenprune_plugins\.scoring\.FeatureNorm, "
                                         r"distribution tokenprune .*\) gave a non-finite score .* at row 0, token 2"):
        tp.Pipeline(spec)(tp.VisualTokens(layers={1: big}, num_layers=2, prompts=["a", "b"]), budget=2)


def test_spec_file_errors_name_the_file_and_tables_without_library_internals(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nbudgt = 3\n[completion]\nstage = "kmeanz"\n')
    with pytest.raises(ValueError) as err:
        tp.load_spec(bad)
    msg = str(err.value)
    assert msg.startswith(f"spec file '{bad}': 2 problems")  # the stages it leaves out have defaults
    assert "unknown key 'budgt'; valid keys: budget, budget_policy, budget_ratio" in msg
    assert "[completion] unknown completion 'kmeanz'; valid choices: clasp," in msg
    assert "input_value" not in msg and "pydantic" not in msg
    bad.write_text('name = "x"\nbudget = "x"\n[completion]\nstage = "clasp"\nk = "two"\n')
    with pytest.raises(ValueError) as err:  # a top-level key is named as a key, a table's key under its table
        tp.load_spec(bad)
    assert "  - 'budget': Input should be a valid integer" in str(err.value) and "[budget]" not in str(err.value)
    assert "  - [completion] " in str(err.value)
    bad.write_text('name = "x"\n[scoring]\nstage = "feature-norm"\n')  # a completion has no default
    with pytest.raises(ValueError, match=r"missing \[completion\]"):
        tp.load_spec(bad)
    bad.write_bytes(b'name = "x"\n\x8e\x00\xff')  # not text at all: the file is named, not the codec
    with pytest.raises(ValueError, match=rf"spec file '{re.escape(str(bad))}' is not UTF-8 text \(byte 0x8e at offset 11\)"):
        tp.load_spec(bad)


def test_every_preset_loads_by_name_as_its_file():
    from tokenprune.spec import presets

    found = presets()
    assert {"clasp", "visionzip", "divprune", "dart-llm-released", "clasp-qwen"} <= set(found)
    for name, path in found.items():
        assert path.stem == name
        assert tp.load_spec(name) == tp.load_spec(path)
    stems = [p.stem for folder in ("", "methods", "variants") for p in (Path("specs") / folder).glob("*.toml")]
    assert len(stems) == len(set(stems)) == len(found), "two presets share a name"


def test_an_unknown_spec_name_lists_the_presets():
    with pytest.raises(FileNotFoundError, match=r"spec file 'visonzip' does not exist and no preset has that name; "
                                                r"presets: clasp, .*visionzip"):
        tp.load_spec("visonzip")


def test_a_budget_is_parsed_once_into_one_value():
    """Every form the API takes parses to a Budget (itself when already one); keep-all is a value."""
    counts = torch.tensor([10, 4, 7])
    for given, form, expected in [(5, "tokens", [5, 4, 5]), (0.5, "ratio", [5, 2, 4]), ([1, 9, 2], "per_image", [1, 4, 2]),
                                  (torch.tensor([1, 9, 2]), "per_image", [1, 4, 2]), (torch.tensor(3), "tokens", [3, 3, 3])]:
        b = tp.Budget.parse(given)
        assert b.form == form and tp.Budget.parse(b) is b and b.counts(counts).tolist() == expected
    assert tp.KEEP_ALL.counts(counts).tolist() == [10, 4, 7] and str(tp.KEEP_ALL) == "every token"
    assert str(tp.Budget.parse([8, 4])) == "[8, 4] tokens per image"
    with pytest.raises(ValueError, match=r"needs 3 entries \(one per image\).*one token count per image, in the order "
                                         r"the images appear in the batch \(prompt by prompt\); give 3 counts"):
        tp.Budget.parse([8, 4]).counts(counts)
    with pytest.raises(ValueError, match="flat list of token counts"):
        tp.Budget.parse([[1, 2]])
    spec = clasp_spec()
    assert spec.budget_or_default(None) == tp.Budget.parse(spec.budget) and spec.budget_or_default(0.25).ratio == 0.25


# -- budget bands of the class table ([ours]) --------------------------------------------------------
def _banded(ocr_bands, **ocr):
    rows = {c: {"strategy": "B", "pivot_ratio": 0.5} for c in CLASSES}
    rows["ocr"] = {"strategy": "B", "pivot_ratio": 0.5, **ocr, "bands": ocr_bands}
    return ClassTable.model_validate({"classes": rows})


def test_a_band_serves_the_budgets_up_to_its_edge_and_the_row_serves_the_rest():
    table = _banded([{"up_to": 8, "strategy": "E", "pivot_ratio": 0.0}, {"up_to": 32, "strategy": "B", "pivot_ratio": 0.25}])
    budgets = torch.tensor([1, 8, 9, 32, 33, 576])
    got = table.pivot_ratio(("ocr",) * 6, budgets).tolist()
    assert got == [0.0, 0.0, 0.25, 0.25, 0.5, 0.5]
    assert table.pivot_ratio(("ocr",), None).tolist() == [0.5]      # budgets unknown: the row's own cell
    assert table.pivot_ratio(("scene",) * 2, torch.tensor([8, 64])).tolist() == [0.5, 0.5]  # no bands
    deep = table.alpha(("ocr", "ocr"), 12, budgets=torch.tensor([8, 64]))  # (2, 12)
    assert int(deep[0].argmax()) == 11 and int(deep[1].argmax()) == 4  # E peaks at the last layer, B near 0.45
    assert table.band_edges() == (8, 32) and table.has_bands
    with pytest.raises(ValueError, match="one budget per row"):
        table.pivot_ratio(("ocr", "ocr"), torch.tensor([8]))


def test_bands_out_of_order_or_with_wrong_weights_are_refused():
    with pytest.raises(ValidationError, match=r"strictly increasing up_to, got \[32, 8\]"):
        _banded([{"up_to": 32, "strategy": "B", "pivot_ratio": 0.1}, {"up_to": 8, "strategy": "B", "pivot_ratio": 0.1}])
    with pytest.raises(ValidationError, match="'ocr' gives explicit weights, so the table needs 'num_layers'"):
        _banded([{"up_to": 8, "weights": [0.0, 1.0], "pivot_ratio": 0.1}])
    with pytest.raises(ValidationError, match="up_to"):
        _banded([{"up_to": 0, "strategy": "B", "pivot_ratio": 0.1}])


def test_a_banded_table_steers_the_pipeline_by_each_rows_budget():
    """Rows of one batch with budgets in different bands get their own band's pivot ratio, and a
    fusion's requirements (asked before the budgets are known) cover the layers of every band."""
    table = _banded([{"up_to": 4, "strategy": "E", "pivot_ratio": 0.0}])
    spec = clasp_spec(L=12, class_table=table.model_dump(), router={"stage": "fixed", "class_name": "ocr"},
                      fusion={"stage": "class-adaptive", "min_weight": 0.01, "feed": "selection"})
    tokens = make_tokens(2, 16, L=12, grid=(4, 4))
    pipe = tp.Pipeline(spec)
    sel = pipe(tokens, budget=torch.tensor([4, 8]))
    assert sel.pivot_ratio.tolist() == [0.0, 0.5]
    assert (sel.provenance[0] == int(tp.Provenance.PIVOT)).sum() == 0 and (sel.provenance[1] == int(tp.Provenance.PIVOT)).sum() == 4
    routing = pipe.route(tokens.prompts)
    union = pipe.requirements(routing, 12).layers
    own = tp.Pipeline(spec.replace(class_table=_banded([]).model_dump())).requirements(routing, 12).layers
    assert 12 in union and 12 not in own and own < union


# -- specs that extend others; presets that carry only their stages -----------------------------------
def test_a_spec_extends_another_and_changes_only_what_it_names(tmp_path):
    (tmp_path / "tables").mkdir()
    table = ClassTable.default().model_dump(exclude_none=True)
    table["classes"]["ocr"]["pivot_ratio"] = 0.875
    import json

    (tmp_path / "tables" / "t.toml").write_text("\n".join(
        f"[classes.{c}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in row.items() if k != "bands")
        for c, row in table["classes"].items()) + "\n")
    (tmp_path / "base.toml").write_text('extends = "clasp"\nname = "base"\nclass_table = "tables/t.toml"\n'
                                        '[completion]\niterations = 3\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.toml").write_text('extends = "../base.toml"\nname = "child"\n'
                                                 '[scoring]\nstage = "feature-norm"\n')
    clasp = tp.load_spec("specs/clasp.toml").resolved()
    child = tp.load_spec(tmp_path / "sub" / "child.toml")
    got = child.resolved()
    assert got["name"] == "child" and got["budget"] == clasp["budget"]
    assert got["completion"] == {**clasp["completion"], "iterations": 3}           # same stage: merged
    assert got["scoring"] == {"stage": "feature-norm", "space": "decoder"}          # other stage: replaced
    assert got["router"] == clasp["router"] and got["fusion"] == clasp["fusion"]
    assert child.class_table.classes["ocr"].pivot_ratio == 0.875  # the base's path, read from the base's folder


def test_extends_refuses_a_circle_and_an_unknown_base(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\nname = "a"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\nname = "b"\n')
    with pytest.raises(ValueError, match=r"extends goes round in a circle \(.*a\.toml -> .*b\.toml -> .*a\.toml\)"):
        tp.load_spec(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('extends = "no-such-preset"\nname = "c"\n')
    with pytest.raises(FileNotFoundError, match="no preset has that name; presets: clasp"):
        tp.load_spec(tmp_path / "c.toml")


def test_a_clasp_ablation_variant_is_a_few_lines_that_extend_clasp():
    paper = Path("specs/variants/clasp-paper.toml").read_text()
    assert 'extends = "../clasp.toml"' in paper and len(paper.splitlines()) <= 10
    spec, clasp = tp.load_spec("clasp-paper").resolved(), tp.load_spec("clasp").resolved()
    assert {k for k in spec if spec[k] != clasp.get(k)} == {"name", "description", "completion"}
    assert spec["completion"] == {**clasp["completion"], "representative": "medoid"}


def test_presets_declare_only_the_stages_they_use():
    import tomllib

    from tokenprune.spec import spec_file

    pool = tomllib.loads(Path("specs/methods/pool-2x2.toml").read_text())
    assert set(pool) == {"name", "description", "completion"}
    for name in ("pool-3x3", "divprune", "grid", "random"):
        data = tomllib.loads(spec_file(name).read_text())
        assert not set(data) & {"router", "class_table", "scoring", "selection", "budget_policy"}, name
    spec = tp.load_spec("pool-2x2")
    assert spec.stage_name("scoring") == "none" and spec.stage_name("router") == "fixed"
    assert spec.scoring.requirements(24).cls_attention == frozenset()  # no attention captured for nothing


def test_pivots_from_no_saliency_are_refused_naming_both_stages():
    spec = tp.PipelineSpec.model_validate({"name": "p", "completion": {"stage": "none"},
                                           "budget_policy": {"stage": "fixed", "ratio": 0.5}})
    with pytest.raises(ValueError, match=r"budget_policy stage 'fixed'.* gives pivots .* scoring stage 'none'.* carries no saliency"):
        tp.Pipeline(spec)(make_tokens(1, 8), budget=4)
