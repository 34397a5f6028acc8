"""Builders for random stage inputs, shared by the tests (imported as a plain module)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import tokenprune as tp
from tokenprune.spec import PipelineSpec
from tokenprune.testing.inputs import DTYPES, PROMPTS, batches, make_tokens, permute, row, snapshot

__all__ = ["DTYPES", "PROMPTS", "batches", "make_tokens", "permute", "row", "snapshot", "clasp_spec", "make_dist",
           "page_block", "install_page_block"]


def clasp_spec(L: int = 4, **changes) -> PipelineSpec:
    """specs/clasp.toml, with the scorer pointed at layer L-1 and optional stage swaps."""
    spec = tp.load_spec("specs/clasp.toml")
    changes.setdefault("scoring", {"stage": "cls-attention", "layer": L - 1})
    return spec.replace(**changes)


def make_dist(root: Path, dist: str, module: str, body: str, ep_name: str = "stages",
              group: str = "tokenprune") -> None:
    """A real installed distribution on ``root`` (a ``sys.path`` entry): a module plus a
    dist-info whose entry_points.txt declares ``ep_name = module`` in ``group``."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{ep_name} = {module}\n")


def page_block(page: str, first_line: str) -> str:
    """The one ```python block of ``page`` whose first line is ``first_line``."""
    blocks = re.findall(rf"```python\n({re.escape(first_line)}\n.*?)```", Path(page).read_text(), re.S)
    assert len(blocks) == 1, f"{page} has {len(blocks)} blocks starting {first_line!r}"
    return blocks[0]


def install_page_block(site: Path, monkeypatch, code: str, dist: str, module: str, ep_name: str):
    """``code`` installed as the distribution ``dist`` (module ``module``, entry point ``ep_name``)
    on ``site``, and a registry that sees it, made the process's registry for the test."""
    make_dist(site, dist, module, code, ep_name=ep_name)
    reg = tp.build_registry()
    monkeypatch.setattr("tokenprune.registry.get_registry", lambda: reg)
    return reg
