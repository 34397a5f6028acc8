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

Uncertainty and evidence (:mod:`~tokenprune_lab.testbed.stats`):

- every accuracy carries a 95 % Wilson interval (``interval``);
- every run is compared with the *reference* run at the same budget (by default the first
  variant, CLASP in the shipped specs and ablations) by an exact McNemar test on the same
  questions (``vs_reference``: accuracy difference, its paired SE, discordant counts, p);
- **fidelity to the unpruned answer**, which ranks methods with about a tenth of the questions
  accuracy needs: *agreement* (the pruned answer equals the unpruned one; Wilson interval, exact
  McNemar against the reference), the same on the *decisive* questions only (the unpruned answer's
  probability leads the runner-up by at least ``DECISIVE_MARGIN``, so near-tie flips of a model
  at chance do not count), and *KL(unpruned || pruned)* of the next-token distribution at the
  answer slot, in nats (bootstrap interval, paired sign-flip test against the reference); every
  paired test also gives ``detectable``, the smallest true difference it finds with 80 % power;
- **evidence recall**: the share of each question's evidence cells (``Question.evidence``, known
  to the generator) among the visual tokens that reached the LLM (after in-LLM pruning too), per
  class; model-free, so it ranks methods even where the model is weak. Not defined for image
  down-sampling, whose tokens are not cells of the original grid.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from tokenprune.pipeline import Pipeline
from tokenprune.spec import PipelineSpec

from .memo import memoized_tower, tower_cost
from .model import prompt
from .protocol import DECISIVE_MARGIN
from .questions import QA_CLASSES
from .resume import Checkpoint, Interrupted, run_key
from .splits import Example, examples, scene
from .stats import bootstrap_mean, detectable, mcnemar, paired_mean_test, wilson

__all__ = ["Variant", "Dist", "evaluate", "chance", "UNPRUNED"]

UNPRUNED = "unpruned"
#: Bumped when a batch record gains or changes a field, so an older checkpoint is not resumed.
RECORD_VERSION = 2


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
            import atexit

            dist.init_process_group("gloo")
            # tear the group down before the interpreter does: left to process exit, gloo's threads
            # are destroyed while joinable and a rank aborts ("terminate called without an active
            # exception"), seen once in a fresh-clone run of the data-parallel test
            atexit.register(dist.destroy_process_group)
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
    """Single-class batches, block by block of ``batch_size`` scenes: every class's questions about
    scenes 0-15, then 16-31, ... so that a block's images stay in the tower memo
    (:mod:`~tokenprune_lab.testbed.memo`) while all its classes are asked."""
    block = lambda i: exs[i].index // batch_size  # noqa: E731
    order = sorted(range(len(exs)), key=lambda i: (block(i), QA_CLASSES.index(exs[i].klass), exs[i].index, i))
    batches: list[list[int]] = []
    for b in sorted({block(i) for i in order}):
        for k in QA_CLASSES:
            members = [i for i in order if block(i) == b and exs[i].klass == k]
            batches += [members[j:j + batch_size] for j in range(0, len(members), batch_size)]
    return batches


def _groups(exs: Sequence[Example]) -> dict[str, list[int]]:
    """Example indices per class, then ``overall`` (all of them)."""
    out = {k: [i for i, e in enumerate(exs) if e.klass == k] for k in QA_CLASSES}
    out = {k: v for k, v in out.items() if v}
    out["overall"] = list(range(len(exs)))
    return out


def _summarise(exs: Sequence[Example], correct: Sequence[bool]) -> dict[str, float]:
    return {k: round(sum(correct[i] for i in idx) / len(idx), 4) for k, idx in _groups(exs).items()}


def _intervals(exs: Sequence[Example], correct: Sequence[bool]) -> dict[str, list[float]]:
    """95 % Wilson interval of each accuracy in :func:`_summarise`."""
    return {k: [round(x, 4) for x in wilson(sum(correct[i] for i in idx), len(idx))]
            for k, idx in _groups(exs).items()}


def _recall(exs: Sequence[Example], recall: Sequence[float | None]) -> dict[str, float]:
    """Mean evidence recall per class (questions with evidence only)."""
    out = {}
    for k, idx in _groups(exs).items():
        vals = [recall[i] for i in idx if recall[i] is not None]
        if vals:
            out[k] = round(sum(vals) / len(vals), 4)
    return out


def _paired(exs: Sequence[Example], correct: Sequence[bool], ref: Sequence[bool]) -> dict[str, dict]:
    """Exact McNemar test of ``correct`` against the reference's ``ref``, per class and overall."""
    return _mcnemar_by_group(_groups(exs), correct, ref)


