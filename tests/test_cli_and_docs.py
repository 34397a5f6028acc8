"""The command line, the docs' promises, and the README's code."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from tokenprune_lab.bench import stages as bench

import tokenprune as tp
from tokenprune import hookspecs
from tokenprune.cli import main
from tokenprune.stages import KINDS


def test_plugins_lists_every_builtin(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for info in tp.get_registry():
        assert re.search(rf"^\s+{re.escape(info.name)}\s+tokenprune 0\.1\.0", out, re.M), info.name
    assert "iterations=10" in out
    # a long default (the keyword router's table) is shortened, saying how long it is and where it is whole
    assert max(map(len, out.splitlines())) < 300
    assert re.search(r"keywords=\{'reasoning'.*\.\.\. \(\d+ characters; --json shows it\)", out)


def test_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    clasp = next(r for r in out["stages"] if r["kind"] == "completion" and r["name"] == "clasp")
    assert clasp["distribution"] == "tokenprune" and clasp["parameters"]["iterations"]["default"] == 10
    keyword = next(r for r in out["stages"] if r["kind"] == "router" and r["name"] == "keyword")
    assert len(json.dumps(keyword["parameters"]["keywords"]["default"])) > 1000  # whole here
    llava = next(a for a in out["adapters"] if a["model_class"] == "LlavaForConditionalGeneration")
    assert llava["class"] == "tokenprune.adapters.llava.LlavaAdapter" and llava["distribution"] == "tokenprune"
    owners = {c["name"]: c["distribution"] for c in out["commands"]}
    assert owners["plugins"] == "tokenprune (core)" and owners["eval"].startswith("distribution tokenprune")
    assert out["disabled"]["entries"] == [] and out["disabled"]["variable"] == "TOKENPRUNE_DISABLE"


@pytest.mark.parametrize("path", sorted(p for p in Path("specs").rglob("*.toml") if "ablations" not in p.parts), ids=str)
def test_spec_show_prints_a_valid_equivalent_spec(path, capsys, tmp_path):
    assert main(["spec", "show", str(path)]) == 0
    text = capsys.readouterr().out
    data = tomllib.loads(text)
    again = tp.PipelineSpec.model_validate(data)
    assert again.resolved() == tp.load_spec(path).resolved()


def test_cli_errors_are_one_line_messages(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(Path("specs/clasp.toml").read_text().replace('stage = "clasp"', 'stage = "kmeanz"'))
    assert main(["spec", "show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown completion 'kmeanz'" in err and "divprune" in err
    assert main(["spec", "show", str(tmp_path / "missing.toml")]) == 2


def test_bench_stages_runs_and_reports_both_ratios(capsys, tmp_path):
    out_json = tmp_path / "b.json"
    assert main(["bench", "stages", "--shapes", "48x4x16x24", "--batch", "1,2", "--budgets", "8,16",
                 "--repeats", "1", "--quiet", "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "CLASP/matmul" in table and "naive/CLASP" in table and "select / CLASP" in table
    data = json.loads(out_json.read_text())
    rows = data["clasp"]
    assert len(rows) == 4 and all(r["clasp_ms"] > 0 and r["matmul_ms"] > 0 for r in rows)
    methods = data["methods"]
    names = {r["method"] for r in methods}
    assert {"clasp", "visionzip", "vispruner", "cdpruner", "dart", "prumerge-plus", "divprune", "pool-2x2",
            "pool-3x3", "random", "fastv-matched", "pyramid-drop", "dart-llm"} == names
    assert len(methods) == 2 * len(names)  # B = 1 and 2
    for r in methods:  # every method keeps the budget (pooling: one token per 2x2 / 3x3 cell of 8x6)
        want = {"pool-2x2": 12, "pool-3x3": 6}.get(r["method"], 8)
        assert r["kept"] == want and r["select_ms"] > 0, r
    released = data["released"]  # each as-released preset keeps what the released rule keeps
    assert {r["method"] for r in released} == {"visionzip", "divprune", "cdpruner", "vispruner", "dart-llm"}
    for r in released:
        assert r["preset_ms"] > 0 and r["released_ms"] > 0, r
        if r["B"] == 1:  # CDPruner's released rule normalises relevance over the batch, so B = 2 may differ
            assert r["overlap"] == 1.0, r
        want = {"visionzip": (8, 7), "dart-llm": (12, 12)}.get(r["method"], (8, 8))  # [CLS] slot; 4 + 8 * (8 // 8)
        assert (r["kept"], r["released_kept"]) == want, r
    assert all(r["select_vs_clasp"] == 1.0 for r in methods if r["method"] == "clasp")


def test_naive_reference_selects_what_clasp_selects():
    """The naive bench implementation is a hand-written reference of the same pipeline. It seeds
    k-means from pivots, so the pivot ratio is fixed at 0.5 here: the calibrated table gives the
    bench prompt's class (scene) a = 0, whose seeding without pivots the naive form does not write out."""
    spec = tp.load_spec("specs/clasp.toml").replace(budget_policy={"stage": "fixed", "ratio": 0.5})
    pipe = tp.Pipeline(spec)
    tokens = bench.make_inputs(200, 6, 16, 24, 3, "cpu", torch.float64)
    R = 40
    routing = dataclasses.replace(pipe.route(tokens.prompts), budgets=torch.full((3,), R))  # bands read R
    alpha = spec.class_table.alpha(routing.classes, 6, spec.fusion.min_weight, routing.budgets)  # what fusion reads
    a = float(spec.budget_policy.pivot_ratio(routing, spec.class_table)[0])
    k1 = int(a * R + 1e-6)
    sel = pipe(tokens, budget=R)
    iters = bench._iterations(pipe, tokens, R, routing)
    assert iters > 1
    rep = spec.completion.representative
    assert rep == "novel"  # the shipped spec's setting; the paper's medoids below
    naive = bench.naive_clasp(tokens, alpha, k1, R - k1, iters, rep)
    assert [sel.row(b).tolist() for b in range(3)] == naive
    for T in (1, 2):  # stopped before convergence: the medoids use the updated centres (eq. 40, 41)
        for representative in ("medoid", "novel"):
            short = tp.Pipeline(spec.replace(completion={**spec.resolved()["completion"], "iterations": T,
                                                         "representative": representative}))
            assert [short(tokens, budget=R).row(b).tolist() for b in range(3)] == bench.naive_clasp(
                tokens, alpha, k1, R - k1, T, representative)


