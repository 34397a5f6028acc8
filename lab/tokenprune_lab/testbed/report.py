"""Tables and plots of :func:`~tokenprune_lab.testbed.evaluate.evaluate` reports.

Accuracies are shown with their 95 % Wilson interval; ``recall`` is the evidence recall (share of
the question's evidence cells that reached the LLM); ``vs ref`` is the paired difference from the
reference variant at the same budget with its exact McNemar p-value. Fidelity to the unpruned
answer (:func:`fidelity_table`, :func:`fidelity_class_table`, :func:`plot_fidelity`): agreement
(all questions and the decisive ones) with its Wilson interval, KL(unpruned || pruned) in nats with
its bootstrap interval, each with the paired test against the reference and the smallest difference
that test can detect (80 % power at p < 0.05).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .questions import QA_CLASSES

__all__ = ["text_table", "markdown_table", "recall_table", "paired_table", "fidelity_table", "fidelity_class_table",
           "detectable_table", "plot", "plot_fidelity", "style"]

COLUMNS = ("overall", *QA_CLASSES)


def _tokens(r: dict[str, Any]) -> float:
    """Visual tokens per image a run kept (its budget, or what the spec decided)."""
    return r.get("tokens_per_image", r["budget"] if r["budget"] is not None else float("nan"))


def _rows(report: dict[str, Any]) -> list[tuple[str, str, dict]]:
    rows = [("unpruned", "576", report["unpruned"])]
    rows += [(r["variant"], str(r["budget"]) if r["budget"] is not None else f"{_tokens(r):g}*", r)
             for r in report["runs"]]
    return rows


def _half(row: dict[str, Any], c: str) -> float:
    """The larger half-width of the 95 % interval of class ``c``'s accuracy."""
    lo, hi = row.get("interval", {}).get(c, (float("nan"), float("nan")))
    a = row["accuracy"].get(c, float("nan"))
    return max(a - lo, hi - a)


def _vs_ref(row: dict[str, Any], c: str = "overall") -> str:
    t = row.get("vs_reference", {}).get(c)
    return "" if t is None else f"{t['delta']:+.3f} p={_p(t['p'])}"


def _p(p: float) -> str:
    return "<.001" if p < 0.001 else f"{p:.3f}"


def text_table(report: dict[str, Any]) -> str:
    """A fixed-width table: accuracy per class (± the 95 % interval's half-width), evidence recall,
    the paired difference from the reference, share retained, routing accuracy, prefill ms."""
    head = f"{'variant':<28} {'R':>4} " + " ".join(f"{c[:10]:>10}" for c in COLUMNS)
    head += (f" {'recall':>6} {'vs ' + str(report.get('reference'))[:10]:>18} {'agree':>6} {'KL':>6}"
             f" {'retained':>8} {'routed':>7} {'ms/ex':>7}")
    lines = [head, "-" * len(head)]
    chance = report["chance"]
    lines.append(f"{'chance (majority answer)':<28} {'':>4} {'':>10} "
                 + " ".join(f"{chance.get(c, float('nan')):>10.2f}" for c in QA_CLASSES))
    for name, r, row in _rows(report):
        acc = row["accuracy"]
        line = f"{name[:28]:<28} {r:>4} " + " ".join(
            f"{acc.get(c, float('nan')):>5.3f}±{_half(row, c):.2f}"[:10].rjust(10) for c in COLUMNS)
        recall = row.get("evidence_recall", {}).get("overall")
        line += f" {'' if recall is None else f'{recall:.3f}':>6} {_vs_ref(row):>18}"
        agree, kl = row.get("agreement", {}).get("overall"), row.get("kl", {}).get("overall")
        line += f" {'' if agree is None else f'{agree:.3f}':>6} {'' if kl is None else f'{kl:.3f}':>6}"
        line += f" {row.get('retained', 1.0):>8.3f} {row.get('routing_accuracy', float('nan')):>7.3f}"
        line += f" {row['prefill_ms_per_example']:>7.1f}"
        lines.append(line)
    n = report["per_class"]
    lines.append(f"n per class: {', '.join(f'{k} {v}' for k, v in n.items())}; ± is the 95 % Wilson interval; "
                 f"'vs' is the paired difference from '{report.get('reference')}' at the same budget, exact McNemar p; "
                 "agree: share of answers equal to the unpruned one; KL: mean KL(unpruned || pruned), nats")
    return "\n".join(lines)


