"""``tokenprune calibrate``: fit CLASP's class table on the testbed's calibration split.

For each class ``c`` and each cell of the grid (layer strategy ``A`` shallow-heavy .. ``E``
deep-heavy) x (pivot ratio, by default 0 to 1 in steps of 0.125), the calibration questions of
class ``c`` are answered with CLASP, routed to their true class (so the cell is what they get), at
every calibration budget (by default 8, 16, 32 and 64 tokens: the tight budgets, where cells
differ). A cell is scored by the *objective*:

- ``agreement`` (default): the share of answers equal to the unpruned model's (ties: lower mean
  KL). It ranks with about a tenth of the questions accuracy needs, and it asks of a cell what
  pruning should do, keep the model's answer; on the calibration split only, so the test split
  stays unseen;
- ``accuracy``: the share of right answers (ties: higher mean log-probability of the right
  answer), the rule before the fidelity protocol;
- ``kl``: the mean KL(unpruned || pruned) of the answer distribution, lower is better.

The cell with the best objective over all budgets is the class's own cell; ``general``, the
router's fallback, gets the cell that is best averaged over all classes (the *pooled* cell).

**The guard.** A class's own best cell replaces the pooled cell only if it beats it by more than
its paired noise: on that class's calibration questions, over all budgets, the objective's
difference must exceed ``guard_z`` times its paired standard error (McNemar's discordant pairs for
a share, the per-question differences for KL), and the exact paired test must agree (p below the
two-sided level of ``guard_z``, 0.05 for 1.96: with few discordant pairs the normal rule alone
passes noise). Otherwise the class keeps the pooled cell. On a
class the model cannot answer, the best of 45 cells is noise, and the guard keeps such a class on
the pooled cell. ``guard_z = 0`` turns it off. What it decided is in the grid's ``guard`` entry.

**Budget bands** ([ours], :class:`~tokenprune.classes.ClassEntry`): with ``bands``, each
calibration budget ``b`` gets the cell that is best at ``b`` alone if it beats the class's own cell
at ``b`` beyond the same guard; where any does, the class row holds one band per calibration
budget up to the last such ``b`` (``up_to = b``; consecutive bands with one cell merged), and
budgets above it use the own cell. What was decided per budget is in the grid's ``bands`` entry.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

from tokenprune.classes import CLASSES, STRATEGIES, Band, ClassEntry, ClassTable
from tokenprune.spec import PipelineSpec

from .evaluate import Dist, Variant, answer_count, drop_checkpoint, evaluate
from .memo import memoized_tower
from .protocol import CALIBRATION_BUDGETS, CALIBRATION_RATIOS, OBJECTIVES
from .questions import QA_CLASSES
from .resume import Interrupted
from .stats import mcnemar, paired_mean_test

__all__ = ["calibrate", "table_toml", "calibration_table"]


#: Images whose tower outputs calibration keeps for all classes (the calibration split has 200;
#: a v2 row, every hidden state of DINOv2 ViT-S/14 at 336 px in fp32, is about 12 MB).
MEMO_IMAGES = 256
_METRICS = ("accuracy", "mean_logp", "agreement", "kl")


def _whole_run(progress: Callable[[int, int, str], None] | None, work: dict[str, int],
               klass: str) -> Callable[[int, int], None] | None:
    """Class ``klass``'s evaluation's progress as a share of the whole calibration's."""
    if progress is None:
        return None
    before, total = sum(work[c] for c in QA_CLASSES[:QA_CLASSES.index(klass)]), sum(work.values())
    return lambda done, _: progress(before + done, total, klass)


def _cell_name(strategy: str, ratio: float) -> str:
    return f"{strategy}/{ratio:g}"


