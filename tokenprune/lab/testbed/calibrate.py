"""``tokenprune calibrate``: fit CLASP's class table on the testbed's calibration split.

For each class ``c`` and each cell of the grid (layer strategy ``A`` shallow-heavy .. ``E``
deep-heavy) x (pivot ratio), the calibration questions of class ``c`` are answered with CLASP,
routed to their true class (so the cell is what they get) at every calibration budget. The
cell with the best mean accuracy over the budgets wins; ties go to the higher mean log-probability
of the right answer (a finer signal on a small split). ``general``, the router's fallback, gets
the cell that is best averaged over all classes. The calibration split shares no scene with the
test split, so nothing is tuned to the reported figures.

**The guard.** A class's own best cell replaces the pooled (``general``) cell only if it beats it
by more than its paired noise: on that class's calibration questions, over all budgets, the
accuracy difference must exceed ``guard_z`` times its paired standard error (McNemar's
discordant pairs). Otherwise the class keeps the pooled row. On a class the model cannot answer,
the best of 15 cells is noise, and a noise-chosen row (say, shallow layers fed to the LLM) then
hurts on the test split; the guard keeps such a class on the pooled row. ``guard_z = 0`` turns
the guard off (the best cell always wins). What it decided is in the grid's ``guard`` entry.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...classes import CLASSES, STRATEGIES, ClassEntry, ClassTable
from ...spec import PipelineSpec
from .evaluate import Dist, Variant, evaluate
from .memo import memoized_tower
from .questions import QA_CLASSES
from .stats import mcnemar

__all__ = ["calibrate", "table_toml"]


#: Images whose tower outputs calibration keeps for all classes (the calibration split has 200;
#: a v2 row, every hidden state of DINOv2 ViT-S/14 at 336 px in fp32, is about 12 MB).
MEMO_IMAGES = 256


def _cell_name(strategy: str, ratio: float) -> str:
    return f"{strategy}/{ratio:g}"


def calibrate(
    model,
    processor,
    base: PipelineSpec,
    *,
    split: str = "calibration",
    scenes: int | None = None,
    budgets: Sequence[int] = (64, 128),
    strategies: Sequence[str] = tuple(STRATEGIES),
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    temperature: float = 1.0,
    batch_size: int = 16,
    dist: Dist | None = None,
    progress: Callable[[str], Callable[[int, int], None] | None] | None = None,
    source: str = "",
    guard_z: float = 1.96,
    checkpoint: Callable[[str], str | Path | None] | None = None,
) -> tuple[ClassTable, dict[str, Any]]:
    """Returns the fitted table and the grid of scores ``{class: {cell: {accuracy, mean_logp}}}``.
    ``checkpoint``: per class, the file its evaluation resumes from (see
    :func:`~tokenprune.lab.testbed.evaluate.evaluate`), so an interrupted calibration loses at most a
    minute of work."""
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategies {bad}; valid: {list(STRATEGIES)}")
    if not ratios or any(not 0 <= r <= 1 for r in ratios):
        raise ValueError(f"pivot ratios must be in [0, 1], got {list(ratios)}")
    grid: dict[str, dict[str, dict[str, float]]] = {}
    correct: dict[str, dict[str, list[bool]]] = {}  # class -> cell -> correctness over (budget, question)
    cells_of = {_cell_name(s, a): (s, a) for s, a in itertools.product(strategies, ratios)}
    current = base.class_table.model_dump(exclude_none=True)
    with memoized_tower(model, capacity=MEMO_IMAGES):  # each image's tower pass once for all classes
        for c in QA_CLASSES:
            variants = [Variant(name, base.replace(class_table=_with_row(current, c, s, a, temperature)), oracle_router=True)
                        for name, (s, a) in cells_of.items()]
            report = evaluate(model, processor, variants, budgets, split, scenes=scenes, classes=[c], memo=False,
                              batch_size=batch_size, dist=dist, progress=progress(c) if progress else None,
                              checkpoint=checkpoint(c) if checkpoint else None)
            _score(report, budgets, grid.setdefault(c, {}), correct.setdefault(c, {}))

    def best(scores: dict[str, dict[str, float]]) -> str:
        return max(cells_of, key=lambda k: (scores[k]["accuracy"], scores[k]["mean_logp"]))

    def entry(cell: str) -> ClassEntry:
        s, a = cells_of[cell]
        return ClassEntry(strategy=s, temperature=temperature, pivot_ratio=a)

    pooled = {k: {m: sum(grid[c][k][m] for c in QA_CLASSES) / len(QA_CLASSES) for m in ("accuracy", "mean_logp")}
              for k in cells_of}
    general = best(pooled)
    guard = {c: _guarded(best(grid[c]), general, correct[c], guard_z) for c in QA_CLASSES}
    rows = {c: entry(guard[c]["chosen"]) for c in QA_CLASSES}
    rows["general"] = entry(general)
    table = ClassTable(source=source, classes=rows)
    return table, {"budgets": list(budgets), "split": split, "scenes": scenes, "grid": grid, "pooled": pooled,
                   "guard_z": guard_z, "guard": guard}


def _with_row(current: dict, c: str, strategy: str, ratio: float, temperature: float) -> ClassTable:
    """The table ``current`` with class ``c``'s row set to one cell of the grid."""
    rows = {k: dict(v) for k, v in current["classes"].items()}
    rows[c] = {"strategy": strategy, "temperature": temperature, "pivot_ratio": ratio}
    return ClassTable.model_validate({**current, "classes": rows})