def _mcnemar_by_group(groups: dict[str, list[int]], flags: Sequence[bool], ref: Sequence[bool]) -> dict[str, dict]:
    """Per group, the exact McNemar test of ``flags`` against ``ref`` on the group's questions."""
    out = {}
    for k, idx in groups.items():
        t = mcnemar([flags[i] for i in idx], [ref[i] for i in idx])
        out[k] = {"delta": round(t["delta"], 4), "se": round(t["se"], 4), "only_this": t["a_only"],
                  "only_reference": t["b_only"], "p": round(t["p"], 5), "detectable": round(detectable(t["se"]), 4)}
    return out


def _decisive_groups(exs: Sequence[Example], decisive: Sequence[bool]) -> dict[str, list[int]]:
    """:func:`_groups` restricted to the decisive questions (classes without one are left out)."""
    out = {k: [i for i in idx if decisive[i]] for k, idx in _groups(exs).items()}
    return {k: v for k, v in out.items() if v}


def _share(groups: dict[str, list[int]], flags: Sequence[bool]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Per group, the share of ``flags`` set and its 95 % Wilson interval."""
    share = {k: round(sum(flags[i] for i in idx) / len(idx), 4) for k, idx in groups.items()}
    interval = {k: [round(x, 4) for x in wilson(sum(flags[i] for i in idx), len(idx))] for k, idx in groups.items()}
    return share, interval


def _mean_kl(groups: dict[str, list[int]], kl: Sequence[float]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Per group, the mean KL and its 95 % bootstrap interval."""
    mean = {k: round(sum(kl[i] for i in idx) / len(idx), 5) for k, idx in groups.items()}
    interval = {k: [round(x, 5) for x in bootstrap_mean([kl[i] for i in idx])] for k, idx in groups.items()}
    return mean, interval


def _fidelity(exs: Sequence[Example], decisive: Sequence[bool], agree: Sequence[bool],
              kl: Sequence[float]) -> dict[str, Any]:
    """Agreement (all and decisive questions) and KL of one run, per class and overall."""
    agreement, agreement_iv = _share(_groups(exs), agree)
    dec, dec_iv = _share(_decisive_groups(exs, decisive), agree)
    mean, mean_iv = _mean_kl(_groups(exs), kl)
    return {"agreement": agreement, "agreement_interval": agreement_iv, "decisive_agreement": dec,
            "decisive_interval": dec_iv, "kl": mean, "kl_interval": mean_iv}


def _paired_fidelity(exs: Sequence[Example], decisive: Sequence[bool], run: dict, ref: dict) -> dict[str, dict]:
    """Paired tests of a run's fidelity against the reference run's, per class and overall:
    exact McNemar on agreement (all and decisive questions), sign-flip on KL."""
    out: dict[str, dict] = {
        "agreement": _mcnemar_by_group(_groups(exs), run["agree"], ref["agree"]),
        "decisive_agreement": _mcnemar_by_group(_decisive_groups(exs, decisive), run["agree"], ref["agree"]),
        "kl": {},
    }
    for k, idx in _groups(exs).items():
        t = paired_mean_test([run["kl_per_question"][i] for i in idx], [ref["kl_per_question"][i] for i in idx])
        out["kl"][k] = {"delta": round(t["delta"], 5), "se": round(t["se"], 5), "p": round(t["p"], 5),
                        "interval": [round(x, 5) for x in t["interval"]], "detectable": round(detectable(t["se"]), 5)}
    return out


def kept_cells(inputs: dict[str, torch.Tensor], record, image_token_id: int, cells: int) -> torch.Tensor:
    """``(B, cells)`` bool: which visual tokens of each prompt's (single) image reached the LLM, at
    the last in-LLM step if the spec has one. Read from ``record.source`` / ``llm_source``, the
    caller's column behind every position the LLM saw."""
    ids = inputs["input_ids"]  # (B, S)
    is_image = ids == image_token_id
    cell_of = is_image.long().cumsum(1) - 1  # (B, S): the cell index of an image column
    src = record.llm_source if record.llm_source is not None else record.source  # (B, S')
    col = src.clamp_min(0)
    image_at = is_image.gather(1, col) & (src >= 0)  # (B, S')
    kept = torch.zeros(ids.shape[0], cells + 1, dtype=torch.bool, device=ids.device)
    kept.scatter_(1, torch.where(image_at, cell_of.gather(1, col), cells), True)  # column `cells`: a sink
    return kept[:, :cells]


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
    reference: str | None = None,
    memo: bool = True,
    checkpoint: str | Path | None = None,
    keep_checkpoint: bool = False,
) -> dict[str, Any]:
    """Accuracy (with 95 % intervals), evidence recall, paired tests against the ``reference``
    variant (default: the first) and against the unpruned model, share retained, routing accuracy
    and prefill time of each variant at each budget, plus the unpruned model. Returns plain data
    (the JSON that ``tokenprune eval`` writes). ``memo``: compute each image's tower pass once per
    evaluation (:func:`~tokenprune_lab.testbed.memo.memoized_tower`). ``checkpoint``: a file that keeps
    the finished batches, so an interrupted evaluation with the same model and arguments resumes
    (:mod:`~tokenprune_lab.testbed.resume`; one file per process rank, deleted at the end unless
    ``keep_checkpoint``: a caller that runs several evaluations as one job keeps each finished one's
    file until the whole job is done, then :func:`drop_checkpoint`)."""
    dist = dist or Dist()
    exs = examples(split, scenes)
    if classes is not None:
        exs = [e for e in exs if e.klass in classes]
    if not exs:
        raise ValueError(f"split '{split}' with {scenes} scenes has no examples")
    batches = _batches(exs, batch_size)
    mine = _mine(batches, dist)
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

    saved = _checkpoint(checkpoint, model, dist, split=split, scenes=scenes, classes=classes, batch_size=batch_size,
                        runs=[(v.name, v.spec.model_dump(mode="json") if v.spec else None, v.oracle_router, b)
                              for v, b in runs], record_version=RECORD_VERSION)
    todo = [bi for bi in mine if not saved.done(bi, len(runs))]
    total, done = len(runs) * len(mine), len(runs) * (len(mine) - len(todo))
    if len(todo) < len(mine) and dist.rank == 0:
        print(f"resuming from {saved.path}: {len(mine) - len(todo)} of {len(mine)} batches already answered "
              "by every run", file=sys.stderr)
    if progress is not None:
        progress(done, total)
    model.eval()
    try:
        with memoized_tower(model) if memo else nullcontext() as tower_stats:
            for bi in todo:  # each batch is drawn and preprocessed once, then answered by every run
                idx = batches[bi]
                inputs = processor(images=[scene(split, exs[i].index).image for i in idx],
                                   text=[prompt(exs[i].question.text) for i in idx],
                                   return_tensors="pt", padding=True).to(device)
                truth = torch.tensor(tok.convert_tokens_to_ids([exs[i].question.answer for i in idx]), device=device)
                klass = exs[idx[0]].klass
                reference_logp = None  # (B, V): the unpruned run's, which every pruned run is compared with
                for r, (variant, budget) in enumerate(runs):
                    use = pipeline_for(variant, klass)
                    rec, logp_all = _answer(model, inputs, truth, use, variant, budget, tok, cuda, tower_stats,
                                            reference_logp)
                    reference_logp = logp_all if r == 0 else reference_logp
                    if "kept_cells" in rec:  # (B, M) -> evidence recall per question
                        kept = rec.pop("kept_cells")
                        rec["recall"] = [_evidence_recall(kept[j], exs[i].question.evidence) for j, i in enumerate(idx)]
                    saved.add(r, bi, rec)
                    done += 1
                    if progress is not None:
                        progress(done, total)
                saved.maybe_save()
    except KeyboardInterrupt:  # keep what finished, say so, and let the command end without a traceback
        raise _interrupted(saved, mine, len(runs)) from None
    gathered: dict[int, dict[int, dict]] = {}
    for part in dist.gather(saved.results):
        for r, recs in part.items():
            gathered.setdefault(r, {}).update(recs)
    unpruned = _run_summary(exs, batches, gathered[0])
    if keep_checkpoint:
        saved.save()
    else:
        saved.finish()
    decisive = [m >= DECISIVE_MARGIN for m in unpruned["margin"]]
    summaries = [_run_summary(exs, batches, gathered[r], decisive) for r in range(1, len(runs))]
    ref_name = reference if reference is not None else (variants[0].name if variants else None)
    if ref_name is not None and variants and ref_name not in {v.name for v in variants}:
        raise ValueError(f"reference variant '{ref_name}' is not among the variants {[v.name for v in variants]}")
    ref_at = {b: summaries[r - 1] for r, (v, b) in enumerate(runs[1:], start=1) if v.name == ref_name}
    for r, (variant, budget) in enumerate(runs[1:], start=1):
        summary = summaries[r - 1]
        summary["vs_unpruned"] = _paired(exs, summary["correct"], unpruned["correct"])
        if budget in ref_at and variant.name != ref_name:
            summary["vs_reference"] = _paired(exs, summary["correct"], ref_at[budget]["correct"])
            summary["fidelity_vs_reference"] = _paired_fidelity(exs, decisive, summary, ref_at[budget])
    report = {
        "split": split,
        "scenes": len({e.index for e in exs}),
        "examples": len(exs),
        "per_class": dict(Counter(e.klass for e in exs)),
        "decisive_per_class": {k: len(v) for k, v in _decisive_groups(exs, decisive).items()},
        "decisive_margin": DECISIVE_MARGIN,
        "chance": chance(exs),
        "batch_size": batch_size,
        "processes": dist.world,
        "reference": ref_name,
        "unpruned": unpruned,
        "runs": [],
    }
    for r, (variant, budget) in enumerate(runs[1:], start=1):
        report["runs"].append({"variant": variant.name, "spec": variant.spec.name, "budget": budget,
                               "oracle_router": variant.oracle_router, **summaries[r - 1]})
    return report