def calibrate(
    model,
    processor,
    base: PipelineSpec,
    *,
    split: str = "calibration",
    scenes: int | None = None,
    budgets: Sequence[int] = CALIBRATION_BUDGETS,
    strategies: Sequence[str] = tuple(STRATEGIES),
    ratios: Sequence[float] = CALIBRATION_RATIOS,
    temperature: float = 1.0,
    batch_size: int = 16,
    dist: Dist | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    source: str = "",
    guard_z: float = 1.96,
    checkpoint: Callable[[str], str | Path | None] | None = None,
    objective: str = "agreement",
    bands: bool = True,
) -> tuple[ClassTable, dict[str, Any]]:
    """Returns the fitted table and the grid of scores (``grid``: ``{class: {cell: metrics}}``
    averaged over the budgets; ``by_budget``: ``{class: {budget: {cell: metrics}}}``; ``guard``
    and ``bands``: the decisions). ``checkpoint``: per class, the file its evaluation resumes from
    (see :func:`~tokenprune_lab.testbed.evaluate.evaluate`), kept until every class is fitted, so an
    interrupted calibration loses at most a minute of work, whichever class it was in."""
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategies {bad}; valid: {list(STRATEGIES)}")
    if not ratios or any(not 0 <= r <= 1 for r in ratios):
        raise ValueError(f"pivot ratios must be in [0, 1], got {list(ratios)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown calibration objective '{objective}'; choose one of {list(OBJECTIVES)}")
    cells_of = {_cell_name(s, a): (s, a) for s, a in itertools.product(strategies, ratios)}
    current = base.class_table.model_dump(exclude_none=True)
    fits = {}
    runs = 1 + len(cells_of) * len(budgets)  # the unpruned run and every cell at every budget
    work = {c: answer_count(split, scenes, [c], batch_size, runs, dist) for c in QA_CLASSES}
    with memoized_tower(model, capacity=MEMO_IMAGES):  # each image's tower pass once for all classes
        for i, c in enumerate(QA_CLASSES):
            variants = [Variant(name, base.replace(class_table=_with_row(current, c, s, a, temperature)), oracle_router=True)
                        for name, (s, a) in cells_of.items()]
            try:
                report = evaluate(model, processor, variants, budgets, split, scenes=scenes, classes=[c], memo=False,
                                  batch_size=batch_size, dist=dist, progress=_whole_run(progress, work, c),
                                  checkpoint=checkpoint(c) if checkpoint else None, keep_checkpoint=True)
            except Interrupted as stop:
                finished = ", ".join(QA_CLASSES[:i]) or "none"
                raise Interrupted(f"calibration: classes finished: {finished} (kept until every class is fitted); "
                                  f"class '{c}': {stop}") from None
            fits[c] = _ClassFit(report, budgets, objective)
    pooled = {k: {m: sum(fits[c].grid[k][m] for c in QA_CLASSES) / len(QA_CLASSES) for m in _METRICS}
              for k in cells_of}
    general = _best(pooled, objective)

    def cell(name: str) -> dict[str, Any]:
        s, a = cells_of[name]
        return {"strategy": s, "temperature": temperature, "pivot_ratio": a}

    guard = {c: _guarded(_best(fits[c].grid, objective), general, fits[c].values(), guard_z, objective != "kl")
             for c in QA_CLASSES}
    band_decisions = {c: fits[c].band_decisions(guard[c]["chosen"], guard_z) if bands and len(budgets) > 1 else []
                      for c in QA_CLASSES}
    rows = {c: ClassEntry(**cell(guard[c]["chosen"]), bands=tuple(
        Band(up_to=b, **cell(name)) for b, name in _bands(band_decisions[c], guard[c]["chosen"])))
        for c in QA_CLASSES}
    rows["general"] = ClassEntry(**cell(general))
    table = ClassTable(source=source, classes=rows)
    if checkpoint is not None:  # every class is fitted: the checkpoints kept for each have served
        for c in QA_CLASSES:
            drop_checkpoint(checkpoint(c), dist)
    return table, {"budgets": list(budgets), "split": split, "scenes": scenes, "objective": objective,
                   "grid": {c: fits[c].summary() for c in QA_CLASSES},
                   "by_budget": {c: fits[c].by_budget for c in QA_CLASSES}, "pooled": pooled,
                   "guard_z": guard_z, "guard": guard, "bands": band_decisions}


