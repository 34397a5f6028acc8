"""Tables and plots of :func:`~tokenprune.testbed.evaluate.evaluate` reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .questions import QA_CLASSES

__all__ = ["text_table", "markdown_table", "plot"]

COLUMNS = ("overall", *QA_CLASSES)


def _tokens(r: dict[str, Any]) -> float:
    """Visual tokens per image a run kept (its budget, or what the spec decided)."""
    return r.get("tokens_per_image", r["budget"] if r["budget"] is not None else float("nan"))


def _rows(report: dict[str, Any]) -> list[tuple[str, str, dict]]:
    rows = [("unpruned", "576", report["unpruned"])]
    rows += [(r["variant"], str(r["budget"]) if r["budget"] is not None else f"{_tokens(r):g}*", r)
             for r in report["runs"]]
    return rows


def text_table(report: dict[str, Any]) -> str:
    """A fixed-width table: accuracy per class, share retained, routing accuracy, prefill ms."""
    head = f"{'variant':<28} {'R':>4} " + " ".join(f"{c[:8]:>8}" for c in COLUMNS)
    head += f" {'retained':>8} {'routed':>7} {'ms/ex':>7}"
    lines = [head, "-" * len(head)]
    chance = report["chance"]
    lines.append(f"{'chance (majority answer)':<28} {'':>4} {'':>8} "
                 + " ".join(f"{chance.get(c, float('nan')):>8.2f}" for c in QA_CLASSES))
    for name, r, row in _rows(report):
        acc = row["accuracy"]
        line = f"{name[:28]:<28} {r:>4} " + " ".join(f"{acc.get(c, float('nan')):>8.3f}" for c in COLUMNS)
        line += f" {row.get('retained', 1.0):>8.3f} {row.get('routing_accuracy', float('nan')):>7.3f}"
        line += f" {row['prefill_ms_per_example']:>7.1f}"
        lines.append(line)
    return "\n".join(lines)


def markdown_table(report: dict[str, Any], *, delta: bool = False) -> str:
    """The same as a markdown table (``delta``: accuracy minus the unpruned accuracy)."""
    base = report["unpruned"]["accuracy"]
    head = "| variant | R | " + " | ".join(COLUMNS) + " | retained | routing acc. | prefill ms/ex |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 5)]
    chance = report["chance"]
    lines.append("| chance (majority answer) | | | " + " | ".join(f"{chance.get(c, 0):.2f}" for c in QA_CLASSES)
                 + " | | | |")
    for name, r, row in _rows(report):
        acc = row["accuracy"]
        cells = []
        for c in COLUMNS:
            v = acc.get(c, float("nan"))
            cells.append(f"{v:.3f}" if not delta or name == "unpruned" else f"{v:.3f} ({v - base.get(c, 0):+.3f})")
        routed = row.get("routing_accuracy")
        lines.append(f"| {name} | {r} | " + " | ".join(cells)
                     + f" | {row.get('retained', 1.0):.3f} | {'' if routed is None else f'{routed:.3f}'}"
                     + f" | {row['prefill_ms_per_example']:.1f} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Accuracy vs budget, one line per variant, one panel per class plus overall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), sharex=True)
    variants = list(dict.fromkeys(r["variant"] for r in report["runs"]))
    for ax, c in zip(axes.flat, COLUMNS):
        for v in variants:
            rs = sorted((r for r in report["runs"] if r["variant"] == v), key=_tokens)
            ax.plot([_tokens(r) for r in rs], [r["accuracy"].get(c, float("nan")) for r in rs], marker="o", label=v)
        ax.axhline(report["unpruned"]["accuracy"].get(c, float("nan")), color="black", ls="--", lw=1, label="unpruned (576)")
        if c in report["chance"]:
            ax.axhline(report["chance"][c], color="grey", ls=":", lw=1, label="chance")
        ax.set_title(c)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("visual tokens kept (of 576)")
    axes[0, 0].set_ylabel("accuracy")
    axes[1, 0].set_ylabel("accuracy")
    handles, labels = axes.flat[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle(title or f"testbed '{report['split']}' split, {report['examples']} questions")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_training(record: dict[str, Any], path: str | Path) -> None:
    """The training curve of a ``training.json``: stage 1 per-patch accuracy, stage 2 answer
    accuracy per class on the step's fresh train scenes (never seen before), and both losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = record["curve"]
    s1 = [p for p in curve if p["stage"] == 1]
    s2 = [p for p in curve if p["stage"] == 2]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for k in ("color", "shape", "digit", "anchor", "row", "col", "background"):
        axes[0].plot([p["step"] for p in s1], [p[k] for p in s1], label=k)
    axes[0].set_title("stage 1: tower, per-patch accuracy (foreground)")
    axes[0].set_xlabel("step (16 images)")
    for k in QA_CLASSES:
        axes[1].plot([p["step"] for p in s2], [p.get(k, float("nan")) for p in s2], label=k)
    axes[1].set_title("stage 2: answer accuracy per class (fresh train scenes)")
    axes[1].set_xlabel("step (8 scenes x 14 questions)")
    axes[2].plot([p["step"] for p in s1], [p["loss"] for p in s1], label="stage 1")
    axes[2].plot([p["step"] for p in s2], [p["loss"] for p in s2], label="stage 2 (answer + 0.5 alignment)")
    axes[2].set_yscale("log")
    axes[2].set_title("loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
