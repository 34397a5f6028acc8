"""The paper-style table from lmms-eval output folders: ``tokenprune lmms-eval table DIR...``.

Every ``*_results.json`` under the folders is one row: the run (its ``--output_path`` folder's
name), and the model, spec and budget read from the run's ``model_args``; each task contributes its headline metrics (:data:`HEADLINE`; every
numeric metric for a task not listed). ``rel.`` is the mean, over the row's columns, of the score
as a percentage of the unpruned run (``spec=none``) of the same checkpoint, as pruning papers
report it. Where both runs logged their samples (``--log_samples``) and a task scores each
question 0 or 1, the row also gets an exact McNemar test against the unpruned run on the same
questions (``vs unpruned``: accuracy difference in points, and p).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..testbed.stats import mcnemar
from .model import UNPRUNED_SPECS

__all__ = ["HEADLINE", "collect", "markdown"]

#: the metrics papers report per task (lmms-eval 0.7 names)
HEADLINE = {
    "mme": ("mme_perception_score", "mme_cognition_score"),
    "gqa": ("exact_match",),
    "textvqa_val": ("exact_match",),
    "pope": ("pope_f1_score",),
    "mmbench_en_dev": ("gpt_eval_score",),
    "scienceqa_img": ("exact_match",),
    "tokenprune_testbed": ("accuracy",),
}


def _model_args(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


def _metrics(task: str, scores: dict[str, Any]) -> dict[str, float]:
    names = HEADLINE.get(task) or tuple(k.split(",")[0] for k, v in scores.items()
                                        if isinstance(v, (int, float)) and "_stderr" not in k and "," in k)
    return {f"{task} {m}": float(scores[f"{m},none"]) for m in names if isinstance(scores.get(f"{m},none"), (int, float))}


def _binary_scores(samples: Path, metric: str) -> dict[int, bool] | None:
    """Per-question 0/1 scores from a samples file, or ``None`` when the metric is not 0/1."""
    out: dict[int, bool] = {}
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        value = s.get(metric)
        if value not in (0, 1, 0.0, 1.0, True, False):
            return None
        out[s["doc_id"]] = bool(value)
    return out


def collect(folders: list[str | Path]) -> list[dict[str, Any]]:
    """One row per results file: ``model``, ``spec``, ``budget``, ``scores`` and the samples files."""
    rows = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*_results.json")):
            data = json.loads(path.read_text())
            if data.get("config", {}).get("model") != "tokenprune":
                continue
            args = _model_args(data["config"].get("model_args", ""))
            scores: dict[str, float] = {}
            for task, result in data["results"].items():
                scores.update(_metrics(task, result))
            stamp = path.name[: -len("_results.json")]
            samples = {p.name[len(stamp) + len("_samples_"):-len(".jsonl")]: p
                       for p in path.parent.glob(f"{stamp}_samples_*.jsonl")}
            spec = args.get("spec", "clasp")
            unpruned = spec.lower() in UNPRUNED_SPECS
            rows.append({"run": path.parent.parent.name, "model": args.get("pretrained", "?"), "spec": spec,
                         "budget": "-" if unpruned else args.get("budget", "spec's"), "scores": scores, "samples": samples, "file": path})
    if not rows:
        raise FileNotFoundError(f"no lmms-eval results of --model tokenprune under {', '.join(map(str, folders))}")
    return rows


def _paired(row: dict, base: dict) -> str:
    """McNemar against the unpruned run, per task with 0/1 per-question scores."""
    parts = []
    for task in sorted(set(row["samples"]) & set(base["samples"])):
        for metric in HEADLINE.get(task, ()):
            a, b = _binary_scores(row["samples"][task], metric), _binary_scores(base["samples"][task], metric)
            if a is None or b is None or set(a) != set(b):
                continue
            t = mcnemar([a[i] for i in sorted(a)], [b[i] for i in sorted(a)])
            parts.append(f"{task}: {100 * t['delta']:+.1f} (p={t['p']:.3g})")
    return "; ".join(parts)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table: unpruned first per checkpoint, then each spec by budget."""
    columns = sorted({c for r in rows for c in r["scores"]})
    base = {r["model"]: r for r in rows if r["spec"].lower() in UNPRUNED_SPECS}
    rows = sorted(rows, key=lambda r: (r["model"], r["model"] not in base or base[r["model"]] is not r,
                                       r["spec"], str(r["budget"]), r["run"]))
    head = ["run", "model", "spec", "budget", *columns, "rel.", "vs unpruned (points, McNemar p)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ref = base.get(r["model"])
        rel = [r["scores"][c] / ref["scores"][c] for c in columns
               if ref is not None and c in r["scores"] and ref["scores"].get(c)]
        cells = [r["run"], r["model"], r["spec"], str(r["budget"]),
                 *(f"{r['scores'][c]:.4g}" if c in r["scores"] else "" for c in columns),
                 f"{100 * sum(rel) / len(rel):.1f} %" if rel else "",
                 _paired(r, ref) if ref is not None and ref is not r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
