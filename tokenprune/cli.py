"""The ``tokenprune`` command line: the core's commands, then every command a plugin registers
through ``register_commands`` (the lab's: :mod:`tokenprune.lab.cli`).

- ``tokenprune plugins``: every registered stage with its distribution and parameters.
- ``tokenprune spec show FILE``: the resolved spec (all defaults filled in).
- ``tokenprune route``: the class a router gives each question.

The lab adds ``bench``, ``demo``, ``eval``, ``ablate``, ``calibrate``, ``router``, ``results``,
``lmms-eval`` and ``testbed``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from . import __version__
from .registry import RegistryError, get_registry
from .spec import load_spec, spec_file
from .stages import KINDS



class Commands:
    """What a ``register_commands`` hook receives: :meth:`add_parser` gives a new command its own
    ``argparse`` parser, on which the plugin adds its flags and ``set_defaults(func=run)``, ``run``
    taking the parsed arguments and returning the exit status. A name registered twice is an
    error that names both distributions."""

    def __init__(self, sub: argparse._SubParsersAction):
        self._sub = sub
        self._owners: dict[str, str] = {}
        #: who registers the commands being added now (a distribution, as ``tokenprune plugins`` shows it)
        self.origin = "tokenprune (core)"

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if name in self._owners:
            raise RegistryError(f"the command '{name}' is registered twice: by {self._owners[name]} and by "
                                f"{self.origin}; uninstall one or rename its command")
        self._owners[name] = self.origin
        return self._sub.add_parser(name, **kwargs)


def _default_spec() -> Path:
    """``specs/clasp.toml`` of the working directory, else the shipped preset (checkout or installed)."""
    here = Path("specs/clasp.toml")
    return here if here.exists() else spec_file("clasp")


def cmd_plugins(args: argparse.Namespace) -> int:
    reg = get_registry()
    if args.json:
        out = [
            {"kind": i.kind, "name": i.name, "distribution": i.distribution, "version": i.version,
             "class": f"{i.cls.__module__}.{i.cls.__qualname__}", "parameters": i.parameters()}
            for i in reg
        ]
        print(json.dumps(out, indent=2, default=str))
        return 0
    for kind in KINDS.values():
        print(f"\n[{kind.name}]  {kind.summary}  ({kind.hook}, tokenprune.stages.{kind.base.__name__})")
        for name in reg.names(kind.name):
            info = reg.get(kind.name, name)
            params = ", ".join(
                f"{p}={v['default']!r}" if not v["required"] else f"{p} (required)"
                for p, v in info.parameters().items()
            )
            print(f"  {info.name:<20} {info.distribution} {info.version:<8} {params}")
    return 0


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return "-inf" if v == float("-inf") else repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def to_toml(data: dict) -> str:
    """Render a resolved spec as TOML (scalars first, then one table per section)."""
    lines: list[tuple[str, Any]] = []
    tables: list[tuple[str, Any]] = []
    for k, v in data.items():
        (tables if isinstance(v, dict) else lines).append((k, v))
    out = [f"{k} = {_toml_value(v)}" for k, v in lines]
    for k, v in tables:
        if k == "class_table":
            out.append("\n[class_table]")
            out += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items() if kk != "classes"]
            for c, row in v.get("classes", {}).items():
                out.append(f"\n[class_table.classes.{c}]")
                out += [f"{kk} = {_toml_value(vv)}" for kk, vv in row.items()]
            continue
        out.append(f"\n[{k}]")
        out += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None]  # TOML has no null
    return "\n".join(out) + "\n"


def cmd_spec_show(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    data = spec.resolved()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        text = to_toml(data)
        tomllib.loads(text)  # what we print must itself be a valid spec file
        print(text, end="")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline
    from .prompts import extract_question

    spec = load_spec(args.spec or _default_spec())
    if args.router:
        spec = spec.replace(router={"stage": args.router})
    pipe = Pipeline(spec)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    routing = pipe.route(prompts)
    for p, q, c, conf in zip(prompts, routing.questions or prompts, routing.classes, routing.confidence.tolist()):
        print(f"{c:<10} {conf:.2f}  {q}")
        if args.explain:
            parts = extract_question(p)
            if q != p.strip():
                print(f"           question taken from the prompt; set aside: "
                      f"{list(parts.dropped) + list(parts.options) + list(parts.context) or 'template only'}")
            for line in pipe.spec.router.explain(q):
                print(f"           {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenprune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Visual-token pruning for multimodal LLMs: inspect stages and specs, benchmark them, and "
                    "measure accuracy on the testbed.",
        epilog="examples:\n"
               "  tokenprune plugins                          every registered stage\n"
               "  tokenprune spec show specs/clasp.toml       a spec with every default filled in\n"
               "  tokenprune demo                             the testbed model, unpruned and pruned (about 20 s)\n"
               "  tokenprune eval --budgets 64,0.25           accuracy with intervals on the test split\n"
               "  tokenprune results --list                   which figures of docs/results.md are up to date\n"
               "run 'tokenprune COMMAND --help' for a command's flags")
    p.add_argument("--version", action="version", version=f"tokenprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    commands = Commands(sub)

    pl = commands.add_parser("plugins", help="list registered stages")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=cmd_plugins)

    sp = commands.add_parser("spec", help="work with pipeline specs")
    spsub = sp.add_subparsers(dest="spec_command", required=True)
    show = spsub.add_parser("show", help="print the resolved spec")
    show.add_argument("file", help="a spec TOML file, e.g. specs/clasp.toml")
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    show.set_defaults(func=cmd_spec_show)

    ro = commands.add_parser("route", help="the class a router gives each question (from a prompt as the model sees it)")
    ro.add_argument("prompt", nargs="*", help="prompts to route (default: one per line on stdin)")
    ro.add_argument("--router", help="router stage name, e.g. keyword or embedding (default: the spec's)")
    ro.add_argument("--spec", help="spec (file or preset name) whose router is used (default: specs/clasp.toml)")
    ro.add_argument("--explain", action="store_true", help="why: the rules that match, or the nearest exemplars")
    ro.set_defaults(func=cmd_route)

    registry = get_registry()  # every other command comes from a plugin, the lab's included
    for impl in registry.implementations("register_commands"):
        commands.origin = registry.origin(impl.plugin)
        impl.function(**{arg: commands for arg in impl.argnames if arg == "commands"})
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except RegistryError as exc:  # a broken or clashing plugin: say which, without a traceback
        print(f"tokenprune: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RegistryError, ModuleNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"tokenprune: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`tokenprune plugins | head`): not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- so the interpreter's final flush is silent
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
