"""The router's development set: ``data/router_dev.tsv`` (or a file of the same three columns:
class, style, question), each row with its held-out flag (:func:`is_held_out`: fixed by the text,
so adding rows never moves an old one between the parts). Read by the ``classifier`` router (its
``--explain`` names the nearest questions) and by :mod:`tokenprune_plugins.router_fit`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenprune.prompts import extract_question

from .routers import ROUTED

__all__ = ["DevQuestion", "load_dev_set", "is_held_out"]


@dataclass(frozen=True)
class DevQuestion:
    """One labelled question: ``text`` as written, ``question`` what a router reads of it
    (:func:`~tokenprune.prompts.extract_question`: option lists and harness lines set aside)."""

    klass: str
    style: str
    text: str
    held_out: bool

    @property
    def question(self) -> str:
        return extract_question(self.text).text


def is_held_out(text: str) -> bool:
    """True for about 30 % of texts: the SHA-1 of the UTF-8 text, as an integer, is 0-2 modulo 10."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 10 < 3


def load_dev_set(path: str | Path | None = None) -> list[DevQuestion]:
    """The rows of a development set (default: tokenprune's). ``#`` lines and the header are
    skipped; a row with another number of columns, an unknown class or a repeated question is an
    error naming the file and line."""
    if path is None:
        text, where = resources.files("tokenprune_plugins").joinpath("data/router_dev.tsv").read_text(), "router_dev.tsv"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    rows: list[DevQuestion] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#") or line.startswith("class\t"):
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{where}:{n}: expected 3 tab-separated columns (class, style, question), got {len(parts)}")
        klass, style, question = (p.strip() for p in parts)
        if klass not in ROUTED:
            raise ValueError(f"{where}:{n}: unknown class {klass!r}; valid: {list(ROUTED)}")
        key = question.lower()
        if key in seen:
            raise ValueError(f"{where}:{n}: the question {question!r} repeats line {seen[key]}")
        seen[key] = n
        rows.append(DevQuestion(klass, style, question, is_held_out(question)))
    return rows
