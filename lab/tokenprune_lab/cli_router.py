"""``tokenprune router fit`` and ``tokenprune router eval``: the classifier router's head and the
routers' accuracy on a development set (docs/routing.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenprune.cli import examples

__all__ = ["add_router_parser", "markdown_report"]


def cmd_router_fit(args: argparse.Namespace) -> int:
    from tokenprune_plugins.router_classifier import ClassifierRouter, shipped_head
    from tokenprune_plugins.router_fit import fit_head, judge, load_dev_set
    from tokenprune_plugins.routers import minilm_dir

    rows = load_dev_set(args.dev)
    out = Path(args.out) if args.out else shipped_head()
    head, report = fit_head(rows, str(minilm_dir()))
    head.save(out)
    print(f"fitted on {report['questions']} questions ({len(rows) - report['questions']} held out, not read); "
          f"{report['folds']}-fold accuracy per weight decay: {report['cv_accuracy']}")
    print(f"weight decay {report['weight_decay']}, temperature {report['temperature']}; wrote {out}")
    held = [r for r in rows if r.held_out]
    if held:
        j = judge(ClassifierRouter(head=str(out)), held)
        print(f"held-out accuracy {j.accuracy:.3f} ({j.correct}/{j.n}); `tokenprune router eval` for the table")
    return 0


def cmd_router_eval(args: argparse.Namespace) -> int:
    from tokenprune_plugins.router_fit import judge, load_dev_set

    from tokenprune.registry import get_registry

    rows = load_dev_set(args.dev)
    rows = [r for r in rows if args.part == "all" or r.held_out == (args.part == "held-out")]
    reports = {}
    for name in args.router.split(","):
        router = get_registry().get("router", name).cls()
        reports[name] = judge(router, rows)
    print(markdown_report(reports, args.part))
    if args.json:
        Path(args.json).write_text(json.dumps({k: vars(v) for k, v in reports.items()}, indent=1))
    return 0


def markdown_report(reports: dict, part: str) -> str:
    """Accuracy per class (Wilson 95 % intervals) for each router, then each one's confusion matrix."""
    from tokenprune_plugins.routers import ROUTED

    from tokenprune_lab.testbed.stats import wilson

    def cell(k: int, n: int) -> str:
        lo, hi = wilson(k, n)
        return f"{k / n:.1%} [{lo:.0%}, {hi:.0%}]"

    lines = [f"Accuracy on the development set's {part} part (95 % Wilson intervals):", "",
             "| router | overall | " + " | ".join(ROUTED) + " | → general |",
             "|---" * (len(ROUTED) + 3) + "|"]
    for name, j in reports.items():
        general = sum(row[-1] for row in j.confusion)
        lines.append(f"| {name} | {cell(j.correct, j.n)} | "
                     + " | ".join(f"{j.per_class[c][0] / j.per_class[c][1]:.0%} ({j.per_class[c][0]}/{j.per_class[c][1]})"
                                  if c in j.per_class else "-"
                                  for c in ROUTED) + f" | {general / j.n:.1%} |")
    for name, j in reports.items():
        lines += ["", f"`{name}`: confusion (rows: the labelled class, columns: the routed class); per style: "
                  + ", ".join(f"{s} {k}/{n}" for s, (k, n) in j.per_style.items()), "",
                  "| labelled \\ routed | " + " | ".join(j.columns) + " |", "|---" * (len(j.columns) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(ROUTED, j.confusion, strict=True)]
    return "\n".join(lines)


def add_router_parser(sub) -> None:
    rp = sub.add_parser("router", help="fit the classifier router's head; judge routers on a development set")
    rsub = rp.add_subparsers(dest="router_command", required=True)
    fp = rsub.add_parser("fit", help="fit the classifier router's head on a development set's non-held-out part",
                         **examples(("tokenprune router fit --out out/router_head.safetensors", "a head beside the shipped one")))
    fp.add_argument("--dev", help="development set: class<TAB>style<TAB>question rows (default: tokenprune's)")
    fp.add_argument("--out", help="where to write the head (default: the shipped one, "
                                  "tokenprune_plugins/data/router_head.safetensors)")
    fp.set_defaults(func=cmd_router_fit)
    ep = rsub.add_parser("eval", help="routers' accuracy per class and confusion matrix on a development set",
                         **examples(("tokenprune router eval", "every router on the held-out rows"),
                                    ("tokenprune router eval --router classifier --part all", "one router, every row")))
    ep.add_argument("--router", default="classifier,embedding,keyword",
                    help="comma list of router stages (default classifier,embedding,keyword)")
    ep.add_argument("--dev", help="development set (default: tokenprune's)")
    ep.add_argument("--part", choices=("held-out", "fit", "all"), default="held-out",
                    help="which rows: the held-out part (default), the fitting part, or all")
    ep.add_argument("--json", help="also write the counts as JSON here")
    ep.set_defaults(func=cmd_router_eval)