def test_demo_runs(capsys):
    assert main(["demo", "--synthetic", "--budget", "32"]) == 0
    out = capsys.readouterr().out
    assert "class counting" in out and "class ocr" in out and "P" in out


def _hook_signature(name: str) -> str:
    fn = getattr(hookspecs, name)
    return f"{name}({', '.join(inspect.signature(fn).parameters)})"


def test_every_hook_has_a_docs_section_headed_by_its_signature():
    doc = Path("docs/plugins.md").read_text()
    for name in (k.hook for k in KINDS.values()):
        assert f"### `{_hook_signature(name)}`" in doc, name
        assert getattr(hookspecs, name).__doc__.strip()


README_BLOCKS = re.findall(r"```python\n(.*?)```", Path("README.md").read_text(), re.S)


def test_readme_has_python_blocks():
    assert len(README_BLOCKS) >= 2


@pytest.mark.parametrize("block", README_BLOCKS, ids=[f"block{i}" for i in range(len(README_BLOCKS))])
def test_readme_code_runs(block):
    """Each ```python block of the README, run as written, on its own (one test each, so a slow
    or failing block is named), prints what the page shows: a ``print(...)`` line ending in
    ``# -> TEXT`` must print exactly ``TEXT``."""
    printed = run_printing(block)
    shown = shown_outputs(block)
    assert shown or "print(" not in block, "a block that prints shows what it prints (# -> ...)"
    assert {line: printed.get(line) for line in shown} == shown


def run_printing(code: str) -> dict[int, str]:
    """Run ``code`` and return what each of its ``print`` calls printed, by line number."""
    printed: dict[int, str] = {}

    def record(*args, sep=" ", end="\n", **kwargs):
        printed[sys._getframe(1).f_lineno] = sep.join(map(str, args))

    exec(compile(code, "README.md", "exec"), {"print": record})
    return printed


def shown_outputs(code: str) -> dict[int, str]:
    """What the page says each ``print`` line prints: its ``# -> TEXT`` comment, by line number."""
    return {i: m.group(1).strip() for i, line in enumerate(code.split("\n"), 1)
            if (m := re.search(r"print\(.*#\s*->\s*(.*)$", line))}