def _per_question(exs: Sequence[Example], batches: list[list[int]], recs: dict[int, dict], field: str,
                  default: Any = None) -> list[Any]:
    """A batch-record field put back in question order (``default`` where a record lacks it)."""
    out = [default] * len(exs)
    for bi, idx in enumerate(batches):
        values = recs[bi].get(field)
        if values is not None:
            for j, i in enumerate(idx):
                out[i] = values[j]
    return out


def _run_summary(exs: Sequence[Example], batches: list[list[int]], recs: dict[int, dict],
                 decisive: Sequence[bool] | None = None) -> dict[str, Any]:
    """One run's report entry from its batch records; ``decisive`` (from the unpruned run) is given
    for a pruned run, whose fidelity to the unpruned answer is then summarised too."""
    correct = [bool(x) for x in _per_question(exs, batches, recs, "correct")]
    logp = _per_question(exs, batches, recs, "logp")
    out: dict[str, Any] = {
        "accuracy": _summarise(exs, correct),
        "interval": _intervals(exs, correct),
        "correct": correct,
        "prefill_ms_per_example": round(1000 * sum(x["seconds"] for x in recs.values()) / len(exs), 3),
        "mean_logp": round(sum(logp) / len(exs), 5),
        "predictions": _per_question(exs, batches, recs, "pred"),
    }
    if decisive is None:
        out["margin"] = [round(m, 5) for m in _per_question(exs, batches, recs, "margin")]
        return out
    agree = [bool(x) for x in _per_question(exs, batches, recs, "agree")]
    kl = [round(x, 6) for x in _per_question(exs, batches, recs, "kl")]
    out.update(_fidelity(exs, decisive, agree, kl))
    out["agree"], out["kl_per_question"] = agree, kl
    routed = _per_question(exs, batches, recs, "routed")
    if any(x is not None for x in routed):
        out["retained"] = round(sum(x["kept"] for x in recs.values()) / sum(x["total"] for x in recs.values()), 4)
        out["tokens_per_image"] = round(sum(x["kept"] for x in recs.values()) / sum(x["images"] for x in recs.values()), 1)
        out["routing_accuracy"] = round(sum(routed[i] == exs[i].klass for i in range(len(exs))) / len(exs), 4)
        recall = _per_question(exs, batches, recs, "recall")
        if any(x is not None for x in recall):
            out["evidence_recall"] = _recall(exs, recall)
    return out


