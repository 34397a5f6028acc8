"""``tokenprune bench router``: what routing costs per prompt, single and batched, side by side.

Every router routes the same questions (the development set's held-out part) twice: one call per
question (what a batch-1 server pays) and one call for all of them (a batch), after a warm-up call
that loads any weights. The classifier router's two parts are timed alone as well: its cues (the
regular expressions) and its MiniLM embedding. Medians of ``repeats`` runs; milliseconds per
question.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["run", "format_table"]


def _per_prompt_ms(fn: Callable[[Sequence[str]], object], questions: Sequence[str], repeats: int, batched: bool) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if batched:
            fn(questions)
        else:
            for q in questions:
                fn([q])
        runs.append((time.perf_counter() - t0) * 1000 / len(questions))
    return statistics.median(runs)


def run(routers: Sequence[str], questions: Sequence[str], repeats: int = 3) -> list[dict]:
    """One row per router (and per part of the classifier): ms per question, single and batched."""
    from tokenprune_plugins.router_classifier import cue_features
    from tokenprune_plugins.routers import embed, minilm_dir

    from tokenprune.registry import get_registry

    timed: list[tuple[str, Callable]] = [(n, get_registry().get("router", n).cls().route) for n in routers]
    if "classifier" in routers:
        path = str(minilm_dir())
        timed += [("classifier: cues alone", cue_features), ("classifier: MiniLM embedding alone", lambda q: embed(q, path))]
    rows = []
    for name, fn in timed:
        fn(questions[:2])  # warm-up: loads weights, compiles patterns
        rows.append({"router": name, "questions": len(questions), "threads": torch.get_num_threads(),
                     "single_ms": _per_prompt_ms(fn, questions, repeats, batched=False),
                     "batched_ms": _per_prompt_ms(fn, questions, repeats, batched=True)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{rows[0]['questions']} questions, {rows[0]['threads']} CPU threads; ms per question (median)", "",
             "| router | one call per question | one call for all |", "|---|---|---|"]
    lines += [f"| {r['router']} | {r['single_ms']:.3f} | {r['batched_ms']:.3f} |" for r in rows]
    return "\n".join(lines)
