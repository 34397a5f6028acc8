"""Reading the project's TOML files (specs, class tables, ablations) with clear errors."""

from __future__ import annotations

import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

__all__ = ["read_toml", "describe_problems"]


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """The parsed file; ``what`` names it in errors ("spec file", "ablation file", ...)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{what} '{path}' is not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what} '{path}' is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                             f"{exc.start}): a TOML file is UTF-8; is it the file you meant?") from None


def _place(model, loc: tuple) -> str:
    """Where a problem is, as the file writes it: ``'budget':`` for a top-level key, ``[router]``
    for a table, ``[router] 'class_name':`` for a key inside one."""
    head = str(loc[0])
    field = model.model_fields.get(head)
    table = field is not None and _is_table(field.annotation)
    if not table:
        return f"'{'.'.join(str(x) for x in loc)}':"
    return f"[{head}]" + (f" '{'.'.join(str(x) for x in loc[1:])}':" if len(loc) > 1 else "")


def _is_table(annotation) -> bool:
    """Whether a field holds a TOML table: a pydantic model or a dict (optional or not)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    return any((isinstance(a, type) and issubclass(a, BaseModel)) or typing.get_origin(a) is dict or a is dict
               for a in options)


def describe_problems(exc, model, what: str, path: str | Path) -> str:
    """A pydantic ``ValidationError`` of a file as a user reads it: the file, then one line per
    problem naming the table or key, with the valid choices; no input dumps, no pydantic links."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing" and len(e["loc"]) == 1]
    lines = []
    if missing:
        lines.append(f"missing {', '.join(f'[{m}]' for m in missing)}; copy them from specs/clasp.toml "
                     "or a preset" if what == "spec file" else f"missing {', '.join(missing)}")
    valid = sorted(model.model_fields)
    for e in errors:
        if e["type"] == "missing" and len(e["loc"]) == 1:
            continue
        where = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{where}'; valid keys: {', '.join(valid)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{_place(model, e['loc'])} {msg}" if where else msg)
    head = f"{what} '{path}'"
    return head + ": " + lines[0] if len(lines) == 1 else head + f": {len(lines)} problems\n" + "\n".join(
        f"  - {line}" for line in lines)
