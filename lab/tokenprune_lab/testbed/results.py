"""``tokenprune results``: every figure of ``docs/results.md``, as a plan of steps that resumes.

Each step is one ``tokenprune`` command (calibrate, eval or ablate) with its outputs. After a step
succeeds, its *fingerprint* goes into ``docs/results/manifest.json``: a hash of its arguments, the
model's weights and config, every resolved spec it runs (stages, parameters and the class
table they read) and the code that ran it (:func:`code_digest`: every source and data file of the
``tokenprune`` and ``tokenprune_plugins`` packages, the lab included, so a change to a stage's
implementation, to the evaluation or to the router's fitted head marks the figures it made as stale). A later ``tokenprune results`` skips a step whose outputs exist and whose
fingerprint is unchanged, so an interrupted run (a session that ends, a ``Ctrl-C``) resumes at the
first step not done, and a new class table re-runs every step that reads it. The manifest is
committed beside the figures, so a fresh clone knows which figures match its inputs.

The code digest is deliberately coarse: any edit of any source file, a comment included, marks
every step to run again. A finer rule (which modules a step imports) would miss a change that
reaches a step through a registry lookup; ``--list`` says when only the code changed, and
``--only NAME`` re-runs one step.

The tables of ``docs/results.md`` (and the testbed table of ``docs/routing.md``: :data:`REPORTS`)
are not copied by hand: the page marks each one with
``<!-- results: NAME KIND -->`` ... ``<!-- end -->`` (``NAME`` a JSON of ``docs/results/``, such as
``ablation-methods`` or ``hard``; ``KIND`` one of ``table``, ``recall``, ``paired``, ``fidelity``,
``agreement``, ``decisive``, ``kl``, ``detectable`` or, for the calibration grid, ``calibration``; an optional
`` only=A;B`` keeps the variants named A and B), and
:func:`fill_report` renders them from the JSON after every ``tokenprune results``. The prose
around them is written by a person, from the tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from .resume import Interrupted

__all__ = ["Step", "plan", "code_digest", "fingerprint", "read_manifest", "is_current", "stale_because", "run_plan",
           "fill_report", "render"]

RESULTS = Path("docs/results")
TABLE = Path("tokenprune/data/class_table.toml")
REPORT = Path("docs/results.md")
#: the pages whose marked tables ``tokenprune results`` re-renders
REPORTS = (REPORT, Path("docs/routing.md"))
_BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.-]+) (?P<kind>\w+)(?: only=(?P<only>[^>]*?))? -->\n)"
                    r"(?P<body>.*?)(<!-- end -->)", re.S)
#: the per-class ablations of CLASP, run on the first ``ABLATION_SCENES`` test scenes
ABLATIONS = ("fusion", "scoring", "completion", "pivot-ratio", "router")
ABLATION_SCENES = 150
#: diagnoses on the calibration split (their files name it), with the first ``N`` scenes each
DIAGNOSES = {"number-box": 60}


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of the plan. ``specs``: spec files it runs (beside an ablation file's own)."""

    name: str
    argv: tuple[str, ...]
    outputs: tuple[Path, ...]
    specs: tuple[str, ...] = ()
    ablation: str | None = None


def plan(results: Path = RESULTS, table: Path = TABLE) -> list[Step]:
    """The steps of ``docs/results.md``, in order: calibration first (every later step reads the
    table it writes), then the comparisons on the test split, the hard split and the ablations."""
    r = str(results)
    grid = results / "calibration.json"
    steps = [Step("calibrate", ("calibrate", "--split", "calibration", "--out", str(table), "--grid", str(grid)),
                  (table, grid), specs=("specs/clasp.toml",))]
    for name in ("alternatives", "methods"):
        f = f"specs/ablations/{name}.toml"
        steps.append(Step(name, ("ablate", f, "--split", "test", "--out", r), _ablation_outputs(results, name),
                          ablation=f))
    hard = ("specs/clasp.toml", "specs/variants/random.toml")
    steps.append(Step("hard", ("eval", "--spec", hard[0], "--spec", hard[1], "--split", "hard", "--out", r,
                               "--name", "hard"), (results / "hard.json", results / "hard.png"), specs=hard))
    for name, scenes in {**dict.fromkeys(ABLATIONS, ABLATION_SCENES), **DIAGNOSES}.items():
        f = f"specs/ablations/{name}.toml"
        steps.append(Step(name, ("ablate", f, "--scenes", str(scenes), "--out", r),
                          _ablation_outputs(results, name), ablation=f))
    return steps


def _ablation_outputs(results: Path, name: str) -> tuple[Path, ...]:
    return tuple(results / f"ablation-{name}.{ext}" for ext in ("json", "md", "png"))


