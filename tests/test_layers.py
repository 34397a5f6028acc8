"""The import graph keeps four layers apart: the core (with the adapters and the conformance kit),
the plugins, and the lab on top. Read from the source (every import, at any depth of a module)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: what a stage plugin may import from tokenprune: the stage contract and its helpers
CONTRACT = {"tokenprune", "tokenprune.stages", "tokenprune.contract", "tokenprune.classes", "tokenprune.ops",
            "tokenprune.merging", "tokenprune.prompts", "tokenprune.packages", "tokenprune.quiet",
            "tokenprune.checks", "tokenprune.hookspecs"}
#: the names a plugin may take from the package itself
PACKAGE_NAMES = {"hookimpl", "hookspec", "ops", "Routing", "Requirements", "VisualTokens", "Fused", "CLASSES",
                 "ClassTable", "normalize_layer", "grid_positions", "Provenance"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "plugins":
        parts[0] = "tokenprune_plugins"
    elif parts[0] == "lab":  # the lab's distribution: lab/tokenprune_lab/...
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(absolute module, names taken, line)`` for every import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _core_files() -> list[Path]:
    return _files("tokenprune")


def _lab_files() -> list[Path]:
    return _files("lab/tokenprune_lab")


def test_the_core_imports_nothing_from_the_lab():
    found = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in _core_files() + _files("plugins")
             for mod, names, line in imports(p) if mod.startswith("tokenprune_lab")]
    assert not found, found


def test_plugins_import_only_the_stage_contract():
    found = []
    for p in _files("plugins"):
        for mod, names, line in imports(p):
            if not mod.startswith("tokenprune") or mod.startswith("tokenprune_plugins"):
                continue
            if mod not in CONTRACT or (mod == "tokenprune" and not set(names) <= PACKAGE_NAMES):
                found.append(f"{p.relative_to(ROOT)}:{line} imports {mod} {names}")
    assert not found, found


def test_the_adapters_and_the_kit_do_not_reach_up():
    """Adapters sit under apply (never import it or the CLI); the kit tests stages through the
    contract and the registry (never through apply or an adapter)."""
    found = []
    for folder, banned in (("tokenprune/adapters", ("tokenprune.apply", "tokenprune.cli")),
                           ("tokenprune/testing", ("tokenprune.apply", "tokenprune.adapters.base",
                                                   "tokenprune.cli"))):
        for p in _files(folder):
            found += [f"{p.relative_to(ROOT)}:{line} imports {mod}" for mod, _, line in imports(p)
                      if mod.startswith(banned)]
    assert not found, found


@pytest.mark.parametrize("bad, expected", [("from tokenprune_lab.testbed import model\n", "tokenprune_lab.testbed"),
                                           ("def f():\n    import tokenprune_lab.cli\n", "tokenprune_lab.cli")])
def test_the_graph_check_sees_imports_at_any_depth(tmp_path, monkeypatch, bad, expected):
    folder = ROOT / "tokenprune"
    probe = folder / "_probe_layers.py"
    probe.write_text(bad)
    try:
        assert any(mod.startswith(expected) for mod, _, _ in imports(probe))
        with pytest.raises(AssertionError, match="_probe_layers.py"):
            test_the_core_imports_nothing_from_the_lab()
    finally:
        probe.unlink()


def runtime_edges(path: Path, modules: set[str]) -> set[str]:
    """The repository modules ``path`` imports at run time, at any depth (imports under
    ``if TYPE_CHECKING:`` are left out); ``from pkg import name`` counts as an import of
    ``pkg.name`` when that is a module, else of ``pkg``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return (out & modules) - {module}