def test_a_shown_output_that_drifted_fails_the_check():
    code = "x = [1, 2]\nprint(len(x))   # -> 3\nprint(x)   # -> [1, 2]\n"
    assert shown_outputs(code) == {2: "3", 3: "[1, 2]"}
    assert run_printing(code) == {2: "2", 3: "[1, 2]"}


def test_readme_network_blocks_are_complete_scripts():
    """The ```py blocks need the network (a Hub checkpoint), so they do not run here; each must
    still be a whole script: it compiles, every name it imports exists, and it uses no name it
    neither imports nor defines."""
    import ast
    import builtins
    import importlib

    blocks = re.findall(r"```py\n(.*?)```", Path("README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        tree = ast.parse(block, "README.md")
        known = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    importlib.import_module(a.name)
                    known.add((a.asname or a.name).split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for a in node.names:
                    if not hasattr(module, a.name):  # a submodule (from PIL import Image)
                        importlib.import_module(f"{node.module}.{a.name}")
                    known.add(a.asname or a.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                known.add(node.id)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert used <= known, f"README block uses undefined names {sorted(used - known)}"


def test_readme_names_both_setup_commands():
    text = Path("README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in Path(".ci/run").read_text()


def test_bench_prefill_runs_and_reports_bounds(tmp_path, capsys):
    """`tokenprune bench prefill` on the tiny model: one row per budget, bounds and overhead filled."""
    out = tmp_path / "prefill.json"
    assert main(["bench", "prefill", "--model", "tiny", "--batch", "1,2", "--budgets", "64,32",
                 "--repeats", "1", "--new-tokens", "2", "--device", "cpu", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["batch"], r["budget"], r["pruned"]) for r in rows] == [
        (1, 576, False), (1, 64, True), (1, 32, True), (2, 576, False), (2, 64, True), (2, 32, True)]
    for r in rows:
        assert r["kv_cache_mb"] > 0  # the returned cache is found whatever transformers calls it
        if r["pruned"]:
            T = r["text_tokens"]
            assert r["token_bound"] == pytest.approx((T + 576) / (T + r["budget"]))
            assert 1.0 < r["roofline_bound"] <= r["token_bound"] * 1.5
            assert 0 < r["overhead_share"] < 1
            assert r["flops"] < rows[0]["flops"] * r["batch"]
        assert r["tower_ms"] > 0 and (not r["pruned"] or r["tower_ms"] < r["prefill_ms"])
    assert "roofline bound" in capsys.readouterr().out


def test_bench_prefill_video_case_prunes_whole_clips_by_share(tmp_path):
    """The video case: a Qwen2-VL-shaped model, one 16-frame clip per prompt, 10/25/50 % kept by
    default; the tower is not pruned, so the roofline bound lies below the token bound."""
    out = tmp_path / "video.json"
    assert main(["bench", "prefill", "--model", "qwen2-vl-video", "--batch", "1", "--repeats", "1", "--new-tokens", "2",
                 "--device", "cpu", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["spec"] == "specs/variants/clasp-qwen.toml"
    rows = result["rows"]
    assert [(r["budget"], r["kept"]) for r in rows] == [(512, 512), (0.1, 51), (0.25, 128), (0.5, 256)]
    for r in rows[1:]:
        T = r["text_tokens"]
        assert r["token_bound"] == pytest.approx((T + 512) / (T + r["kept"]))
        assert 1.0 < r["roofline_bound"] < r["token_bound"]
        assert r["flops"] < rows[0]["flops"] and r["kv_cache_mb"] < rows[0]["kv_cache_mb"]
    for r in rows:  # pruned: the encode step is part of the timed calls (unpruned: timed on its own)
        assert r["tower_ms"] > 0 and (not r["pruned"] or r["tower_ms"] < r["prefill_ms"])


# -- one budget grammar on the command line ---------------------------------------------------------
@pytest.mark.parametrize("flag", [["eval", "--budgets"], ["ablate", "specs/ablations/fusion.toml", "--budgets"],
                                  ["calibrate", "--budgets"], ["demo", "--budget"], ["bench", "prefill", "--budgets"]])
def test_every_budget_flag_takes_tokens_or_a_ratio_and_names_itself_on_error(flag):
    from tokenprune.cli import build_parser

    parser = build_parser()
    value = "64,0.25" if flag[-1] == "--budgets" else "0.25"
    got = getattr(parser.parse_args([*flag, value]), flag[-1].lstrip("-"))
    assert got == ([64, 0.25] if flag[-1] == "--budgets" else 0.25)
    assert type(got[0] if isinstance(got, list) else got) is (int if isinstance(got, list) else float)
    for bad, _why in (("abc", "is not a budget"), ("0", "at least one token"), ("1.5", "ratio in (0, 1]"),
                     ("-3", "at least one token")):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*flag, bad])
        assert exc.value.code == 2


def test_budget_errors_name_the_flag_and_come_before_any_output(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--budgets", "0.25,abc"])
    err = capsys.readouterr().err
    assert "argument --budgets: 'abc' is not a budget" in err
    assert main(["demo", "--budget", "10000", "--model", "v1", "--out", "unused"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--budget 10000: this model has 576 visual tokens per image" in err


@pytest.mark.parametrize("command", [["eval"], ["ablate", "specs/ablations/completion.toml"], ["calibrate"]])
def test_a_budget_above_the_tokens_per_image_is_refused_before_the_model_loads(command, capsys, monkeypatch):
    from tokenprune_lab.testbed import model as testbed_model

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the budget was checked")

    monkeypatch.setattr(testbed_model, "load", never)
    assert main([*command, "--budgets", "32,10000", "--model", "v2", "--quiet"]) == 2
    assert "--budgets 10000: this model has 576 visual tokens per image" in capsys.readouterr().err


def test_every_command_and_flag_has_plain_help_text():
    import argparse

    from tokenprune.cli import build_parser

    missing, markup = [], []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        text = parser.format_help()
        if "``" in text or ":func:" in text:
            markup.append(path)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
                missing.append(f"{path} {action.option_strings or action.dest}")

    walk(build_parser(), "tokenprune")
    assert not markup, f"reST markup in --help of {markup}"
    assert not missing, f"flags without help: {missing}"


def test_a_second_run_says_which_outputs_it_replaces(tmp_path, capsys):
    args = ["eval", "--model", "v1", "--scenes", "1", "--budgets", "64", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "replacing" not in capsys.readouterr().err
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"replacing {tmp_path / 'clasp-test-first1.json'} (written " in err  # a partial run is named so
    assert f"replacing {tmp_path / 'clasp-test-first1.png'}" in err


def test_bench_stages_keeps_every_finished_row_when_interrupted(tmp_path, capsys, monkeypatch):
    """Rows stream to stdout and to the JSON file as they finish, so a run stopped in the methods
    table still leaves the CLASP rows on disk."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_methods", interrupted)
    out_json = tmp_path / "b.json"
    assert main(["bench", "stages", "--shapes", "48x4x16x24", "--batch", "1", "--budgets", "8,16", "--repeats", "1",
                 "--quiet", "--json", str(out_json)]) == 130
    assert [r["budget"] for r in json.loads(out_json.read_text())["clasp"]] == [8, 16]
    out, err = capsys.readouterr()
    assert out.count("| cpu | 48x4x16x24 |") == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"tokenprune: interrupted: the 2 finished rows are kept in {out_json}; "
                                            "bench stages does not resume: a new run starts over")


def test_bench_stages_quick_mode_is_one_small_run():
    from tokenprune_lab.cli import QUICK

    from tokenprune.cli import build_parser

    args = build_parser().parse_args(["bench", "stages", "--quick"])
    assert args.quick and QUICK["batch"] == [1] and len(QUICK["budgets"]) == 1 and "," not in QUICK["shapes"]


def test_loading_the_shipped_model_is_quiet_and_leaves_logging_as_it_was(capsys):
    import sys

    from tokenprune_lab.testbed.model import load
    from transformers.utils import logging

    from tokenprune.quiet import quiet_transformers

    before = (logging.get_verbosity(), logging.is_progress_bar_enabled())
    load("v1")
    assert capsys.readouterr().err == ""
    assert (logging.get_verbosity(), logging.is_progress_bar_enabled()) == before
    with pytest.raises(RuntimeError), quiet_transformers():  # what was held back is shown when loading fails
        print("the reader's notice", file=sys.stderr)
        raise RuntimeError("corrupt file")
    assert "the reader's notice" in capsys.readouterr().err


def test_the_adapter_and_command_hooks_have_their_sections():
    assert f"### `{_hook_signature('register_adapters')}`" in Path("docs/adapters.md").read_text()
    assert f"### `{_hook_signature('register_commands')}`" in Path("docs/plugins.md").read_text()
    assert hookspecs.register_adapters.__doc__.strip() and hookspecs.register_commands.__doc__.strip()


def test_plugins_page_lists_every_kind_as_its_record_says():
    doc = Path("docs/plugins.md").read_text()
    for k in KINDS.values():
        row = (f"| `[{k.name}]`{' (optional)' if k.optional else ''} | `tokenprune.stages.{k.base.__name__}` "
               f"| `{k.hook}` | {k.summary} |")
        assert row in doc, row


def test_the_ops_table_names_only_public_helpers_and_all_of_them():
    doc = Path("docs/plugins.md").read_text()
    table = doc[doc.index("## Helpers for stage authors"):doc.index("## What the pipeline checks")]
    named = set(re.findall(r"`(\w+)\(", table))
    helpers = set(tp.ops.__all__)
    assert named == helpers, named ^ helpers


def test_the_in_llm_pages_spec_snippets_are_valid_over_the_clasp_preset():
    """Each ```toml block of docs/in-llm.md, laid over specs/clasp.toml, is a valid spec."""
    blocks = re.findall(r"```toml\n(.*?)```", Path("docs/in-llm.md").read_text(), re.S)
    assert len(blocks) >= 2
    base = tp.load_spec("specs/clasp.toml").resolved()
    for block in blocks:
        snippet = tomllib.loads(block)
        spec = tp.PipelineSpec.model_validate({**base, **snippet})
        assert spec.llm is not None


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings (outside code blocks): lower case, punctuation
    dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def broken_links(pages: list[Path]) -> list[str]:
    """Every relative link of ``pages`` (outside code blocks) whose file or heading anchor is missing."""
    bad = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://|^mailto:", link):
                continue
            path, _, anchor = link.partition("#")
            target = page.parent / path if path else page
            if not target.exists():
                bad.append(f"{page}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text()):
                bad.append(f"{page}: {link} (no heading with that anchor in {target})")
    return bad


def test_every_relative_link_and_anchor_of_the_readme_and_docs_resolves():
    pages = [Path("README.md"), *sorted(Path("docs").rglob("*.md"))]
    assert len(pages) > 10
    assert broken_links(pages) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Top part\n\n[ok](#top-part) [gone](b.md) [wrong](#nowhere)\n"
                                   "```\n[in code](c.md)\n```\n")
    assert broken_links([tmp_path / "a.md"]) == [f"{tmp_path / 'a.md'}: b.md (no such file)",
                                                 f"{tmp_path / 'a.md'}: #nowhere (no heading with that anchor in "
                                                 f"{tmp_path / 'a.md'})"]


def _leaf_parsers(parser, path=("tokenprune",)):
    """Every command's own parser (``tokenprune bench stages``, ``tokenprune eval``, ...) and its words."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaf_parsers(sub, (*path, name))


def test_every_command_shows_examples_that_parse_and_every_flag_says_its_default():
    import argparse
    import shlex

    from tokenprune.cli import build_parser

    leaves = list(_leaf_parsers(build_parser()))
    assert len(leaves) >= 17 and ("tokenprune", "bench", "prefill") in [p for p, _ in leaves]
    for path, leaf in leaves:
        command = " ".join(path)
        assert (leaf.epilog or "").startswith("examples:\n"), f"`{command} --help` shows no examples"
        for line in leaf.epilog.splitlines()[1:]:
            argv = shlex.split(re.split(r"\s{2,}", line.strip())[0])
            assert tuple(argv[:len(path)]) == path, f"`{command} --help` shows an example of another command: {line}"
            build_parser().parse_args(argv[1:])  # an example that no longer parses exits here
        for a in leaf._actions:
            if a.default not in (None, False, argparse.SUPPRESS) and a.help not in (None, argparse.SUPPRESS):
                assert "default" in a.help, f"`{command} --help`: {'/'.join(a.option_strings)} hides its default {a.default!r}"