def _score(report: dict, budgets: Sequence[int], grid: dict, correct: dict) -> None:
    """One class's grid row (accuracy and mean log-probability averaged over the budgets, and the
    unpruned model's) and its per-question correctness per cell, from its evaluation report."""
    cells: dict[str, dict[str, float]] = {}
    for run in report["runs"]:
        cell = cells.setdefault(run["variant"], {"accuracy": 0.0, "mean_logp": 0.0})
        cell["accuracy"] += run["accuracy"]["overall"] / len(budgets)
        cell["mean_logp"] += run["mean_logp"] / len(budgets)
        correct.setdefault(run["variant"], []).extend(run["correct"])
    grid.update({k: {m: round(v, 5) for m, v in x.items()} for k, x in cells.items()})
    grid["unpruned"] = {"accuracy": report["unpruned"]["accuracy"]["overall"],
                        "mean_logp": report["unpruned"]["mean_logp"]}


def _guarded(best: str, pooled: str, correct: dict[str, list[bool]], z: float) -> dict[str, Any]:
    """The class's best cell if it beats the pooled cell by more than ``z`` paired SEs on the
    class's calibration questions (all budgets), else the pooled cell; with the evidence."""
    if best == pooled:
        return {"best": best, "pooled": pooled, "chosen": best, "delta": 0.0, "se": 0.0, "p": 1.0,
                "why": "the class's best cell is the pooled cell"}
    t = mcnemar(correct[best], correct[pooled])
    wins = t["delta"] > z * t["se"] if z > 0 else True
    why = (f"beats the pooled cell by {t['delta']:+.3f} > {z:g} x paired SE {t['se']:.3f}" if wins else
           f"{t['delta']:+.3f} is within {z:g} x paired SE {t['se']:.3f} of the pooled cell: noise, pooled row kept")
    return {"best": best, "pooled": pooled, "chosen": best if wins else pooled, "delta": round(t["delta"], 4),
            "se": round(t["se"], 4), "p": round(t["p"], 5), "why": why}


def table_toml(table: ClassTable, header: str = "") -> str:
    """The table as a TOML file that a spec's ``class_table = "..."`` can point to."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines.append(f"source = {json.dumps(table.source)}")
    for c in CLASSES:
        e = table.classes[c]
        lines += ["", f"[classes.{c}]", f'strategy = "{e.strategy}"', f"temperature = {e.temperature!r}",
                  f"pivot_ratio = {e.pivot_ratio!r}"]
    return "\n".join(lines) + "\n"
