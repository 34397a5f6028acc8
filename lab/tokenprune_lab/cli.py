"""The lab's commands, added to the ``tokenprune`` command line through ``register_commands``
(as a third party's would be): ``bench``, ``demo``, ``eval``, ``ablate``, ``calibrate``, ``router``,
``results``, ``lmms-eval`` and ``testbed``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tokenprune import __version__
from tokenprune.cli import _default_spec, examples
from tokenprune.hookspecs import hookimpl
from tokenprune.outputs import announce_replacing
from tokenprune.spec import load_spec

from .cli_router import add_router_parser
from .testbed.protocol import BUDGETS, CALIBRATION_BUDGETS, CALIBRATION_RATIOS, OBJECTIVES


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)


def count_list(text: str) -> list[int]:
    """A comma list of positive integers (batch sizes; the benchmarks' token counts)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma list of whole numbers (e.g. 64,128)") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}': give one or more positive whole numbers (e.g. 64,128)")
    return out


def budget_value(text: str) -> int | float:
    """One budget from the command line, with the API's grammar: tokens per image (``64``) or a
    ratio of each image's tokens in (0, 1] (``0.25``; ``1.0`` keeps all). Raises
    ``argparse.ArgumentTypeError``, so argparse names the flag and stops before anything loads."""
    t = text.strip()
    try:
        tokens = int(t)
    except ValueError:
        try:
            ratio = float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not a budget: give tokens per image (64) or a ratio in (0, 1] (0.25)") from None
        if not 0 < ratio <= 1:
            raise argparse.ArgumentTypeError(
                f"{t} is neither a token count nor a ratio in (0, 1]: give an integer for tokens per image") from None
        return ratio
    if tokens <= 0:
        raise argparse.ArgumentTypeError(f"{tokens} tokens per image: a budget must keep at least one token")
    return tokens


def budget_list(text: str) -> list[int | float]:
    """A comma list of budgets (``64,128,0.25``)."""
    items = [x for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError("no budget given: e.g. 64,128,192 or 0.25")
    return [budget_value(x) for x in items]


#: ``bench stages --quick``: one shape, batch 1, one budget, 3 repeats (about a minute on 2 cores)
QUICK = {"shapes": "llava-1.5-7b", "batch": [1], "budgets": [64], "repeats": 3}


def cmd_bench_stages(args: argparse.Namespace) -> int:
    import time

    from .bench import released
    from .bench import stages as bench

    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in devices:
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"device '{d}' requested but CUDA is not available")
    spec = load_spec(args.spec or _default_spec())
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    _threads(args)
    shapes = args.shapes.split(",")
    tables = ["clasp"] if args.clasp_only else [t for t in args.tables.split(",") if t]
    unknown = sorted(set(tables) - {"clasp", "methods", "released"})
    if unknown:
        raise SystemExit(f"unknown table(s) {unknown} in --tables; choose from clasp, methods, released")
    total = len(devices) * len(shapes) * len(args.batch) * len(args.budgets)
    print(f"tokenprune {__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"dtype {args.dtype}, spec {spec.name}, median of {args.repeats}; tables {', '.join(tables)}"
          + (f" ({total} CLASP rows)" if "clasp" in tables else ""), file=sys.stderr)
    if "cuda" in devices:
        print(f"cuda: {torch.cuda.get_device_name()}", file=sys.stderr)
    say = (lambda m: print(f"  {m}", file=sys.stderr)) if not args.quiet else None
    done: dict[str, list] = {"clasp": [], "methods": [], "released": []}
    t0 = time.perf_counter()

    def keep(kind: str, rows: list) -> None:  # print and save each finished row at once
        done[kind] += rows
        for r in rows:
            print({"clasp": bench.table_line, "methods": bench.methods_line, "released": released.table_line}[kind](r),
                  flush=True)
        if kind == "clasp" and len(done["clasp"]) == 1 and total > 1 and say:
            left = (time.perf_counter() - t0) * (total - 1)
            say(f"the first row took {time.perf_counter() - t0:.0f} s: about {left / 60:.0f} min for the other "
                f"CLASP rows (--quick for a one-minute run)")
        if args.json:
            Path(args.json).write_text(json.dumps({k: [r.as_dict() for r in v] for k, v in done.items()}, indent=2))

    if args.json:
        announce_replacing(args.json)
    try:
        _bench_tables(args, tables, spec, devices, shapes, dtype, say, keep)
    except KeyboardInterrupt:
        from .testbed.resume import Interrupted

        rows = sum(map(len, done.values()))
        where = f"kept in {args.json}" if args.json else "printed above (--json keeps them in a file)"
        raise Interrupted(f"the {rows} finished rows are {where}; bench stages does not resume: "
                          "a new run starts over") from None
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _bench_tables(args, tables, spec, devices, shapes, dtype, say, keep) -> None:
    """The tables of ``bench stages`` that ``tables`` names, each row handed to ``keep`` as it finishes."""
    from .bench import released
    from .bench import stages as bench

    if "clasp" in tables:
        print("\n".join(bench.table_head()), flush=True)
        bench.run(spec, devices, shapes, args.batch, args.budgets, repeats=args.repeats, dtype=dtype, progress=say,
                  on_row=lambda r: keep("clasp", [r]))
    if "methods" in tables:
        print(f"\nevery method at {args.budgets[0]} tokens (pooling keeps its own count):")
        print("\n".join(bench.methods_head()), flush=True)
        bench.run_methods(_default_spec().parent, devices, shapes, args.batch, args.budgets[0],
                          repeats=args.repeats, dtype=dtype, progress=say, on_group=lambda g: keep("methods", g))
    if "released" in tables:
        print(f"\neach preset's as-released mode beside the released rule, at {args.budgets[0]} tokens "
              "(overlap: share of the released rule's tokens the preset keeps):")
        print("\n".join(released.table_head()), flush=True)
        released.run(_default_spec().parent, devices, shapes, args.batch, args.budgets[0], repeats=args.repeats,
                     dtype=dtype, progress=say, on_group=lambda g: keep("released", g))


def cmd_bench_router(args: argparse.Namespace) -> int:
    from tokenprune_plugins.router_fit import load_dev_set

    from .bench import router as bench

    if args.threads:
        torch.set_num_threads(args.threads)
    questions = [r.question for r in load_dev_set() if r.held_out]
    rows = bench.run(args.routers.split(","), questions, repeats=args.repeats)
    print(bench.format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def cmd_bench_prefill(args: argparse.Namespace) -> int:
    from .bench import prefill as bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"device '{device}' requested but CUDA is not available")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    _threads(args)
    spec = args.spec or ("specs/variants/clasp-qwen.toml" if args.model in bench.VIDEO_MODELS else _default_spec())
    result = bench.run(
        args.model, spec, tuple(args.batch), tuple(args.budgets) if args.budgets else None,
        repeats=args.repeats, new_tokens=args.new_tokens, device=device, dtype=dtype,
        progress=(lambda m: print(f"  {m}", file=sys.stderr)) if not args.quiet else None,
    )
    print(bench.format_table(result))
    if args.json:
        announce_replacing(args.json)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.synthetic:
        from .demo import run_demo

        return run_demo(args.spec or _default_spec(), args.budget)
    from .testbed.demo import run_demo as run_testbed_demo

    return run_testbed_demo(args.spec or _default_spec(), args.budget, args.out, args.model)


def _write_report(report: dict, out: Path, stem: str, title: str) -> None:
    from .testbed.report import plot, plot_fidelity

    out.mkdir(parents=True, exist_ok=True)
    files = (out / f"{stem}.json", out / f"{stem}.png", out / f"{stem}-fidelity.png")
    announce_replacing(*files)
    files[0].write_text(json.dumps(report, indent=1))
    plot(report, files[1], title)
    plot_fidelity(report, files[2], f"{title}: fidelity to the unpruned answer" if title else "")
    print(f"wrote {', '.join(map(str, files))}", file=sys.stderr)


def _partial(out: str | Path, stem: str) -> Path:
    """Where an evaluation keeps its finished batches until it completes (it resumes from them)."""
    return Path(out) / f".{stem}.partial.json"


def cmd_eval(args: argparse.Namespace) -> int:
    from .testbed.evaluate import Dist, Variant, evaluate, progress_bar
    from .testbed.model import check_budgets_fit, load
    from .testbed.report import text_table

    _threads(args)
    specs = [load_spec(p) for p in (args.spec or [_default_spec()])]
    # a stage that fixes its own count (pooling) runs once, at that count
    variants = [Variant(s.name, s, budgets=(None,) if s.completion_fixes_budget else None) for s in specs]
    dist = Dist.from_env()
    check_budgets_fit(args.budgets, args.model, "--budgets")  # before the model loads
    model, processor = load(args.model, device=args.device)
    part = f"first{args.scenes}" if args.scenes else ""  # a partial run does not overwrite the whole split's files
    stem = args.name or "-".join(s.name for s in specs) + f"-{args.split}" + (f"-{part}" if part else "")
    report = evaluate(model, processor, variants, args.budgets, args.split, scenes=args.scenes,
                      batch_size=args.batch, dist=dist, progress=None if args.quiet else progress_bar("eval"),
                      device=args.device, reference=args.reference, checkpoint=_partial(args.out, stem))
    if dist.rank == 0:
        print(text_table(report))
        where = f"the first {args.scenes} scenes of the {args.split} split" if part else f"the {args.split} split"
        _write_report(report, Path(args.out), stem, f"{', '.join(s.name for s in specs)} on {where}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .testbed.ablation import load_ablation
    from .testbed.evaluate import Dist, evaluate, progress_bar
    from .testbed.model import check_budgets_fit, load
    from .testbed.report import fidelity_table, markdown_table, paired_table, recall_table

    _threads(args)
    abl, variants = load_ablation(args.file)
    split = args.split or abl.split
    budgets = args.budgets or abl.budgets
    dist = Dist.from_env()
    check_budgets_fit(budgets, args.model, "--budgets" if args.budgets else f"{args.file}: budgets")
    model, processor = load(args.model, device=args.device)
    report = evaluate(model, processor, variants, budgets, split, scenes=args.scenes, batch_size=args.batch,
                      dist=dist, progress=None if args.quiet else progress_bar(f"ablate {abl.name}"),
                      device=args.device, reference=args.reference,
                      checkpoint=_partial(args.out, f"ablation-{abl.name}"))
    report["ablation"] = abl.name
    if dist.rank == 0:
        table = markdown_table(report, delta=True)
        print(table)
        out = Path(args.out)
        _write_report(report, out, f"ablation-{abl.name}", f"ablation '{abl.name}': {abl.description}")
        announce_replacing(out / f"ablation-{abl.name}.md")
        (out / f"ablation-{abl.name}.md").write_text(
            f"### Ablation `{abl.name}`: {abl.description}\n\n"
            f"`tokenprune ablate {args.file}` on the {split} split ({report['examples']} questions); "
            "accuracy ± the 95 % Wilson interval's half-width (difference to unpruned)\n\n" + table + "\n\n"
            "Evidence recall (share of each question's evidence cells that reached the LLM)\n\n"
            + recall_table(report) + "\n\n"
            f"Paired difference from '{report['reference']}' at the same budget (exact McNemar p; ** p < 0.05)\n\n"
            + paired_table(report) + "\n\n"
            "Fidelity to the unpruned answer: agreement (all questions; decisive ones, where the unpruned "
            "answer leads by 0.1 or more) and KL(unpruned || pruned) in nats, with 95 % intervals; "
            f"paired differences from '{report['reference']}' as delta (p, ± the smallest difference "
            "the test detects with 80 % power)\n\n" + fidelity_table(report) + "\n")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .testbed.calibrate import calibrate, calibration_table, table_toml
    from .testbed.evaluate import Dist, progress_bar
    from .testbed.model import check_budgets_fit, load

    _threads(args)
    base = load_spec(args.spec or _default_spec())
    dist = Dist.from_env()
    budgets = args.budgets
    check_budgets_fit(budgets, args.model, "--budgets")
    model, processor = load(args.model, device=args.device)
    ratios = [float(x) for x in args.ratios.split(",")]
    source = (f"calibrated by `tokenprune calibrate --split {args.split}` ({args.scenes or 'all'} scenes, "
              f"budgets {budgets}, strategies {args.strategies}, pivot ratios {ratios}, objective {args.objective}"
              f"{', budget bands' if args.bands else ''}) on the testbed model")
    table, grid = calibrate(model, processor, base, split=args.split, scenes=args.scenes, budgets=budgets,
                            strategies=args.strategies.split(","), ratios=ratios, batch_size=args.batch,
                            dist=dist, source=source, guard_z=args.guard_z, objective=args.objective,
                            bands=args.bands,
                            progress=None if args.quiet else progress_bar("calibrate"),
                            checkpoint=lambda c: _partial(Path(args.out).parent, f"{Path(args.out).stem}-{c}"))
    if dist.rank == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        grid_path = Path(args.grid) if args.grid else out.with_suffix(".json")
        header = ("CLASP class table fitted by `tokenprune calibrate` (see docs/results.md).\n"
                  "Per class: the layer strategy (A shallow-heavy .. E deep-heavy) and pivot ratio with the\n"
                  f"best {args.objective} over the budgets on the calibration split, true class routed, kept only\n"
                  f"if it beats the pooled (general) row by more than {args.guard_z:g} paired SEs"
                  + (";\nbands: a budget's own best cell where it beats the row's cell there by as much." if args.bands
                     else "."))
        announce_replacing(out, grid_path)
        out.write_text(table_toml(table, header))
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        grid_path.write_text(json.dumps(grid, indent=1))
        print(calibration_table(grid))
        print(f"wrote {out} (and the grid to {grid_path})", file=sys.stderr)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from .testbed.model import resolve_dir
    from .testbed.results import code_digest, plan, read_manifest, run_plan, stale_because

    if not Path("specs/ablations").is_dir() or not Path("docs").is_dir():
        raise ValueError("tokenprune results rewrites docs/results/ of a checkout: run it from the repository root")
    steps = plan()
    model_dir = resolve_dir(args.model)
    if args.list:
        done = read_manifest()
        code = code_digest()  # once for every step
        for s in steps:
            why = stale_because(s, model_dir, done, code)
            print(f"{s.name:<13} {'up to date' if why is None else 'to run':<11} tokenprune {' '.join(s.argv)}"
                  + ("" if why is None else f"   ({why})"))
        return 0
    only = [x for x in (args.only or "").split(",") if x]
    try:
        run_plan(steps, model_dir, model_arg=("--model", args.model) if args.model else (), force=args.force,
                 only=only)
    except RuntimeError as exc:  # a step failed: its own error is printed above
        print(f"tokenprune: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_testbed_curve(args: argparse.Namespace) -> int:
    from .testbed.model import resolve_dir
    from .testbed.report import plot_training

    d = resolve_dir(args.model)
    if d.suffix == ".pt":  # a run in progress: its checkpoint's curve
        import torch

        ck = torch.load(d, weights_only=False)
        record = {"version": 2, "config": ck["config"], "curve": ck["state"]["curve"]}
    else:
        record = json.loads((d / "training.json").read_text())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    announce_replacing(args.out)
    plot_training(record, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_testbed_train(args: argparse.Namespace) -> int:
    _threads(args)
    if args.version == 2:
        from .testbed.train_v2 import TrainConfigV2, train_v2

        given = {"seed": args.seed, "steps": args.steps, "features": args.features, "bf16_from": args.bf16_from,
                 "feature_gain": args.feature_gain}
        cfg = TrainConfigV2(**{k: v for k, v in given.items() if v is not None})  # the rest: the defaults
        record = train_v2(cfg, args.out, max_minutes=args.max_minutes)
        where = f"step {record['step']}"
    else:
        from .testbed.train import TrainConfig, train

        if any(x is not None for x in (args.steps, args.features, args.bf16_from, args.feature_gain)):
            raise ValueError("--steps, --features, --bf16-from and --feature-gain belong to --version 2; v1 takes --tower-steps and "
                             "--qa-steps")
        given = {"seed": args.seed, "tower_steps": args.tower_steps, "qa_steps": args.qa_steps}
        cfg = TrainConfig(**{k: v for k, v in given.items() if v is not None})  # the rest: TrainConfig's defaults
        record = train(cfg, args.out, max_minutes=args.max_minutes)
        where = f"stage {record['stage']} step {record['step']}"
    state = "finished" if record["finished"] else "paused (run the same command to resume)"
    print(f"{state}: {where}, {record['seconds']:.0f} s in all -> {args.out}")
    return 0


def cmd_lmms_task(args: argparse.Namespace) -> int:
    from .lmms.task import write_task

    announce_replacing(Path(args.out) / f"{args.name}.yaml", Path(args.out) / "questions.jsonl")
    yaml = write_task(args.out, args.split, args.scenes, args.name)
    print(f"wrote {yaml}; run it with: lmms-eval --model tokenprune --model_args pretrained=testbed,spec=clasp,"
          f"budget=64 --tasks {args.name} --include_path {yaml.parent}")
    return 0


def cmd_lmms_table(args: argparse.Namespace) -> int:
    from .lmms.table import collect, markdown

    table = markdown(collect(args.folders))
    print(table, end="")
    if args.out:
        announce_replacing(args.out)
        Path(args.out).write_text(table)
    return 0


MODEL_HELP = "testbed model: v1, v2 (the shipped weights) or a folder (default: the shipped default)"


@hookimpl
def register_commands(commands) -> None:
    """The lab's commands, in the order ``tokenprune --help`` lists them."""
    _bench_commands(commands)
    _demo_command(commands)
    _evaluation_commands(commands)
    add_router_parser(commands)
    _results_command(commands)
    _lmms_commands(commands)
    _testbed_commands(commands)


def _testbed_args(q: argparse.ArgumentParser, split: str | None, out: str) -> None:
    """The flags every testbed evaluation takes."""
    q.add_argument("--split", default=split, help="train, val, calibration, test or hard (default "
                   + (split or "the ablation file's split") + ")")
    q.add_argument("--scenes", type=int, help="use only the first N scenes of the split")
    q.add_argument("--batch", type=int, default=16, help="questions per forward (default 16)")
    q.add_argument("--model", help=MODEL_HELP)
    q.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    q.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    q.add_argument("--out", default=out, help=f"output {'file' if out.endswith('.toml') else 'folder'} "
                                               f"(default {out})")
    q.add_argument("--quiet", action="store_true", help="no progress bar")


def _bench_commands(sub) -> None:
    bp = sub.add_parser("bench", help="benchmarks")
    bsub = bp.add_subparsers(dest="bench_command", required=True)
    bs = bsub.add_parser("stages", help="time each stage of CLASP, and every method's selection beside it",
                         **examples(("tokenprune bench stages --quick", "one shape, batch 1, budget 64"),
                                    ("tokenprune bench stages --json docs/bench-stages-cpu.json",
                                     "every table, written as JSON too")))
    bs.add_argument("--spec", help="spec file or preset name (default: specs/clasp.toml)")
    bs.add_argument("--devices", help="comma list (default: cpu, plus cuda when available)")
    bs.add_argument("--shapes", default="llava-1.5-7b,llava-next-7b",
                    help="comma list of llava-1.5-7b, llava-next-7b or MxLxDvxD (e.g. 48x4x16x24); "
                         "default llava-1.5-7b,llava-next-7b")
    bs.add_argument("--batch", type=count_list, default=[1, 8], help="batch sizes (default 1,8)")
    bs.add_argument("--budgets", type=count_list, default=[64, 128, 192],
                    help="tokens kept per image (default 64,128,192; the shapes differ in tokens, so no ratios)")
    bs.add_argument("--repeats", type=int, default=5, help="timed repeats, their median reported (default 5)")
    bs.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="feature dtype (default fp32)")
    bs.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    bs.add_argument("--json", help="also write the rows as JSON to this file (rewritten after every row)")
    bs.add_argument("--tables", default="clasp,methods,released",
                    help="comma list of the tables to run: clasp (CLASP's stages at every budget), methods (every "
                         "method at the first budget), released (each as-released preset beside the released rule); default all three")
    bs.add_argument("--clasp-only", action="store_true", help="the same as --tables clasp")
    bs.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    bs.add_argument("--quick", action="store_true",
                    help="one shape (llava-1.5-7b), batch 1, budget 64, 3 repeats: about a minute on 2 cores")
    bs.set_defaults(func=cmd_bench_stages)

    br = bsub.add_parser("router", help="routing cost per question, one call each and one call for all",
                         **examples(("tokenprune bench router", "every router"),
                                    ("tokenprune bench router --routers keyword --repeats 5", "one router")))
    br.add_argument("--routers", default="keyword,embedding,classifier",
                    help="comma list of router stages (default keyword,embedding,classifier)")
    br.add_argument("--repeats", type=int, default=3, help="timed repeats, their median reported (default 3)")
    br.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    br.add_argument("--json", help="also write the rows as JSON to this file")
    br.set_defaults(func=cmd_bench_router)

    bf = bsub.add_parser("prefill", help="end-to-end prefill/decode latency and memory, unpruned vs pruned",
                         **examples(("tokenprune bench prefill --batch 1 --budgets 64", "SmolLM2 in a LLaVA, one row"),
                                    ("tokenprune bench prefill --model qwen2-vl-video", "16-frame clips on Qwen2-VL")))
    bf.add_argument("--model", default="smollm2",
                    choices=["smollm2", "llava-1.5-7b", "tiny", "qwen2-vl-video", "qwen2-vl-2b-video"],
                    help="smollm2: real SmolLM2-135M LM in a LLaVA (CPU); llava-1.5-7b: full-size random (GPU); "
                         "qwen2-vl-video: a small random Qwen2-VL fed 16-frame clips (CPU); qwen2-vl-2b-video: "
                         "Qwen2-VL-2B's architecture, random, 16-frame clips (GPU); default smollm2")
    bf.add_argument("--spec", help="spec file or preset name (default: specs/clasp.toml; "
                                   "specs/variants/clasp-qwen.toml for the video models)")
    bf.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bf.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    bf.add_argument("--batch", type=count_list, default=[1, 8], help="batch sizes (default 1,8)")
    bf.add_argument("--budgets", type=budget_list,
                    help="visual tokens kept per image or video, or shares in (0, 1] (default 192,128,64 of 576; "
                         "0.1,0.25,0.5 for the video models)")
    bf.add_argument("--repeats", type=int, default=3, help="timed repeats, their median reported (default 3)")
    bf.add_argument("--new-tokens", type=int, default=8, help="decode steps timed, per token (default 8)")
    bf.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    bf.add_argument("--json", help="also write the result as JSON to this file")
    bf.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    bf.set_defaults(func=cmd_bench_prefill)


def _demo_command(sub) -> None:
    dp = sub.add_parser("demo", help="the testbed model answers questions, unpruned and pruned, with PNGs",
                        **examples(("tokenprune demo", "CLASP at 64 tokens per image"),
                                   ("tokenprune demo --spec divprune --budget 16", "another method, a tighter budget")))
    dp.add_argument("--spec", help="spec file or preset name (default: specs/clasp.toml)")
    dp.add_argument("--budget", type=budget_value, default=64,
                    help="tokens per image (default 64) or a ratio in (0, 1]")
    dp.add_argument("--out", default="out/demo", help="folder for the PNGs (default out/demo)")
    dp.add_argument("--model", help=MODEL_HELP)
    dp.add_argument("--synthetic", action="store_true", help="CLASP on synthetic tensors instead (no model)")
    dp.set_defaults(func=cmd_demo)


def _evaluation_commands(sub) -> None:
    ep = sub.add_parser("eval", help="accuracy vs budget on the testbed (JSON + PNG)",
                        **examples(("tokenprune eval --scenes 20 --budgets 16,64", "CLASP on the first 20 test scenes"),
                                   ("tokenprune eval --spec clasp --spec divprune --budgets 8,16",
                                    "two methods, paired against the first")))
    ep.add_argument("--spec", action="append", help="spec file or preset name; repeat to compare (default: specs/clasp.toml)")
    ep.add_argument("--budgets", type=budget_list, default=list(BUDGETS),
                    help="comma list of budgets: tokens per image (64) or ratios in (0, 1] (0.25); "
                         f"default {','.join(map(str, BUDGETS))}")
    ep.add_argument("--reference", help="the variant (spec name) every other is paired against (default: the first --spec)")
    ep.add_argument("--name", help="file stem of the outputs")
    _testbed_args(ep, "test", "out/eval")
    ep.set_defaults(func=cmd_eval)

    ap = sub.add_parser("ablate", help="a grid of swapped stages x budgets (markdown + PNG + JSON)",
                        **examples(("tokenprune ablate specs/ablations/fusion.toml --scenes 20", "one ablation, briefly"),
                                   ("tokenprune ablate specs/ablations/methods.toml --budgets 16",
                                    "every method at one budget")))
    ap.add_argument("file", help="an ablation file, e.g. specs/ablations/fusion.toml")
    ap.add_argument("--budgets", type=budget_list, help="override the file's budgets (tokens per image or ratios)")
    ap.add_argument("--reference", help="the variant every other is paired against (default: the file's first)")
    _testbed_args(ap, None, "out/ablate")
    ap.set_defaults(func=cmd_ablate)

    cp = sub.add_parser("calibrate", help="fit CLASP's class table on the calibration split",
                        **examples(("tokenprune calibrate --scenes 10 --budgets 16", "a quick look at the grid"),
                                   ("tokenprune calibrate --no-bands --out out/paper-table.toml",
                                    "one cell per class, as the paper")))
    cp.add_argument("--spec", help="base spec file or preset name (default: specs/clasp.toml)")
    cp.add_argument("--budgets", type=budget_list, default=list(CALIBRATION_BUDGETS),
                    help="budgets each cell is scored at, tokens per image or ratios "
                         f"(default {','.join(map(str, CALIBRATION_BUDGETS))})")
    cp.add_argument("--strategies", default="A,B,C,D,E",
                    help="layer strategies to try, A (shallow-heavy) .. E (deep-heavy); default all")
    cp.add_argument("--ratios", default=",".join(f"{r:g}" for r in CALIBRATION_RATIOS),
                    help="pivot ratios to try (default 0 to 1 in steps of 0.125)")
    cp.add_argument("--objective", choices=OBJECTIVES, default=OBJECTIVES[0],
                    help="what a cell is scored by: agreement with the unpruned answer (default), accuracy, "
                         "or the answer distribution's KL")
    cp.add_argument("--bands", action=argparse.BooleanOptionalAction, default=True,
                    help="fit a cell per calibration budget where one beats the class's own cell beyond noise "
                         "(default; --no-bands: the paper's one cell per class)")
    cp.add_argument("--grid", help="where the grid of scores goes (default: beside --out, .json)")
    cp.add_argument("--guard-z", type=float, default=1.96,
                    help="a class's own cell must beat the pooled row by this many paired SEs (default 1.96; "
                         "0: no guard)")
    _testbed_args(cp, "calibration", "out/class_table.toml")
    cp.set_defaults(func=cmd_calibrate)


def _results_command(sub) -> None:
    rp = sub.add_parser("results", help="re-run the figures of docs/results.md that are not up to date",
                        **examples(("tokenprune results --list", "which steps are up to date, and why not"),
                                   ("tokenprune results --only hard", "one step")))
    rp.add_argument("--model", help=MODEL_HELP)
    rp.add_argument("--force", action="store_true", help="re-run steps even where their inputs are unchanged")
    rp.add_argument("--only", help="comma list of step names (see --list)")
    rp.add_argument("--list", action="store_true", help="print the steps and whether each is up to date")
    rp.set_defaults(func=cmd_results)


def _lmms_commands(sub) -> None:
    lp = sub.add_parser("lmms-eval", help="lmms-eval integration (the model is `lmms-eval --model tokenprune`)")
    lsub = lp.add_subparsers(dest="lmms_command", required=True)
    lt = lsub.add_parser("task", help="write a local lmms-eval task from testbed scenes (offline)",
                         **examples(("tokenprune lmms-eval task --out out/lmms-task --scenes 8", "an 8-scene task")))
    lt.add_argument("--out", required=True, help="folder for the task (YAML, utils.py, questions.jsonl, images)")
    lt.add_argument("--split", default="test", help="testbed split (default test)")
    lt.add_argument("--scenes", type=int, default=4, help="first N scenes of the split (default 4)")
    lt.add_argument("--name", default="tokenprune_testbed", help="task name (default tokenprune_testbed)")
    lt.set_defaults(func=cmd_lmms_task)
    lb = lsub.add_parser("table", help="the paper-style table (scores, %% of unpruned, paired tests) from "
                                       "lmms-eval --output_path folders",
                         **examples(("tokenprune lmms-eval table out/lmms-unpruned out/lmms-clasp-64",
                                     "two runs' table")))
    lb.add_argument("folders", nargs="+", help="lmms-eval output folders (searched recursively)")
    lb.add_argument("--out", help="also write the markdown table to this file")
    lb.set_defaults(func=cmd_lmms_table)


def _testbed_commands(sub) -> None:
    tp_ = sub.add_parser("testbed", help="the testbed model")
    tsub = tp_.add_subparsers(dest="testbed_command", required=True)
    tt = tsub.add_parser("train", help="train (or resume) the testbed model",
                         **examples(("tokenprune testbed train --version 2 --max-minutes 60",
                                     "the v2 model, paused after an hour (the same command resumes)")))
    tt.add_argument("--version", type=int, choices=(1, 2), default=1,
                    help="1: CLIP tower trained from scratch (default); 2: the pretrained DINOv2 tower, frozen")
    tt.add_argument("--out", default="runs/testbed", help="checkpoint and output folder (default runs/testbed)")
    tt.add_argument("--steps", type=int, help="v2: training steps (default: TrainConfigV2.steps)")
    tt.add_argument("--features", help="v2: the cached pool features' folder (default: <out>/features)")
    tt.add_argument("--bf16-from", type=int, help="v2: from this step on, train under a bf16 autocast "
                                                  "(faster on CPUs with AVX512-BF16; default: fp32 throughout)")
    tt.add_argument("--feature-gain", type=float, help="v2: tower features x this into the projector while training, "
                                                       "folded into its weights at save (default: TrainConfigV2.feature_gain)")
    tt.add_argument("--seed", type=int, help="model init seed (default: TrainConfig.seed)")
    tt.add_argument("--tower-steps", type=int, help="stage-1 steps (default: TrainConfig.tower_steps)")
    tt.add_argument("--qa-steps", type=int, help="stage-2 steps (default: TrainConfig.qa_steps)")
    tt.add_argument("--max-minutes", type=float, help="pause after a checkpoint past this many minutes")
    tt.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    tt.set_defaults(func=cmd_testbed_train)
    tc = tsub.add_parser("curve", help="plot a model's training curve (its training.json)",
                         **examples(("tokenprune testbed curve", "the shipped model's curve"),
                                    ("tokenprune testbed curve --model runs/testbed/checkpoint.pt",
                                     "a run in progress")))
    tc.add_argument("--model", help="model folder, v1 / v2, or a v2 run's checkpoint.pt (default: the shipped weights)")
    tc.add_argument("--out", default="out/training-curve.png", help="PNG file (default out/training-curve.png)")
    tc.set_defaults(func=cmd_testbed_curve)