def code_roots() -> tuple[Path, ...]:
    """The source folders whose files a step's code digest covers: the installed ``tokenprune``,
    ``tokenprune_plugins`` and ``tokenprune_lab`` packages (the checkout's folders under an
    editable install)."""
    import tokenprune_plugins

    import tokenprune
    import tokenprune_lab

    return tuple(Path(m.__file__).resolve().parent for m in (tokenprune, tokenprune_plugins, tokenprune_lab))


#: package files a step's code digest leaves out: the class table calibrate writes (every spec's
#: resolved form covers it, and calibrate rewriting it must not mark calibrate itself stale) and
#: the old calibration grid beside it
NOT_CODE = frozenset({"class_table.toml", "class_table.json"})


def code_digest(roots: Sequence[Path] | None = None) -> str:
    """sha256 over every file under ``roots`` (default :func:`code_roots`) that the code reads:
    the ``.py`` files and the package data (the router's head, development set and exemplars, the
    shipped testbed models), each file's path relative to its root and its bytes, in sorted order.
    Left out: ``__pycache__``, hidden files (a calibration's ``.partial.json`` checkpoints) and
    :data:`NOT_CODE`."""
    h = hashlib.sha256()
    for root in roots if roots is not None else code_roots():
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root)
            if (not f.is_file() or "__pycache__" in rel.parts or any(x.startswith(".") for x in rel.parts)
                    or f.name in NOT_CODE):
                continue
            h.update(f"{root.name}/{rel.as_posix()}\0".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def fingerprint(step: Step, model_dir: Path, code: str | None = None) -> str:
    """sha256 over the step's arguments, the model's files, every spec it resolves and ``code``
    (default :func:`code_digest` of the installed packages)."""
    from tokenprune.spec import load_spec

    from .ablation import load_ablation

    h = hashlib.sha256(json.dumps(step.argv).encode())
    h.update((code if code is not None else code_digest()).encode())
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        h.update(_file_digest(model_dir / f).encode())
    resolved = [_resolved(load_spec(p)) for p in step.specs]
    if step.ablation:
        _, variants = load_ablation(step.ablation)
        resolved += [f"{v.name}:{v.oracle_router}:{v.budgets}:{_resolved(v.spec) if v.spec else None}"
                     for v in variants]
    for text in resolved:
        h.update(text.encode())
    return h.hexdigest()


def _resolved(spec) -> str:
    """Every stage with its parameters and the class table: what ``tokenprune spec show`` prints."""
    return json.dumps(spec.resolved(), sort_keys=True, default=str)


def _file_digest(path: Path) -> str:
    if not path.exists():
        return f"{path.name}: absent"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(manifest: Path = RESULTS / "manifest.json") -> dict:
    """The finished steps recorded in ``manifest`` (empty if there is none yet)."""
    return json.loads(manifest.read_text()) if manifest.exists() else {}


def is_current(step: Step, model_dir: Path, done: dict, code: str | None = None) -> bool:
    """Whether ``step`` finished with its present inputs and code and its outputs are all there."""
    return stale_because(step, model_dir, done, code) is None


def stale_because(step: Step, model_dir: Path, done: dict, code: str | None = None) -> str | None:
    """Why ``step`` must run again (``None``: it is up to date): never run, an output missing, the
    code changed since it ran, or its inputs (arguments, model, specs, class table) did."""
    code = code if code is not None else code_digest()
    last = done.get(step.name)
    if last is None:
        return "never run"
    missing = [str(o) for o in step.outputs if not o.exists()]
    if missing:
        return f"output missing: {', '.join(missing)}"
    if last.get("fingerprint") == fingerprint(step, model_dir, code):
        return None
    if "code" not in last:
        return "it ran before its code was fingerprinted"
    if last["code"] != code:
        return "the code changed since it ran"
    return "its inputs changed (arguments, model, specs or class table)"


def run_plan(steps: Sequence[Step], model_dir: Path, *, model_arg: Sequence[str] = (), force: bool = False,
             only: Sequence[str] = (), manifest: Path = RESULTS / "manifest.json",
             run: Callable[[list[str]], int] | None = None, log: Callable[[str], None] = print,
             code: str | None = None) -> dict:
    """Run the steps not done (all with ``force``; just ``only`` when given) and return the manifest.
    ``code``: the code digest to record (default :func:`code_digest`, read once, at the start)."""
    unknown = sorted(set(only) - {s.name for s in steps})
    if unknown:
        raise ValueError(f"unknown results step(s) {unknown}; the plan has {[s.name for s in steps]}")
    if run is None:
        run = _run_step
    done = read_manifest(manifest)
    code = code if code is not None else code_digest()
    log(_estimate([s for s in steps if (not only or s.name in only) and (force or not is_current(s, model_dir, done, code))],
                  len(steps), done))
    for step in steps:
        if only and step.name not in only:
            continue
        if is_current(step, model_dir, done, code) and not force:
            log(f"results: {step.name} is up to date ({done[step.name]['finished']}); --force re-runs it")
            continue
        log(f"results: {step.name}: tokenprune {' '.join(step.argv)}")
        t0 = time.perf_counter()
        _run_one(step, run, model_arg)
        fp = fingerprint(step, model_dir, code)  # calibrate rewrites the table: record what now stands
        done[step.name] = {"fingerprint": fp, "code": code, "argv": list(step.argv),
                           "seconds": round(time.perf_counter() - t0, 1),
                           "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(done, indent=1) + "\n")
        sys.stdout.flush()
    if manifest == RESULTS / "manifest.json":
        for doc in (d for d in REPORTS if d.exists()):
            log(f"results: {fill_report(doc)} table(s) of {doc} re-rendered from {RESULTS}")
    return done


def _estimate(to_run: Sequence[Step], steps: int, done: dict) -> str:
    """What this run does and how long it took last time (the manifest's seconds, where a step ran)."""
    timed = [done[s.name]["seconds"] for s in to_run if "seconds" in done.get(s.name, {})]
    took = f"; last time, {len(timed)} of them took {sum(timed) / 3600:.1f} h in all" if timed else ""
    return f"results: {len(to_run)} of {steps} steps to run{took}"


def _run_one(step: Step, run: Callable[[list[str]], int], model_arg: Sequence[str]) -> None:
    """Run ``step``; a failure or an interrupt says which step it was and that the plan resumes there."""
    from tokenprune.cli import USER_ERRORS

    try:
        rc = run([*step.argv, *model_arg])
    except Interrupted as stop:
        raise Interrupted(f"results step '{step.name}': {stop} (`tokenprune results` resumes at this step)") from None
    except USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ValueError(f"results step '{step.name}' failed: {msg}; fix it and run `tokenprune results` again "
                         "to resume from this step") from exc
    if rc:
        raise RuntimeError(f"results step '{step.name}' failed (exit {rc}): tokenprune {' '.join(step.argv)}; "
                           "fix it and run `tokenprune results` again to resume from this step")


def _run_step(argv: list[str]) -> int:
    """One step's ``tokenprune`` command in this process, its exceptions left to the caller (an
    interrupted step's :class:`~tokenprune_lab.testbed.resume.Interrupted` says what it kept)."""
    from tokenprune.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def render(name: str, kind: str, results: Path = RESULTS, only: Sequence[str] | None = None) -> str:
    """The markdown ``kind`` (``table``: accuracy with intervals and the difference to unpruned;
    ``recall``: evidence recall; ``paired``: the paired tests; ``fidelity``: accuracy, agreement and
    KL overall with their paired tests; ``agreement``, ``decisive``, ``kl``: one of those per
    class; ``detectable``: the smallest paired difference each metric detects; ``calibration``:
    what a calibration grid chose per class and budget) of ``results/<name>.json``, with the
    variants named in ``only`` (all by default)."""
    from .calibrate import calibration_table
    from .report import (
        detectable_table,
        fidelity_class_table,
        fidelity_table,
        markdown_table,
        paired_table,
        recall_table,
    )

    kinds = {"table": lambda r: markdown_table(r, delta=True), "recall": recall_table, "paired": paired_table,
             "fidelity": fidelity_table, "agreement": lambda r: fidelity_class_table(r, "agreement"),
             "decisive": lambda r: fidelity_class_table(r, "decisive_agreement"),
             "kl": lambda r: fidelity_class_table(r, "kl"), "detectable": detectable_table,
             "calibration": calibration_table}
    if kind not in kinds:
        raise ValueError(f"results block '{name} {kind}': the kind must be one of {sorted(kinds)}")
    source = results / f"{name}.json"
    if not source.exists():
        raise FileNotFoundError(f"results block '{name} {kind}' reads {source}, which does not exist; "
                                "run `tokenprune results` (or fix the block's name)")
    report = json.loads(source.read_text())
    if kind == "calibration":
        return calibration_table(report)
    if only:
        missing = sorted(set(only) - {r["variant"] for r in report["runs"]})
        if missing:
            raise ValueError(f"results block '{name} {kind}' asks for variants {missing}, which {source} does not "
                             f"have; it has {sorted({r['variant'] for r in report['runs']})}")
        report = {**report, "runs": [r for r in report["runs"] if r["variant"] in only]}
    return kinds[kind](report)


def fill_report(doc: Path = REPORT, results: Path = RESULTS) -> int:
    """Re-render every marked block of ``doc`` from ``results``; returns how many changed."""
    text = doc.read_text()
    changed = 0

    def fill(m: re.Match) -> str:
        nonlocal changed
        body = render(m["name"], m["kind"], results, _only(m)) + "\n"
        changed += body != m["body"]
        return m[1] + body + m[6]

    new = _BLOCK.sub(fill, text)
    if new != text:
        doc.write_text(new)
    return changed


def _only(m: re.Match) -> list[str] | None:
    return [v.strip() for v in m["only"].split(";")] if m["only"] else None