def _mine(batches: Sequence[list[int]], dist: Dist) -> list[int]:
    """The indices of the batches this process answers."""
    return list(range(dist.rank, len(batches), dist.world))


def answer_count(split: str, scenes: int | None, classes: Sequence[str] | None, batch_size: int,
                 runs: int, dist: Dist | None = None) -> int:
    """How many (run, batch) answers :func:`evaluate` gives in this process: the ``total`` its
    ``progress`` callback receives (a job of several evaluations sums them for one estimate)."""
    exs = [e for e in examples(split, scenes) if classes is None or e.klass in classes]
    return runs * len(_mine(_batches(exs, batch_size), dist or Dist()))


def _interrupted(saved: Checkpoint, mine: Sequence[int], runs: int) -> Interrupted:
    """Save what finished and say so: the :class:`Interrupted` an evaluation ends with on Ctrl-C."""
    kept = saved.finished(mine, runs)
    if saved.path is None:
        return Interrupted(f"{kept} of {len(mine)} batches were answered; nothing was kept (no checkpoint file)")
    saved.save()
    return Interrupted(f"kept {kept} of {len(mine)} finished batches in {saved.path}; "
                       "the same command resumes from them")


def _rank_path(path: str | Path, dist: Dist) -> Path:
    """This process's checkpoint file: ``path`` itself, or one per rank with several."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{dist.rank}{path.suffix}") if dist.world > 1 else path


def _checkpoint(path: str | Path | None, model, dist: Dist, **what: Any) -> Checkpoint:
    """The evaluation's checkpoint (in memory only without ``path``; per rank with several)."""
    if path is None:
        return Checkpoint(None)
    return Checkpoint(_rank_path(path, dist), run_key(model, world=dist.world, rank=dist.rank, **what))


