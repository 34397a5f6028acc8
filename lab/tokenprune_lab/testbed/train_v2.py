"""``tokenprune testbed train --version 2``: the v2 decoder on the frozen, pretrained DINOv2 tower.

The tower is never trained, so its features come from :class:`~.features.FeaturePool` (computed
once per pool scene) and a step costs the projector and the decoder only. What a step trains on:

- **every evaluated class**, ``draws[c]`` questions of class ``c`` per scene, where the draws
  follow the class's running accuracy on the training stream: a class below ``easy_at`` gets
  ``max_draws``, one at or above it ``min_draws`` (more practice where the model is weak);
- **one-hop auxiliary questions** (:data:`~.questions.AUX_KINDS`: does a colour / a shape occur,
  an object's row and column, how many objects, each digit), training only;
- all of one scene's questions *packed* behind one image prefix with a block mask (each question
  computes exactly its single-turn prompt, see :class:`~.train.Packer`);
- the alignment loss of v1 (each projected patch to the words of its colour, shape, digit).

The scenes: each step draws ``batch`` pool scenes. During the first ``grow`` share of the run the
most objects a scene may hold rises from 2 to 7; throughout, a share ``easy_share`` of every batch
are 1-2 object scenes, and once a class's running accuracy first passes ``retrieval_at`` (retrieval
has appeared), that class's questions come from 1-2 object scenes for the next ``restart_steps``
steps (a per-class curriculum restart).

The learning rate warms up, stays at its peak until ``decay_from`` of the run and then follows a
cosine to ``floor`` times the peak (it never reaches zero). Attention is never supervised.

``feature_gain``: during training the tower features enter the projector multiplied by this
gain; the saved projector has it folded into its first layer's weights (:func:`fold_feature_gain`),
so the shipped model is a plain LLaVA that reads the tower's own features. DINOv2's layer -2
features are small (about 0.57 per dimension) and a fresh ``nn.Linear`` leaves the projector's
GELU nearly linear on them; with a gain of 1, a fresh decoder stayed at chance on attribute
questions about 1-2 object scenes for 500 steps, with 20 it reached 0.62 (``docs/testbed.md``,
"What held the first v2 run on its plateau"). It is a reparameterisation of the projector's first layer
(its initial scale and its effective rate), not new information.

``bf16_from``: from that step on, the projector and decoder run under a bf16 autocast (weights,
AdamW state, the loss and its softmax stay fp32); on a CPU with AVX512-BF16 a step costs about
0.6 of the fp32 one. ``None`` (the default) trains in fp32 throughout. The held-out curve and the
saved weights are fp32 either way.

Everything is a function of the seed and the step: the scenes and questions of step ``k`` are
drawn from ``default_rng([seed, k])`` and the adaptive state lives in the checkpoint, so a resumed
run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .features import CHUNK, FeaturePool, pool_scene
from .model import ARCH_V2, arch_with, build, build_processor, save
from .questions import AUX_KINDS, QA_CLASSES, ask, ask_aux
from .train import Packer, mimetic_init, qa_loss

__all__ = ["TrainConfigV2", "train_v2", "fold_feature_gain"]


@dataclasses.dataclass
class TrainConfigV2:
    seed: int = 0
    steps: int = 6000
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 200
    decay_from: float = 0.6          # share of the run after which the rate decays
    floor: float = 0.1               # the last rate, as a share of the peak
    pool: int = 3200                 # pool scenes with cached features
    min_draws: int = 1
    max_draws: int = 3
    easy_at: float = 0.95            # a class at or above this running accuracy gets min_draws
    aux_draws: int = 1
    grow: float = 0.2
    easy_share: float = 0.25
    retrieval_at: float = 0.7
    restart_steps: int = 300
    window: int = 50                 # steps in the running accuracy
    align_weight: float = 0.5
    checkpoint_every: int = 50
    log_every: int = 25
    arch: dict | None = None         # overrides of model.ARCH_V2
    check_scenes: int = 20
    val_scenes: int = 64             # held-out curve: val scenes asked every val_every steps
    val_every: int = 250
    features: str | None = None      # the pool's folder (default: <out>/features)
    chunk: int = CHUNK               # scenes per cache file
    bf16_from: int | None = None     # steps from this one on: projector and decoder under bf16 autocast
    feature_gain: float = 20.0       # tower features x this into the projector in training; folded in at save


def _lr(step: int, cfg: TrainConfigV2) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    start = cfg.decay_from * cfg.steps
    if step < start:
        return cfg.lr
    t = min(1.0, (step - start) / max(1.0, cfg.steps - start))
    return cfg.lr * (cfg.floor + (1 - cfg.floor) * 0.5 * (1 + math.cos(math.pi * t)))


class _Pools:
    """Pool indices by object count, so a step can ask for easy or capped scenes."""

    def __init__(self, size: int):
        counts = np.array([len(pool_scene(i).objects) for i in range(size)])
        self.by_cap = {cap: np.flatnonzero(counts <= cap) for cap in range(1, 8)}

    def draw(self, rng: np.random.Generator, cap: int, n: int) -> list[int]:
        return [int(i) for i in rng.choice(self.by_cap[cap], size=n, replace=False)]


def _questions(scenes, easy_rows: set[int], restart: dict[str, int], draws: dict[str, int], aux_draws: int,
               first_draw: int = 0):
    """Per scene, its questions: each class ``draws[c]`` times from draw ``first_draw`` on (a
    restarting class only on easy scenes), then the auxiliary ones. A new epoch over the pool
    starts at new draws, so a scene is asked new questions each time it comes back."""
    out = []
    for b, s in enumerate(scenes):
        qs = []
        for c in QA_CLASSES:
            if restart.get(c, 0) > 0 and b not in easy_rows:
                continue
            qs += [q for d in range(draws[c]) if (q := ask(s, c, first_draw + d)) is not None]
        out.append(qs + ask_aux(s, aux_draws, first=first_draw))
    return out


@torch.no_grad()
def _held_out(model, packer: Packer, val: FeaturePool, scenes: int, batch: int, gain: float) -> dict[str, float]:
    """Accuracy per class on the first ``scenes`` val scenes, one question per class (the same
    questions ``tokenprune eval`` asks), through the packed path (equal to single prompts)."""
    from .splits import scene as split_scene

    was = model.training
    model.eval()
    hits: dict[str, list[float]] = {}
    for start in range(0, scenes, batch):
        idx = list(range(start, min(scenes, start + batch)))
        sc = [split_scene("val", i) for i in idx]
        qs = [[q for c in QA_CLASSES if (q := ask(s, c, 0)) is not None] for s in sc]
        _, klasses, correct = qa_loss(model, packer, sc, qs, 0.0, val.features(idx) * gain)
        for k, c in zip(klasses, correct, strict=True):
            hits.setdefault(k, []).append(float(c))
    model.train(was)
    acc = {k: round(float(np.mean(v)), 4) for k, v in hits.items()}
    acc["overall"] = round(float(np.mean([c for v in hits.values() for c in v])), 4)
    return acc


def train_v2(cfg: TrainConfigV2, out: str | Path, *, log: Callable[[str], None] = print,
             max_minutes: float | None = None) -> dict:
    """Train (or resume) into ``out``; returns the record (also written as ``out/training.json``)."""
    if cfg.val_every % cfg.log_every:
        raise ValueError(f"val_every ({cfg.val_every}) must be a multiple of log_every ({cfg.log_every}): "
                         "the held-out accuracy is recorded with a curve point")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arch = arch_with(cfg.arch, base=ARCH_V2)
    model, tok = build(cfg.seed, arch=arch)
    mimetic_init(model)
    tower = model.model.vision_tower.eval().requires_grad_(False)
    processor = build_processor(tok, "dinov2")
    pool = FeaturePool(cfg.features or out / "features", model, processor, cfg.pool, chunk=cfg.chunk)
    pool.build(log)
    pools = _Pools(cfg.pool)
    val = FeaturePool(Path(pool.dir).parent / "features-val", model, processor, cfg.val_scenes, source="val",
                      chunk=cfg.chunk)
    val.build(log)
    packer = Packer(tok, pool.features([0]).shape[1])
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ckpt = out / "checkpoint.pt"
    state = {"step": 0, "curve": [], "seconds": 0.0, "recent": {c: [] for c in (*QA_CLASSES, *_aux())},
             "restart": {}, "restarted": []}
    if ckpt.exists():
        ck = torch.load(ckpt, weights_only=False)
        _check_same_recipe(ck.get("config", {}), cfg, ckpt)
        model.load_state_dict(ck["model"], strict=False)
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        log(f"resumed from {ckpt} at step {state['step']}")

    def checkpoint() -> None:
        own = {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower")}
        tmp = ckpt.with_suffix(".part")
        torch.save({"model": own, "opt": opt.state_dict(), "state": state, "config": dataclasses.asdict(cfg)}, tmp)
        tmp.replace(ckpt)

    t0, seconds0, stopped = time.perf_counter(), state["seconds"], False
    window: dict[str, list[float]] = {}
    model.train()
    tower.eval()
    while state["step"] < cfg.steps and not stopped:
        step = state["step"]
        rng = np.random.default_rng([cfg.seed, step])
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        running = {c: (float(np.mean(v)) if v else 0.0) for c, v in state["recent"].items()}
        draws = {c: cfg.min_draws if running[c] >= cfg.easy_at else cfg.max_draws for c in QA_CLASSES}
        cap = 2 + round(min(1.0, step / max(1, cfg.grow * cfg.steps)) * 5)
        restarting = any(v > 0 for v in state["restart"].values())
        n_easy = max(int(restarting), round(cfg.easy_share * cfg.batch))
        indices = pools.draw(rng, 2, n_easy) + pools.draw(rng, cap, cfg.batch - n_easy)
        scenes = [pool_scene(i) for i in indices]
        epoch = step * cfg.batch // cfg.pool
        questions = _questions(scenes, set(range(n_easy)), state["restart"], draws, cfg.aux_draws,
                               first_draw=epoch * cfg.max_draws)
        feats = pool.features(indices) * cfg.feature_gain  # (B, M, Dv) float32, read outside the autocast
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_from is not None and step >= cfg.bf16_from):
            loss, klasses, correct = qa_loss(model, packer, scenes, questions, cfg.align_weight, feats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _update(state, cfg, klasses, correct)
        for k, c in zip(klasses, correct, strict=True):
            window.setdefault(k, []).append(float(c))
        window.setdefault("loss", []).append(float(loss.detach()))
        state["step"] += 1
        if state["step"] % cfg.log_every == 0:
            point = {"step": state["step"], "seconds": round(seconds0 + time.perf_counter() - t0, 1),
                     "lr": round(_lr(step, cfg), 6), "max_objects": cap,
                     **{k: round(float(np.mean(v)), 4) for k, v in sorted(window.items())}}
            if state["step"] % cfg.val_every == 0:
                point["val"] = _held_out(model, packer, val, cfg.val_scenes, 16, cfg.feature_gain)
            state["curve"].append(point)
            log(json.dumps(point))
            window = {}
        if state["step"] % cfg.checkpoint_every == 0:
            state["seconds"] = seconds0 + time.perf_counter() - t0
            checkpoint()
            if max_minutes is not None and (time.perf_counter() - t0) / 60 >= max_minutes:
                log(f"stopping after {max_minutes} min at step {state['step']}; run again to resume")
                stopped = True
    state["seconds"] = seconds0 + time.perf_counter() - t0
    checkpoint()
    record = {"version": 2, "config": dataclasses.asdict(cfg), "arch": arch, "step": state["step"],
              "seconds": round(state["seconds"], 1), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "finished": not stopped, "restarted": state["restarted"], "curve": state["curve"]}
    if not stopped:
        from .train import _check

        model.eval()
        fold_feature_gain(model, cfg.feature_gain)
        save(model, tok, out, record)
        record["check"] = _check(out, cfg.check_scenes)
        (out / "training.json").write_text(json.dumps(record, indent=2))
    return record


def fold_feature_gain(model, gain: float) -> None:
    """Fold the training-time feature gain into the projector's first layer (in place): afterwards
    ``projector(features)`` equals what ``projector(gain * features)`` was."""
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight.mul_(gain)


#: Settings a checkpoint can only be resumed under unchanged (they change what the weights mean).
_RECIPE_KEYS = ("seed", "batch", "pool", "arch", "feature_gain")
#: Settings added after checkpoints existed: the behaviour a checkpoint without them was trained with.
_BEFORE_THEY_EXISTED = {"feature_gain": 1.0}


def _check_same_recipe(saved: dict, cfg: TrainConfigV2, ckpt: Path) -> None:
    """Refuse to resume a checkpoint under another recipe (a checkpoint written before a setting
    existed has that setting's old behaviour, :data:`_BEFORE_THEY_EXISTED`)."""
    for key in _RECIPE_KEYS:
        was, now = saved.get(key, _BEFORE_THEY_EXISTED.get(key)), getattr(cfg, key)
        if was != now:
            raise ValueError(f"{ckpt} was trained with {key} = {was!r}, this run asks for {now!r}: resuming would mix "
                             f"two recipes; train into another --out, or resume with {key} = {was!r}")


def _aux() -> tuple[str, ...]:
    return tuple("aux:" + k for k in AUX_KINDS)


def _update(state: dict, cfg: TrainConfigV2, klasses: list[str], correct: list[bool]) -> None:
    """Running accuracy per class over the last ``window`` steps, and the per-class restarts."""
    step_acc: dict[str, list[float]] = {}
    for k, c in zip(klasses, correct, strict=True):
        step_acc.setdefault(k, []).append(float(c))
    for k, v in step_acc.items():
        rec = state["recent"].setdefault(k, [])
        rec.append(float(np.mean(v)))
        del rec[:-cfg.window]
    for c in list(state["restart"]):
        state["restart"][c] -= 1
    for c in QA_CLASSES:
        rec = state["recent"].get(c, [])
        if (c not in state["restarted"] and len(rec) >= cfg.window // 2
                and float(np.mean(rec)) >= cfg.retrieval_at):
            state["restarted"].append(c)
            state["restart"][c] = cfg.restart_steps
