"""Batch-level checkpoints of an evaluation, so that a long one resumes where it stopped.

An evaluation answers its batches in a fixed order, each with every run, and a batch's records
are plain data. :class:`Checkpoint` keeps the finished batches' records in one JSON file and
writes it at most every ``every`` seconds (atomically: a file interrupted mid-write is never
read). A later evaluation with the same :func:`run_key` (the model's weights, the questions, the
batching, every run's spec and budget, the process's rank) skips the batches the file holds; any
other key starts afresh. The evaluation deletes the file when it finishes.

Prefill times of a resumed evaluation come from the sittings that answered each batch.

An interrupted evaluation (``Ctrl-C``) saves what it finished and raises :class:`Interrupted`,
whose message says what was kept and how to resume; the ``tokenprune`` command prints it as one
line instead of a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["Checkpoint", "Interrupted", "run_key", "model_digest"]


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_key(model: torch.nn.Module, **what: Any) -> str:
    """The identity of an evaluation: the model's weights and ``what`` (JSON-serialisable)."""
    return hashlib.sha256((model_digest(model) + json.dumps(what, sort_keys=True, default=str)).encode()).hexdigest()


class Interrupted(KeyboardInterrupt):
    """A ``Ctrl-C`` that stopped a resumable job after it saved its work; ``str()`` says what was
    kept and how to resume."""


class Checkpoint:
    """The finished batches of one evaluation: ``{run: {batch: record}}``."""

    def __init__(self, path: str | Path | None, key: str = "", every: float = 60.0):
        """``path`` ``None``: records are kept in memory only (nothing is read or written)."""
        self.path, self.key, self.every = (Path(path) if path is not None else None), key, every
        self.results: dict[int, dict[int, dict]] = {}
        self._saved = time.monotonic()
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                data = {}
            if data.get("key") == key:
                self.results = {int(r): {int(b): rec for b, rec in recs.items()} for r, recs in data["results"].items()}

    def finished(self, batches: Sequence[int], runs: int) -> int:
        """How many of ``batches`` every one of ``runs`` runs has answered."""
        return sum(self.done(b, runs) for b in batches)

    def done(self, batch: int, runs: int) -> bool:
        """Whether every one of ``runs`` runs has answered ``batch``."""
        return all(batch in self.results.get(r, {}) for r in range(runs))

    def add(self, run: int, batch: int, record: dict) -> None:
        self.results.setdefault(run, {})[batch] = record

    def maybe_save(self) -> None:
        if self.path is not None and time.monotonic() - self._saved >= self.every:
            self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "results": self.results}))
        os.replace(tmp, self.path)
        self._saved = time.monotonic()

    def finish(self) -> None:
        """The evaluation is complete: the file has served its purpose."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