def import_cycles(paths: list[Path]) -> list[list[str]]:
    """Every circle of the run-time import graph over ``paths``: its strongly connected components
    of two or more modules (Tarjan, iterative), each sorted."""
    modules = {_module_name(p): p for p in paths}
    graph = {m: sorted(runtime_edges(p, set(modules))) for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(graph[v]):
                work.append((v, i + 1))
                w = graph[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return found


def test_the_import_graph_has_no_circle():
    """No module of the core, the plugins or the lab reaches itself through the modules it imports
    at run time (the registry finds plugins through entry points, by name, not by import)."""
    assert import_cycles(_core_files() + _files("plugins") + _lab_files()) == []


def test_the_circle_check_finds_a_planted_circle(tmp_path, monkeypatch):
    pkg = tmp_path / "tokenprune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import x\n")
    (pkg / "c.py").write_text("from tokenprune.a import y\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\nfrom . import c\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert import_cycles(sorted(pkg.glob("*.py"))) == [["tokenprune.a", "tokenprune.b", "tokenprune.c"]]


def test_only_the_kit_imports_pytest_or_hypothesis():
    found = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in _core_files() + _files("plugins")
             if "testing" not in p.relative_to(ROOT).parts
             for mod, _, line in imports(p) if mod.split(".")[0] in ("pytest", "hypothesis")]
    assert not found, found


HELLO = """
    import tokenprune

    def run(args):
        print(f"hello {args.name} from a third party")
        return 0

    @tokenprune.hookimpl
    def register_commands(commands):
        p = commands.add_parser("hello", help="say hello")
        p.add_argument("--name", default="world", help="who to greet")
        p.set_defaults(func=run)
"""

CLASH = """
    import tokenprune

    @tokenprune.hookimpl
    def register_commands(commands):
        commands.add_parser("eval", help="a second eval")
"""


def test_a_third_party_command_joins_the_command_line(site, monkeypatch, capsys):
    from helpers import make_dist

    from tokenprune.cli import build_parser, main
    from tokenprune.registry import Disabled, build_registry

    make_dist(site, "tp-thirdparty-hello", "tp_thirdparty_hello", HELLO)
    reg = build_registry()
    monkeypatch.setattr("tokenprune.cli.get_registry", lambda: reg)
    assert main(["hello", "--name", "lab"]) == 0
    assert capsys.readouterr().out == "hello lab from a third party\n"
    assert "hello" in build_parser().format_help() and "eval" in build_parser().format_help()
    make_dist(site, "tp-thirdparty-clash", "tp_thirdparty_clash", CLASH)
    reg = build_registry()
    monkeypatch.setattr("tokenprune.cli.get_registry", lambda: reg)
    build_parser()  # a clash refuses only the clashing command
    assert main(["hello"]) == 0 and capsys.readouterr().out == "hello world from a third party\n"
    assert main(["eval", "--scenes", "1"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"the command 'eval' is registered by distribution tokenprune-lab [\d.]+ and by distribution "
                     r"tp-thirdparty-clash 1.2.3; switch all but one off \(TOKENPRUNE_DISABLE=<distribution>", err)
    assert main(["plugins"]) == 0
    assert re.search(r"eval +distribution tokenprune-lab [\d.]+ +REFUSED: also registered by distribution "
                     r"tp-thirdparty-clash 1.2.3", capsys.readouterr().out)
    reg = build_registry(disabled=Disabled(("tp-thirdparty-clash",)))  # switched off: eval is the lab's again
    monkeypatch.setattr("tokenprune.cli.get_registry", lambda: reg)
    args = build_parser().parse_args(["eval"])
    assert args.func.__module__ == "tokenprune_lab.cli"
    assert reg.disabled.matched == {"tp-thirdparty-clash": ["distribution tp-thirdparty-clash 1.2.3: entry point "
                                                            "stages = tp_thirdparty_clash"]}


def test_stages_adapters_and_commands_are_switched_off_by_name(monkeypatch, capsys):
    import json

    from tokenprune.cli import main
    from tokenprune.registry import DISABLE_VARIABLE, build_registry

    monkeypatch.setenv(DISABLE_VARIABLE, "completion:grid, adapter:Qwen2VLForConditionalGeneration,command:demo,nope")
    reg = build_registry()
    assert "grid" not in reg.names("completion") and "divprune" in reg.names("completion")
    assert "Qwen2VLForConditionalGeneration" not in reg.adapters and "LlavaForConditionalGeneration" in reg.adapters
    monkeypatch.setattr("tokenprune.cli.get_registry", lambda: reg)
    assert main(["plugins", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {c["name"] for c in out["commands"]} >= {"eval", "plugins"} and "demo" not in {c["name"] for c in out["commands"]}
    assert {a["model_class"] for a in out["adapters"]} >= {"LlavaForConditionalGeneration"}
    assert out["disabled"]["unmatched"] == ["nope"]
    assert set(out["disabled"]["matched"]) == {"completion:grid", "adapter:Qwen2VLForConditionalGeneration", "command:demo"}
    with pytest.raises(SystemExit):
        main(["demo"])
    assert "invalid choice: 'demo'" in capsys.readouterr().err


#: the core's layers, lowest first: a module imports only from its own layer or below (plugins
#: and third-party families come in through entry points, by name, never by an upward import)
CORE_LAYERS: tuple[tuple[str, ...], ...] = (
    ("tomlfile", "quiet", "packages", "outputs", "prompts", "ops", "budget"),  # leaves
    ("contract", "classes", "checks"),  # the stage contract's data
    ("stages", "merging", "hookspecs"),  # what a plugin implements
    ("registry",),  # finds plugins by entry point
    ("spec",),  # a validated choice of stages
    ("pipeline",),  # runs a spec on visual tokens
    ("adapters.sequence", "adapters.capture", "adapters.base", "adapters.patch_grid", "adapters.llava",
     "adapters.onevision", "adapters.qwen", "adapters.llm_site", "adapters"),  # model families
    ("call",),  # one pruned call
    ("apply",),  # the handle on a model
    ("", "cli", "testing", "testing.inputs", "testing.tiny", "testing.conformance", "testing.adapters",
     "testing.plugin", "testing.selected"),  # the package's face: API, command line, the kits
)


def _layer_of() -> dict[str, int]:
    return {("tokenprune." + name).rstrip("."): i for i, names in enumerate(CORE_LAYERS) for name in names}


def upward_imports(paths: list[Path], layer: dict[str, int]) -> list[str]:
    """Every run-time import of a module from a higher layer than the importer's."""
    modules = {_module_name(p): p for p in paths}
    return [f"{m} (layer {layer[m]}) imports {t} (layer {layer[t]})" for m, p in modules.items()
            for t in sorted(runtime_edges(p, set(modules))) if layer[t] > layer[m]]


def test_every_core_module_has_a_layer():
    missing = sorted(set(map(_module_name, _core_files())) - set(_layer_of()))
    assert not missing, f"give these modules a layer in CORE_LAYERS: {missing}"


def test_no_core_module_imports_from_a_higher_layer():
    assert upward_imports(_core_files(), _layer_of()) == []


def test_the_layer_check_finds_an_upward_import(tmp_path, monkeypatch):
    pkg = tmp_path / "tokenprune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops.py").write_text("def f():\n    from .pipeline import Pipeline\n")
    (pkg / "pipeline.py").write_text("from . import ops\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    found = upward_imports(sorted(pkg.glob("*.py")), _layer_of())
    assert found == ["tokenprune.ops (layer 0) imports tokenprune.pipeline (layer 5)"]


def test_the_core_wheel_ships_no_lab_and_importing_the_core_loads_none_of_it(tmp_path):
    """``pip install .`` builds the core alone: no lab module and no testbed weights in its wheel;
    ``import tokenprune`` does not import the lab (which, installed, joins only as a plugin does,
    through its entry point when the registry loads the plugins)."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("tokenprune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("tokenprune_lab") or "testbed" in n], names
    assert "tokenprune/call.py" in names and "tokenprune_plugins/completion.py" in names
    probe = "import sys, tokenprune, tokenprune_plugins; print(sorted(m for m in sys.modules if m.startswith('tokenprune_lab')))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[]"


#: functions longer than LONGEST lines that stay in one piece: numeric kernels whose loop is the
#: algorithm (each one step per pick or per iteration, with its shapes commented inline)
NUMERIC_KERNELS = {"plugins/greedy.py:greedy_dpp_map", "plugins/greedy.py:greedy_max_min",
                   "plugins/vispruner.py:bipartite_dedup", "plugins/kmeans.py:spherical_kmeans"}
LONGEST = 60


def _function_lengths(paths: list[Path]) -> dict[str, int]:
    return {f"{p.relative_to(ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
            for p in paths for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None}


def test_no_function_of_the_core_or_the_plugins_is_longer_than_sixty_lines():
    lengths = _function_lengths(_core_files() + _files("plugins"))
    long = {name: n for name, n in lengths.items() if n > LONGEST and name not in NUMERIC_KERNELS}
    assert not long, f"split these functions (or, for a numeric kernel, say why in NUMERIC_KERNELS): {long}"
    assert set(lengths) >= NUMERIC_KERNELS, f"kernels no longer found: {NUMERIC_KERNELS - set(lengths)}"