def markdown_table(report: dict[str, Any], *, delta: bool = False) -> str:
    """The same as a markdown table: accuracy ± the 95 % interval's half-width (``delta``: also
    minus the unpruned accuracy), evidence recall, the paired difference from the reference."""
    base = report["unpruned"]["accuracy"]
    head = ("| variant | R | " + " | ".join(COLUMNS)
            + f" | evidence recall | vs {report.get('reference')} (p) | retained | routing acc. | prefill ms/ex |")
    lines = [head, "|" + "---|" * (len(COLUMNS) + 7)]
    chance = report["chance"]
    lines.append("| chance (majority answer) | | | " + " | ".join(f"{chance.get(c, 0):.2f}" for c in QA_CLASSES)
                 + " | | | | | |")
    for name, r, row in _rows(report):
        acc = row["accuracy"]
        cells = []
        for c in COLUMNS:
            v = acc.get(c, float("nan"))
            cell = f"{v:.3f} ±{_half(row, c):.3f}"
            cells.append(cell if not delta or name == "unpruned" else f"{cell} ({v - base.get(c, 0):+.3f})")
        routed = row.get("routing_accuracy")
        recall = row.get("evidence_recall", {}).get("overall")
        lines.append(f"| {name} | {r} | " + " | ".join(cells)
                     + f" | {'' if recall is None else f'{recall:.3f}'} | {_vs_ref(row)}"
                     + f" | {row.get('retained', 1.0):.3f} | {'' if routed is None else f'{routed:.3f}'}"
                     + f" | {row['prefill_ms_per_example']:.1f} |")
    return "\n".join(lines)


