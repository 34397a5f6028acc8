"""Writing a command's output files: never replace one silently."""

from __future__ import annotations

import sys
import time
from pathlib import Path

__all__ = ["announce_replacing"]


def announce_replacing(*paths: str | Path) -> list[Path]:
    """Say on stderr which of ``paths`` already exist and are about to be replaced, with when
    they were written; returns those paths. Call it right before writing."""
    existing = [Path(p) for p in paths if Path(p).exists()]
    for p in existing:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(p.stat().st_mtime))
        print(f"tokenprune: replacing {p} (written {when})", file=sys.stderr)
    return existing
