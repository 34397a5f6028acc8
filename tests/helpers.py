"""Builders for random stage inputs, shared by the tests (imported as a plain module)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import tokenprune as tp
from tokenprune.spec import PipelineSpec
from tokenprune.testing.inputs import DTYPES, PROMPTS, batches, make_tokens, permute, row, snapshot

__all__ = ["DTYPES", "PROMPTS", "batches", "make_tokens", "permute", "row", "snapshot", "clasp_spec", "make_dist"]


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