def _rank(metrics: dict[str, float], objective: str) -> tuple[float, float]:
    """A cell's sort key under ``objective`` (larger is better), with its tie-break."""
    if objective == "accuracy":
        return metrics["accuracy"], metrics["mean_logp"]
    if objective == "kl":
        return -metrics["kl"], metrics["agreement"]
    return metrics["agreement"], -metrics["kl"]


def _best(scores: dict[str, dict[str, float]], objective: str) -> str:
    return max((k for k in scores if k != "unpruned"), key=lambda k: _rank(scores[k], objective))


class _ClassFit:
    """One class's evaluation over the grid: metrics per cell (averaged over the budgets and per
    budget) and the per-question objective values the guard pairs."""

    def __init__(self, report: dict, budgets: Sequence[int], objective: str):
        self.budgets, self.objective = list(budgets), objective
        self.grid: dict[str, dict[str, float]] = {}
        self.by_budget: dict[int, dict[str, dict[str, float]]] = {b: {} for b in budgets}
        self.per_question: dict[str, dict[int, list[float]]] = {}  # cell -> budget -> objective values
        for run in report["runs"]:
            metrics = {"accuracy": run["accuracy"]["overall"], "mean_logp": run["mean_logp"],
                       "agreement": run["agreement"]["overall"], "kl": run["kl"]["overall"]}
            self.by_budget[run["budget"]][run["variant"]] = {m: round(v, 5) for m, v in metrics.items()}
            self.per_question.setdefault(run["variant"], {})[run["budget"]] = _values(run, objective)
        for name, per_budget in self._cells().items():
            self.grid[name] = {m: round(sum(x[m] for x in per_budget) / len(per_budget), 5) for m in _METRICS}
        self.unpruned = {"accuracy": report["unpruned"]["accuracy"]["overall"],
                         "mean_logp": report["unpruned"]["mean_logp"]}

    def _cells(self) -> dict[str, list[dict[str, float]]]:
        names = self.by_budget[self.budgets[0]]
        return {k: [self.by_budget[b][k] for b in self.budgets] for k in names}

    def summary(self) -> dict[str, dict[str, float]]:
        return {**self.grid, "unpruned": self.unpruned}

    def values(self, budgets: Sequence[int] | None = None) -> dict[str, list[float]]:
        """Per cell, the objective values over (budget, question), the budgets in order."""
        return {k: [v for b in (budgets or self.budgets) for v in per[b]] for k, per in self.per_question.items()}

    def band_decisions(self, own: str, z: float) -> list[dict[str, Any]]:
        """Per calibration budget: the best cell there and whether it beats ``own`` beyond noise."""
        out = []
        for b in self.budgets:
            best = _best(self.by_budget[b], self.objective)
            g = _guarded(best, own, self.values([b]), z, self.objective != "kl")
            out.append({"budget": b, **g})
        return out


def _values(run: dict, objective: str) -> list[float]:
    """A run's per-question objective values (larger is better)."""
    if objective == "accuracy":
        return [float(x) for x in run["correct"]]
    if objective == "kl":
        return [-x for x in run["kl_per_question"]]
    return [float(x) for x in run["agree"]]


def _bands(decisions: list[dict[str, Any]], own: str) -> list[tuple[int, str]]:
    """``(up_to, cell)`` bands from the per-budget decisions: one per budget up to the last whose
    chosen cell is not the own cell, consecutive equal cells merged into the larger ``up_to``."""
    chosen = [(d["budget"], d["chosen"]) for d in decisions]
    while chosen and chosen[-1][1] == own:
        chosen.pop()
    out: list[tuple[int, str]] = []
    for b, name in chosen:
        if out and out[-1][1] == name:
            out[-1] = (b, name)
        else:
            out.append((b, name))
    return out