def drop_checkpoint(path: str | Path | None, dist: Dist | None = None) -> None:
    """Delete the checkpoint an evaluation kept (``keep_checkpoint``), once its job is done."""
    if path is not None:
        _rank_path(path, dist or Dist()).unlink(missing_ok=True)


def _answer(model, inputs: dict, truth: torch.Tensor, use: Pipeline | None, variant: Variant, budget,
            tok, cuda: bool, tower_stats: dict | None = None,
            reference_logp: torch.Tensor | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """One run on one batch: correctness, predictions, log p of the truth, time (the tower counted
    as if it had run, when it is memoized: :func:`~tokenprune_lab.testbed.memo.tower_cost`), and for a
    pruned run the tokens kept and the (B, M) cells that reached the LLM. Also returns the ``(B, V)``
    float32 log-probabilities of the answer slot. The unpruned run (``use`` None) records each
    answer's probability margin over the runner-up; a run given ``reference_logp`` (the unpruned
    run's) records whether its answer agrees and ``KL(reference || this)`` in nats."""
    import tokenprune as tp

    ctx = tp.apply(model, use, budget=budget, tokenizer=tok) if use is not None else nullcontext()
    with ctx as handle, torch.inference_mode():
        if cuda:
            torch.cuda.synchronize()
        with tower_cost(tower_stats) as timed:
            logits = model(**inputs).logits[:, -1]  # (B, V)
            if cuda:
                torch.cuda.synchronize()
        seconds = timed["seconds"]
    pred = logits.argmax(-1)  # (B,)
    logp_all = torch.log_softmax(logits.float(), -1)  # (B, V)
    logp = logp_all.gather(1, truth[:, None])[:, 0]
    rec = {"correct": (pred == truth).tolist(), "pred": pred.tolist(), "logp": logp.tolist(), "seconds": seconds}
    if use is None:
        top2 = logp_all.topk(2, -1).values.exp()  # (B, 2)
        rec["margin"] = (top2[:, 0] - top2[:, 1]).tolist()
    if reference_logp is not None:
        rec["agree"] = (pred == reference_logp.argmax(-1)).tolist()
        kl = (reference_logp.exp() * (reference_logp - logp_all)).sum(-1)  # (B,)
        rec["kl"] = kl.clamp_min(0).tolist()  # float32 rounding can leave -1e-7 where the two agree
    if handle is not None:
        last = handle.last
        image_id = model.config.image_token_id
        if not variant.spec.image_downsample:  # down-sampled tokens are not cells of the grid
            cells = int((inputs["input_ids"] == image_id).sum(1).max())  # visual tokens per image
            rec["kept_cells"] = kept_cells(inputs, last, image_id, cells).cpu()
        final = last.llm_kept[-1] if last.llm_kept else last.kept  # after in-LLM pruning too
        rec["kept"] = int(final.sum())
        rec["total"] = int(last.total.sum())
        rec["images"] = int(last.total.numel())
        rec["routed"] = list(last.classes)
    return rec, logp_all


def _evidence_recall(kept: torch.Tensor, evidence: tuple[int, ...]) -> float | None:
    """Share of ``evidence`` cells kept (``None`` for a question without evidence cells)."""
    if not evidence:
        return None
    return float(kept[list(evidence)].float().mean())


def progress_bar(desc: str):
    """A tqdm progress callback ``update(done, total, label="")`` on stderr (``None`` on ranks other
    than 0). Work already done when it is first called (a resumed run's) starts the bar without
    counting towards its rate, so the estimate is for what remains; ``label`` (a calibration's class)
    shows after the counts."""
    from tqdm import tqdm

    if int(os.environ.get("RANK", "0")) != 0:
        return None
    bar = None

    def update(done: int, total: int, label: str = "") -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=done, desc=desc, file=sys.stderr, unit="answer",
                       postfix=label or None)
        elif label and bar.postfix != label:
            bar.set_postfix_str(label, refresh=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update
