"""Accuracy of pruning pipelines on the testbed: ``tokenprune eval`` and the engine of ``ablate``
and ``calibrate``.

A *run* is one variant (a pipeline spec, optionally with the oracle router) at one budget. Every
run sees the same batches: the split's examples sorted by (class, scene) and cut into batches of
``batch_size``, so batches are single-class (which is what lets the oracle router be a fixed
router per batch) and a batch's composition never depends on the number of processes.

Data parallel: under ``torchrun`` (``WORLD_SIZE > 1``) each process takes every ``world``-th batch,
and the per-example results are gathered with ``torch.distributed.all_gather_object`` (gloo on the
CPU) and put back in batch order, so the result equals the single-process one.

The answer is the argmax of the next-token logits after ``assistant:`` (every answer is one
token, so this is greedy decoding's first token). Prefill time is the wall time of the model's
forward on a batch, pruning included, per example.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from ..pipeline import Pipeline
from ..spec import PipelineSpec
from .model import prompt
from .questions import QA_CLASSES
from .splits import Example, examples, scene

__all__ = ["Variant", "Dist", "evaluate", "chance", "UNPRUNED"]

UNPRUNED = "unpruned"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A pipeline to evaluate. ``oracle_router``: route every question to its true class.
    ``budgets``: this variant's own budgets instead of the evaluation's (``None`` in it: the spec's
    own budget, e.g. pooling's fixed count or FastV's paper ratio)."""

    name: str
    spec: PipelineSpec | None          # None: the unpruned model
    oracle_router: bool = False
    budgets: tuple[int | float | None, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Dist:
    """The process group, if any: ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def chance(exs: Sequence[Example]) -> dict[str, float]:
    """Per class, the share of the most frequent answer (a constant guesser's accuracy)."""
    out = {}
    for k in QA_CLASSES:
        answers = Counter(e.question.answer for e in exs if e.klass == k)
        if answers:
            out[k] = round(answers.most_common(1)[0][1] / sum(answers.values()), 4)
    return out


def _batches(exs: Sequence[Example], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(exs)), key=lambda i: (QA_CLASSES.index(exs[i].klass), exs[i].index, i))
    batches: list[list[int]] = []
    for k in QA_CLASSES:
        members = [i for i in order if exs[i].klass == k]
        batches += [members[j:j + batch_size] for j in range(0, len(members), batch_size)]
    return batches


def _summarise(exs: Sequence[Example], correct: Sequence[bool]) -> dict[str, float]:
    acc = {}
    for k in QA_CLASSES:
        idx = [i for i, e in enumerate(exs) if e.klass == k]
        if idx:
            acc[k] = round(sum(correct[i] for i in idx) / len(idx), 4)
    acc["overall"] = round(sum(correct) / max(1, len(correct)), 4)
    return acc


def evaluate(
    model,
    processor,
    variants: Sequence[Variant],
    budgets: Sequence[int],
    split: str = "test",
    *,
    scenes: int | None = None,
    classes: Sequence[str] | None = None,
    batch_size: int = 16,
    dist: Dist | None = None,
    progress: Callable[[int, int], None] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Accuracy, share retained, routing accuracy and prefill time of each variant at each budget,
    plus the unpruned model. Returns plain data (the JSON that ``tokenprune eval`` writes)."""
    import tokenprune as tp

    dist = dist or Dist()
    exs = examples(split, scenes)
    if classes is not None:
        exs = [e for e in exs if e.klass in classes]
    if not exs:
        raise ValueError(f"split '{split}' with {scenes} scenes has no examples")
    batches = _batches(exs, batch_size)
    mine = list(range(dist.rank, len(batches), dist.world))
    tok = processor.tokenizer
    cuda = torch.device(device).type == "cuda"

    runs: list[tuple[Variant, int | None]] = [(Variant(UNPRUNED, None), None)]
    runs += [(v, b) for v in variants for b in (v.budgets if v.budgets is not None else budgets)]
    # one pipeline per variant; the oracle router needs one per (variant, class)
    pipes = {id(v): Pipeline(v.spec) for v in variants if not v.oracle_router}
    oracle_pipes: dict[tuple[int, str], Pipeline] = {}

    def pipeline_for(variant: Variant, klass: str) -> Pipeline | None:
        if variant.spec is None:
            return None
        if not variant.oracle_router:
            return pipes[id(variant)]
        key = (id(variant), klass)
        if key not in oracle_pipes:
            oracle_pipes[key] = Pipeline(variant.spec.replace(router={"stage": "fixed", "class_name": klass}))
        return oracle_pipes[key]

    total, done = len(runs) * len(mine), 0
    results: dict[int, dict[int, dict]] = {}  # run -> batch -> record
    model.eval()
    for bi in mine:  # each batch is drawn and preprocessed once, then answered by every run
        idx = batches[bi]
        inputs = processor(images=[scene(split, exs[i].index).image for i in idx],
                           text=[prompt(exs[i].question.text) for i in idx],
                           return_tensors="pt", padding=True).to(device)
        truth = torch.tensor(tok.convert_tokens_to_ids([exs[i].question.answer for i in idx]), device=device)
        klass = exs[idx[0]].klass
        for r, (variant, budget) in enumerate(runs):
            use = pipeline_for(variant, klass)
            ctx = tp.apply(model, use, budget=budget, tokenizer=tok) if use is not None else nullcontext()
            with ctx as handle, torch.inference_mode():
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                logits = model(**inputs).logits[:, -1]  # (B, V)
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
            pred = logits.argmax(-1)
            logp = torch.log_softmax(logits.float(), -1).gather(1, truth[:, None])[:, 0]
            rec = {"correct": (pred == truth).tolist(), "pred": pred.tolist(), "logp": logp.tolist(),
                   "seconds": seconds}
            if handle is not None:
                last = handle.last
                final = last.llm_kept[-1] if last.llm_kept else last.kept  # after in-LLM pruning too
                rec["kept"] = int(final.sum())
                rec["total"] = int(last.total.sum())
                rec["images"] = int(last.total.numel())
                rec["routed"] = list(handle.last.classes)
            results.setdefault(r, {})[bi] = rec
            done += 1
            if progress is not None:
                progress(done, total)
    gathered: dict[int, dict[int, dict]] = {}
    for part in dist.gather(results):
        for r, recs in part.items():
            gathered.setdefault(r, {}).update(recs)

    def run_summary(r: int) -> dict[str, Any]:
        recs = gathered[r]
        correct = [False] * len(exs)
        pred = [0] * len(exs)
        logp = [0.0] * len(exs)
        routed: list[str | None] = [None] * len(exs)
        for bi, idx in enumerate(batches):
            for j, i in enumerate(idx):
                correct[i] = bool(recs[bi]["correct"][j])
                pred[i] = recs[bi]["pred"][j]
                logp[i] = recs[bi]["logp"][j]
                if "routed" in recs[bi]:
                    routed[i] = recs[bi]["routed"][j]
        out: dict[str, Any] = {
            "accuracy": _summarise(exs, correct),
            "prefill_ms_per_example": round(1000 * sum(x["seconds"] for x in recs.values()) / len(exs), 3),
            "mean_logp": round(sum(logp) / len(exs), 5),
            "predictions": pred,
        }
        if any(x is not None for x in routed):
            out["retained"] = round(sum(x["kept"] for x in recs.values()) / sum(x["total"] for x in recs.values()), 4)
            out["tokens_per_image"] = round(sum(x["kept"] for x in recs.values()) / sum(x["images"] for x in recs.values()), 1)
            out["routing_accuracy"] = round(sum(routed[i] == exs[i].klass for i in range(len(exs))) / len(exs), 4)
        return out

    unpruned = run_summary(0)
    report = {
        "split": split,
        "scenes": len({e.index for e in exs}),
        "examples": len(exs),
        "per_class": dict(Counter(e.klass for e in exs)),
        "chance": chance(exs),
        "batch_size": batch_size,
        "processes": dist.world,
        "unpruned": unpruned,
        "runs": [],
    }
    for r, (variant, budget) in enumerate(runs[1:], start=1):
        report["runs"].append({"variant": variant.name, "spec": variant.spec.name, "budget": budget,
                               "oracle_router": variant.oracle_router, **run_summary(r)})
    return report


def progress_bar(desc: str):
    """A tqdm progress callback on stderr (a no-op on ranks other than 0)."""
    from tqdm import tqdm

    if int(os.environ.get("RANK", "0")) != 0:
        return None
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="batch")
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update