def _with_row(current: dict, c: str, strategy: str, ratio: float, temperature: float) -> ClassTable:
    """The table ``current`` with class ``c``'s row set to one cell of the grid (no bands)."""
    rows = {k: dict(v) for k, v in current["classes"].items()}
    rows[c] = {"strategy": strategy, "temperature": temperature, "pivot_ratio": ratio}
    return ClassTable.model_validate({**current, "classes": rows})


def _guarded(best: str, pooled: str, values: dict[str, list[float]], z: float, binary: bool = True) -> dict[str, Any]:
    """The class's best cell if it beats the pooled cell by more than ``z`` paired SEs on the
    class's calibration questions, else the pooled cell; with the evidence. ``values``: per cell,
    the per-question objective (larger is better; 0/1 when ``binary``, paired by McNemar)."""
    if best == pooled:
        return {"best": best, "pooled": pooled, "chosen": best, "delta": 0.0, "se": 0.0, "p": 1.0,
                "why": "the best cell is the pooled cell"}
    t = mcnemar(values[best], values[pooled]) if binary else paired_mean_test(values[best], values[pooled])
    level = 2 * (1 - NormalDist().cdf(z)) if z > 0 else 1.0  # the two-sided level of z: 0.05 for 1.96
    # both: the normal rule alone passes 4 discordant pairs to 0 (exact p = 0.125) on 100 questions
    wins = t["delta"] > z * t["se"] and t["p"] < level if z > 0 else True
    why = (f"beats the pooled cell by {t['delta']:+.3f} > {z:g} x paired SE {t['se']:.3f}, paired p = {t['p']:.3g}"
           if wins else f"{t['delta']:+.3f} against paired SE {t['se']:.3f} and paired p = {t['p']:.3g} (needs "
           f"> {z:g} SE and p < {level:.3g}): noise, pooled row kept")
    return {"best": best, "pooled": pooled, "chosen": best if wins else pooled, "delta": round(t["delta"], 4),
            "se": round(t["se"], 4), "p": round(t["p"], 5), "why": why}


def calibration_table(grid: dict[str, Any]) -> str:
    """What the fitted table does per class and budget (markdown): the own cell with its objective
    beside the pooled cell's, and per calibration budget the best cell there and the band chosen."""
    objective = grid.get("objective", "accuracy")
    budgets = grid["budgets"]
    head = f"| class | own cell ({objective}) | pooled cell | " + " | ".join(f"R = {b}" for b in budgets) + " |"
    lines = [head, "|" + "---|" * (len(budgets) + 3)]
    for c, g in grid["guard"].items():
        own, pooled = g["chosen"], g["pooled"]
        cells = [f"{own} ({grid['grid'][c][own][objective]:.3f})", f"{pooled} ({grid['grid'][c][pooled][objective]:.3f})"]
        for d in grid.get("bands", {}).get(c, []) or [{} for _ in budgets]:
            if not d:
                cells.append("")
                continue
            per = grid["by_budget"][c]
            at = per.get(d["budget"], per.get(str(d["budget"])))  # int keys in memory, str keys from JSON
            mark = "**" if d["chosen"] != own else ""
            cells.append(f"{mark}{d['chosen']}{mark} ({at[d['chosen']][objective]:.3f}; own {at[own][objective]:.3f})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_toml(table: ClassTable, header: str = "") -> str:
    """The table as a TOML file that a spec's ``class_table = "..."`` can point to."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines.append(f"source = {json.dumps(table.source)}")
    for c in CLASSES:
        e = table.classes[c]
        lines += ["", f"[classes.{c}]", f'strategy = "{e.strategy}"', f"temperature = {e.temperature!r}",
                  f"pivot_ratio = {e.pivot_ratio!r}"]
        for band in e.bands:
            lines += ["", f"[[classes.{c}.bands]]", f"up_to = {band.up_to}", f'strategy = "{band.strategy}"',
                      f"temperature = {band.temperature!r}", f"pivot_ratio = {band.pivot_ratio!r}"]
    return "\n".join(lines) + "\n"