def recall_table(report: dict[str, Any]) -> str:
    """Evidence recall per class and budget (markdown); scene questions have no evidence cells."""
    cols = [c for c in COLUMNS if any(c in r.get("evidence_recall", {}) for r in report["runs"])]
    lines = ["| variant | R | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for name, r, row in _rows(report)[1:]:
        rec = row.get("evidence_recall")
        if rec is not None:
            lines.append(f"| {name} | {r} | " + " | ".join(f"{rec[c]:.3f}" if c in rec else "" for c in cols) + " |")
    return "\n".join(lines)


def paired_table(report: dict[str, Any], alpha: float = 0.05) -> str:
    """Per class, each run's accuracy minus the reference's at the same budget, with the exact
    McNemar p-value; ``**`` marks p < ``alpha`` (markdown)."""
    lines = ["| variant | R | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for name, r, row in _rows(report)[1:]:
        tests = row.get("vs_reference")
        if tests is None:
            continue
        cells = []
        for c in COLUMNS:
            t = tests.get(c)
            mark = "**" if t is not None and t["p"] < alpha else ""
            cells.append("" if t is None else f"{mark}{t['delta']:+.3f}{mark} (p={_p(t['p'])})")
        lines.append(f"| {name} | {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _iv(row: dict[str, Any], metric: str, c: str, digits: int = 3) -> str:
    """``value [lo, hi]`` of a fidelity metric of class ``c`` (empty when the run has none)."""
    v = row.get(metric, {}).get(c)
    if v is None:
        return ""
    key = {"agreement": "agreement_interval", "decisive_agreement": "decisive_interval", "kl": "kl_interval"}[metric]
    lo, hi = row[key][c]
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _vs_reference(row: dict[str, Any], metric: str) -> dict[str, dict] | None:
    """A run's paired tests against the reference on ``metric`` (``accuracy`` or a fidelity
    metric), per class; ``None`` for the reference itself or a run without one."""
    return row.get("vs_reference") if metric == "accuracy" else row.get("fidelity_vs_reference", {}).get(metric)


def _test(row: dict[str, Any], metric: str, c: str = "overall", alpha: float = 0.05, digits: int = 3) -> str:
    """The paired difference from the reference on ``metric`` (``accuracy`` or a fidelity metric),
    its p-value and the difference the test could detect; ``**`` marks p < ``alpha``."""
    t = (_vs_reference(row, metric) or {}).get(c)
    if t is None:
        return ""
    mark = "**" if t["p"] < alpha else ""
    return f"{mark}{t['delta']:+.{digits}f}{mark} (p={_p(t['p'])}, ±{t.get('detectable', float('nan')):.{digits}f})"


def fidelity_table(report: dict[str, Any]) -> str:
    """Overall accuracy, agreement with the unpruned answer (all and decisive questions) and
    KL(unpruned || pruned) with their 95 % intervals, and each one's paired difference from the
    reference at the same budget: ``delta (p, ±d)``, ``d`` the smallest difference the test
    detects with 80 % power; ``**`` p < 0.05 (markdown)."""
    ref = report.get("reference")
    lines = ["| variant | R | accuracy | agreement | decisive agreement | KL (nats) "
             f"| vs {ref}: accuracy | agreement | decisive | KL |", "|" + "---|" * 10]
    for name, r, row in _rows(report)[1:]:
        lo, hi = row["interval"]["overall"]
        acc = f"{row['accuracy']['overall']:.3f} [{lo:.3f}, {hi:.3f}]"
        lines.append(f"| {name} | {r} | {acc} | {_iv(row, 'agreement', 'overall')} "
                     f"| {_iv(row, 'decisive_agreement', 'overall')} | {_iv(row, 'kl', 'overall')} "
                     f"| {_test(row, 'accuracy')} | {_test(row, 'agreement')} | {_test(row, 'decisive_agreement')} "
                     f"| {_test(row, 'kl')} |")
    return "\n".join(lines)


def fidelity_class_table(report: dict[str, Any], metric: str = "agreement") -> str:
    """One fidelity ``metric`` (``agreement``, ``decisive_agreement`` or ``kl``) per class, with the
    paired difference from the reference underneath in each cell (markdown)."""
    if metric not in ("agreement", "decisive_agreement", "kl"):
        raise ValueError(f"fidelity metric must be agreement, decisive_agreement or kl, got '{metric}'")
    digits = 3
    cols = [c for c in COLUMNS if any(c in row.get(metric, {}) for row in report["runs"])]
    lines = ["| variant | R | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for name, r, row in _rows(report)[1:]:
        cells = []
        for c in cols:
            v = row.get(metric, {}).get(c)
            test = _test(row, metric, c, digits=digits)
            cells.append("" if v is None else f"{v:.{digits}f}" + (f"<br>{test}" if test else ""))
        lines.append(f"| {name} | {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detectable_table(report: dict[str, Any]) -> str:
    """Per metric, the smallest paired difference the split detects (80 % power, p < 0.05), as
    the median over the runs paired with the reference, per class and overall (markdown)."""
    import statistics

    lines = ["| metric | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for name in ("accuracy", "agreement", "decisive_agreement", "kl"):
        tests = [_vs_reference(r, name) for r in report["runs"]]
        cells = []
        for c in COLUMNS:
            ds = [t[c]["detectable"] for t in tests if t and c in t and "detectable" in t[c]]
            cells.append(f"{statistics.median(ds):.3f}" if ds else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def style(i: int) -> dict[str, Any]:
    """Colour, marker and line style of the ``i``-th variant in a plot: 10 colours x 8 markers,
    so no two of the first 80 variants look alike."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    markers = "osD^vP*X"
    return {"color": colours[i % 10], "marker": markers[(i // 10 + i) % 8], "ls": ("-", "--", "-.", ":")[(i // 10) % 4]}


def plot(report: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Accuracy vs budget, one line per variant, one panel per class plus overall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), sharex=True)
    variants = list(dict.fromkeys(r["variant"] for r in report["runs"]))
    for ax, c in zip(axes.flat, COLUMNS, strict=True):
        for i, v in enumerate(variants):
            rs = sorted((r for r in report["runs"] if r["variant"] == v), key=_tokens)
            acc = [r["accuracy"].get(c, float("nan")) for r in rs]
            lo = [a - r.get("interval", {}).get(c, (a, a))[0] for a, r in zip(acc, rs, strict=True)]
            hi = [r.get("interval", {}).get(c, (a, a))[1] - a for a, r in zip(acc, rs, strict=True)]
            ax.errorbar([_tokens(r) for r in rs], acc, yerr=[lo, hi], capsize=2, ms=4, lw=1.2, label=v, **style(i))
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
    _finish(fig, axes.flat[1], title or f"testbed '{report['split']}' split, {report['examples']} questions "
            "(error bars: 95 % Wilson intervals)", path, columns=6, bottom=0.07, dpi=90)


def _finish(fig, legend_from, title: str, path: str | Path, columns: int, bottom: float, dpi: int) -> None:
    """One legend for the figure (from the axes ``legend_from``) under the panels, the title, and
    the PNG written to ``path``."""
    import matplotlib.pyplot as plt

    handles, labels = legend_from.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(columns, len(labels)), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, bottom, 1, 0.96))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_training(record: dict[str, Any], path: str | Path) -> None:
    """The training curve of a ``training.json``: stage 1 per-patch accuracy, stage 2 answer
    accuracy per class on the step's fresh train scenes (never seen before), and both losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if record.get("version") == 2:
        return _plot_training_v2(record, path)
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


def _plot_training_v2(record: dict[str, Any], path: str | Path) -> None:
    """v2: held-out accuracy per class (val scenes, the questions eval asks), the training
    stream's accuracy per class and per auxiliary kind, and the loss with the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = record["curve"]
    val = [p for p in curve if "val" in p]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    for i, k in enumerate((*QA_CLASSES, "overall")):
        axes[0].plot([p["step"] for p in val], [p["val"].get(k, float("nan")) for p in val], label=k,
                     **{**style(i), "ls": "-"}, lw=2.5 if k == "overall" else 1.2)
    axes[0].axhline(0.9, color="grey", ls=":", lw=1)
    axes[0].set_title("held-out accuracy per class (val scenes)")
    aux = sorted({k for p in curve for k in p if k.startswith("aux:")})
    for i, k in enumerate((*QA_CLASSES, *aux)):
        axes[1].plot([p["step"] for p in curve], [p.get(k, float("nan")) for p in curve], label=k,
                     color=style(i)["color"], ls="--" if k in aux else "-", lw=1)
    axes[1].set_title("training stream accuracy (per class, auxiliary dashed)")
    axes[2].plot([p["step"] for p in curve], [p["loss"] for p in curve], label="loss (answers + 0.5 alignment)")
    axes[2].set_yscale("log")
    lr = axes[2].twinx()
    lr.plot([p["step"] for p in curve], [p["lr"] for p in curve], color="grey", ls=":", label="learning rate")
    lr.set_ylabel("learning rate")
    axes[2].set_title("loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlabel(f"step ({record['config']['batch']} scenes)")
        ax.legend(fontsize=7, ncol=2)
    for ax in axes[:2]:
        ax.set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


#: the panels of :func:`plot_fidelity`: (metric, its interval, y label)
_FIDELITY_PANELS = (("accuracy", "interval", "accuracy"),
                    ("agreement", "agreement_interval", "agreement with the unpruned answer"),
                    ("decisive_agreement", "decisive_interval", "agreement, decisive questions"),
                    ("kl", "kl_interval", "KL(unpruned || pruned), nats"))


def _offset(i: int, n: int) -> float:
    """A variant's horizontal offset factor on the log budget axis (within +-6 %), so that no
    series is drawn exactly under another."""
    return 1.0 if n <= 1 else 2 ** (0.08 * (i / (n - 1) - 0.5))


def plot_fidelity(report: dict[str, Any], path: str | Path, title: str = "", c: str = "overall") -> None:
    """Class ``c``'s accuracy, agreement (all and decisive questions) and KL against the budget
    with their 95 % intervals (top row); each variant's paired difference from the reference at
    the same budget with its 95 % interval (bottom row, on its own scale, so 1-2 point gaps show);
    and accuracy against prefill time, the Pareto view (right). Series are offset horizontally by
    up to 6 % so that none hides another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 5, figsize=(24, 8.5))
    variants = list(dict.fromkeys(r["variant"] for r in report["runs"]))
    ref = report.get("reference")
    for col, (metric, iv, label) in enumerate(_FIDELITY_PANELS):
        top, bottom = axes[0, col], axes[1, col]
        for i, v in enumerate(variants):
            rs = [r for r in sorted((r for r in report["runs"] if r["variant"] == v), key=_tokens)
                  if c in r.get(metric, {})]
            if not rs:
                continue
            x = [_tokens(r) * _offset(i, len(variants)) for r in rs]
            y = [r[metric][c] for r in rs]
            err = [[a - r[iv][c][0] for a, r in zip(y, rs, strict=True)], [r[iv][c][1] - a for a, r in zip(y, rs, strict=True)]]
            top.errorbar(x, y, yerr=err, capsize=2, ms=4, lw=1.2, label=v, **style(i))
            _paired_panel(bottom, rs, metric, c, x, i)
        if metric == "accuracy":
            top.axhline(report["unpruned"]["accuracy"].get(c, float("nan")), color="black", ls="--", lw=1,
                        label="unpruned (576)")
        top.set_ylabel(label)
        bottom.axhline(0, color="black", lw=1)
        bottom.set_ylabel(f"{metric}: variant - {ref}")
        ticks = sorted({round(_tokens(r)) for r in report["runs"] if _tokens(r) == _tokens(r)})
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("visual tokens kept (of 576)")
            ax.grid(alpha=0.3)
    _pareto_panel(axes[0, 4], report, variants, c)
    axes[1, 4].axis("off")
    axes[1, 4].text(0, 0.5, f"bottom row: paired difference from '{ref}'\nat the same budget, 95 % interval\n"
                    "(agreement: normal, paired SE; KL: bootstrap)\n\nseries offset by up to 6 % along x\n"
                    "so that none hides another", fontsize=10, va="center")
    _finish(fig, axes[0, 0], title or f"testbed '{report['split']}' split, {report['examples']} questions, {c}: "
            "fidelity to the unpruned answer (error bars: 95 % intervals)", path, columns=8, bottom=0.06, dpi=80)


def _paired_panel(ax, rs: list[dict], metric: str, c: str, x: list[float], i: int) -> None:
    """One variant's paired differences from the reference on ``metric``, with 95 % intervals."""
    from .stats import Z95

    tests = [_vs_reference(r, metric) for r in rs]
    pts = [(xx, t[c]) for xx, t in zip(x, tests, strict=True) if t and c in t]
    if not pts:
        return
    d = [t["delta"] for _, t in pts]
    lo = [t["delta"] - t["interval"][0] if "interval" in t else Z95 * t["se"] for _, t in pts]
    hi = [t["interval"][1] - t["delta"] if "interval" in t else Z95 * t["se"] for _, t in pts]
    ax.errorbar([xx for xx, _ in pts], d, yerr=[lo, hi], capsize=2, ms=4, lw=1.2, **style(i))


def _pareto_panel(ax, report: dict[str, Any], variants: list[str], c: str) -> None:
    """Accuracy against prefill time per example: each run a point, each variant a line."""
    for i, v in enumerate(variants):
        rs = sorted((r for r in report["runs"] if r["variant"] == v), key=lambda r: r["prefill_ms_per_example"])
        ax.plot([r["prefill_ms_per_example"] for r in rs], [r["accuracy"].get(c, float("nan")) for r in rs],
                ms=4, lw=1, **style(i))
    u = report["unpruned"]
    ax.plot([u["prefill_ms_per_example"]], [u["accuracy"].get(c, float("nan"))], "k*", ms=10, label="unpruned")
    ax.set_xlabel("prefill ms per question (pruning included)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy against prefill time")
    ax.grid(alpha=0.3)
