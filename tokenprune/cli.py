"""The ``tokenprune`` command line: the core's commands, then every command a plugin registers
through ``register_commands`` (the lab's: :mod:`tokenprune_lab.cli`).

- ``tokenprune plugins``: every registered stage (with its parameters), adapter and command, with
  the distribution that provides it, and what ``TOKENPRUNE_DISABLE`` switched off.
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
from .registry import DISABLE_VARIABLE, RegistryError, get_registry
from .spec import load_spec, spec_file
from .stages import KINDS


def examples(*lines: tuple[str, str]) -> dict[str, Any]:
    """``add_parser`` keyword arguments that show ``lines`` (a command line and what it does) under
    the command's ``--help``. The tests parse every example shown, so one that stops parsing fails."""
    width = max(len(cmd) for cmd, _ in lines) + 2
    return {"epilog": "examples:\n" + "\n".join(f"  {cmd:<{width}}{what}" for cmd, what in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


class Commands:
    """What a ``register_commands`` hook receives: :meth:`add_parser` gives a new command its own
    ``argparse`` parser, on which the plugin adds its flags and ``set_defaults(func=run)``, ``run``
    taking the parsed arguments and returning the exit status. A name registered twice is refused,
    that command alone: running it says which distributions clash and how to switch one off; every
    other command works. A command named in ``TOKENPRUNE_DISABLE`` (``command:NAME``) is not added."""

    def __init__(self, sub: argparse._SubParsersAction, registry: Any = None):
        self._sub = sub
        self._registry = registry
        #: command -> the distribution that registered it (as ``tokenprune plugins`` shows it)
        self.owners: dict[str, str] = {}
        #: command -> every distribution that registered it, for a name registered twice or more
        self.clashes: dict[str, list[str]] = {}
        self._parsers: dict[str, argparse.ArgumentParser] = {}
        #: who registers the commands being added now (a distribution, as ``tokenprune plugins`` shows it)
        self.origin = "tokenprune (core)"

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if self._registry is not None and self._registry.disabled.hits(f"command:{name}",
                                                                        what=f"command '{name}' of {self.origin}"):
            return _detached(name)  # the plugin's flags land on a parser no one reads
        if name in self.owners:
            self.clashes.setdefault(name, [self.owners[name]]).append(self.origin)
            return _detached(name)
        self.owners[name] = self.origin
        self._parsers[name] = self._sub.add_parser(name, **kwargs)
        return self._parsers[name]

    def refuse_clashes(self) -> None:
        """Make each command registered twice refuse to run, naming who registered it (call after
        every plugin has added its commands, so that no later ``set_defaults`` undoes it)."""
        for name, owners in self.clashes.items():
            msg = (f"the command '{name}' is registered by {' and by '.join(owners)}; switch all but one off "
                   f"(TOKENPRUNE_DISABLE=<distribution>, see `tokenprune plugins`) or rename the command in one "
                   "of them. Every other command works.")
            self._parsers[name].set_defaults(func=_refusal(msg))


def _detached(name: str) -> argparse.ArgumentParser:
    """A parser for a command that is not added (switched off, or registered twice)."""
    return argparse.ArgumentParser(prog=f"tokenprune {name}", add_help=False)


def _refusal(message: str):
    def refuse(args: argparse.Namespace) -> int:
        raise RegistryError(message)
    return refuse


def _default_spec() -> Path:
    """``specs/clasp.toml`` of the working directory, else the shipped preset (checkout or installed)."""
    here = Path("specs/clasp.toml")
    return here if here.exists() else spec_file("clasp")


def cmd_plugins(args: argparse.Namespace) -> int:
    reg = get_registry()
    commands: Commands = args.commands
    if args.json:
        out = {
            "stages": [{"kind": i.kind, "name": i.name, "distribution": i.distribution, "version": i.version,
                        "class": f"{i.cls.__module__}.{i.cls.__qualname__}", "parameters": i.parameters()}
                       for i in reg],
            "adapters": [{"model_class": a.model_class, "distribution": a.distribution, "version": a.version,
                          "class": f"{a.cls.__module__}.{a.cls.__qualname__}"} for a in reg.adapters.values()],
            "commands": [{"name": n, "distribution": o, "clash": commands.clashes.get(n)}
                         for n, o in sorted(commands.owners.items())],
            "disabled": {"variable": DISABLE_VARIABLE, "entries": list(reg.disabled.entries),
                         "matched": reg.disabled.matched, "unmatched": reg.disabled.unmatched()},
        }
        print(json.dumps(out, indent=2, default=str))
        return 0
    _print_stages(reg)
    print("\n[adapters]  model families tokenprune.apply prunes (register_adapters)")
    for a in reg.adapters.values():
        print(f"  {a.model_class:<44} {a.distribution} {a.version:<8} {a.cls.__module__}.{a.cls.__qualname__}")
    print("\n[commands]  tokenprune COMMAND (register_commands)")
    for name, owner in sorted(commands.owners.items()):
        clash = commands.clashes.get(name)
        print(f"  {name:<20} {owner}" + (f"   REFUSED: also registered by {', '.join(clash[1:])}" if clash else ""))
    if reg.disabled.entries:
        print(f"\n[disabled]  {DISABLE_VARIABLE}={','.join(reg.disabled.entries)}")
        for entry, what in reg.disabled.matched.items():
            print(f"  {entry}: " + "; ".join(what))
        for entry in reg.disabled.unmatched():
            print(f"  {entry}: matches nothing (a distribution, KIND:NAME, adapter:CLASS or command:NAME)")
    return 0


def _print_stages(reg: Any) -> None:
    for kind in KINDS.values():
        print(f"\n[{kind.name}]  {kind.summary}  ({kind.hook}, tokenprune.stages.{kind.base.__name__})")
        for name in reg.names(kind.name):
            info = reg.get(kind.name, name)
            params = ", ".join(
                f"{p}={_short(v['default'])}" if not v["required"] else f"{p} (required)"
                for p, v in info.parameters().items()
            )
            print(f"  {info.name:<20} {info.distribution} {info.version:<8} {params}")


#: the longest default `tokenprune plugins` prints in full (`--json` gives every value whole)
SHOWN = 80


def _short(value: Any) -> str:
    """A parameter's default as `tokenprune plugins` lists it: whole when short, else its start and
    how long it is (a router's keyword table runs to thousands of characters)."""
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN - 20]}... ({len(text)} characters; --json shows it)"


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
    for p, q, c, conf in zip(prompts, routing.questions or prompts, routing.classes, routing.confidence.tolist(), strict=True):
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
    registry = get_registry()  # every command beyond the core's comes from a plugin, the lab's included
    commands = Commands(sub, registry)
    p.set_defaults(commands=commands)

    pl = commands.add_parser("plugins", help="list registered stages, adapters and commands, and what is switched off",
                             **examples(("tokenprune plugins", "every stage, adapter and command, and who registers it"),
                                        ("tokenprune plugins --json", "the same as JSON")))
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=cmd_plugins)

    sp = commands.add_parser("spec", help="work with pipeline specs")
    spsub = sp.add_subparsers(dest="spec_command", required=True)
    show = spsub.add_parser("show", help="print the resolved spec",
                            **examples(("tokenprune spec show specs/clasp.toml", "every default filled in, as TOML"),
                                       ("tokenprune spec show divprune --json", "a preset by name, as JSON")))
    show.add_argument("file", help="a spec TOML file, e.g. specs/clasp.toml")
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    show.set_defaults(func=cmd_spec_show)

    ro = commands.add_parser("route", help="the class a router gives each question (from a prompt as the model sees it)",
                             **examples(('tokenprune route "What number is on the sign?"', "the shipped router's class"),
                                        ('tokenprune route --router keyword --explain "How many cats?"',
                                         "which rules matched")))
    ro.add_argument("prompt", nargs="*", help="prompts to route (default: one per line on stdin)")
    ro.add_argument("--router", help="router stage name, e.g. keyword or embedding (default: the spec's)")
    ro.add_argument("--spec", help="spec (file or preset name) whose router is used (default: specs/clasp.toml)")
    ro.add_argument("--explain", action="store_true", help="why: the rules that match, or the nearest exemplars")
    ro.set_defaults(func=cmd_route)

    for impl in registry.implementations("register_commands"):
        commands.origin = registry.origin(impl.plugin)
        impl.function(**{arg: commands for arg in impl.argnames if arg == "commands"})
    commands.refuse_clashes()
    return p


#: the exceptions :func:`main` reports as one ``tokenprune: error:`` line (bad input), not a traceback
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, RegistryError, ModuleNotFoundError)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except RegistryError as exc:  # a broken or clashing plugin: say which, without a traceback
        print(f"tokenprune: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"tokenprune: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line, what was kept (a resumable job says), no traceback
        print(f"tokenprune: interrupted: {str(exc) or 'nothing was kept; run the same command to start again'}",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`tokenprune plugins | head`): not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- so the interpreter's final flush is silent
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
