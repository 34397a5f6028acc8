"""``tokenprune testbed train``: train the testbed model from its seed, with checkpoints.

Two stages (see ``docs/testbed.md`` for why):

1. **Tower.** The CLIP tower alone learns dense per-patch labels (colour, shape, digit and which
   digit of the number, object anchor, row and column) and the background from [CLS]. This is the
   cheap way to a tower that sees every patch.
2. **Question answering.** The tower is frozen; the projector and the decoder learn to answer.
   Each example is one scene with every question about it *packed* into one sequence: the image
   prefix once, then each question, with a block mask so a question sees the image and itself
   only, at the positions it would have alone. So each question is computed exactly as the
   single-turn prompt that evaluation uses, and no question can read another's answer. The loss
   is on the answer token. An auxiliary loss maps each projected patch, through the tied word
   embeddings, to the words for its colour, shape and digit (LLaVA's feature-alignment idea); it
   never touches attention. The number of objects grows over the first part of the stage
   (a curriculum from 1-2 objects to the test range).

Everything is a function of the seed: the scenes of step ``k`` are train scenes
``k * batch .. (k+1) * batch - 1``, so a resumed run sees exactly the data the uninterrupted run
would have seen. A checkpoint (model, optimiser, step, curve) is written every
``checkpoint_every`` steps; run the same command again to resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, arch_with, build, save, tokens_per_image
from .questions import ask_all
from .scenes import BACKGROUNDS, COLORS, GRID, SHAPES, make_scene
from .splits import SPLITS

__all__ = ["TrainConfig", "train", "pixels"]


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    tower_steps: int = 800
    tower_batch: int = 16
    tower_lr: float = 1e-3
    qa_steps: int = 4000
    qa_batch: int = 8
    qa_lr: float = 1e-3
    draws: int = 2                 # questions per class per scene in stage 2
    warmup: int = 100
    curriculum: float = 0.3        # share of stage 2 over which the object count grows
    align_weight: float = 0.5
    checkpoint_every: int = 50
    log_every: int = 25
    arch: dict | None = None       # overrides of model.ARCH (the CI test trains a miniature)
    check_scenes: int = 20         # val scenes whose predictions are recorded with the weights
    mimetic: bool = True           # mimetic init of the decoder's attention (see mimetic_init)


def pixels(images) -> torch.Tensor:
    """CLIP preprocessing for 336 px PIL images, equal to the processor's: ``(B, 3, 336, 336)``."""
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _train_scene(index: int, max_objects: int):
    s = SPLITS["train"]
    lo = min(s.num_objects[0], max_objects)
    return make_scene(s.seed, index, num_objects=(max(1, lo - 1), max_objects), small=s.small,
                      small_text=s.small_text)


def _cell_labels(scenes, name: str) -> torch.Tensor:
    """``(B, M)`` int64: the scenes' per-cell label ``name`` (a field of ``CellLabels``), row-major."""
    return torch.from_numpy(np.stack([getattr(s.labels, name).reshape(-1) for s in scenes]))


# -- stage 1 ---------------------------------------------------------------------------------------
class DenseHeads(nn.Module):
    """Per-patch linear read-outs used only to pre-train the tower."""

    SIZES = {"color": 1 + len(COLORS), "shape": 1 + len(SHAPES), "digit": 21, "anchor": 2,
             "row": GRID, "col": GRID}
    #: Heads whose class 0 means "nothing here"; accuracy is reported on the other patches.
    FOREGROUND = ("color", "shape", "digit", "anchor")
    NONE_WEIGHT = 0.1

    def __init__(self, width: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in self.SIZES.items()})
        self.background = nn.Linear(width, len(BACKGROUNDS))

    def loss(self, hidden: torch.Tensor, scenes) -> tuple[torch.Tensor, dict]:
        cls, patches = hidden[:, 0], hidden[:, 1:]  # (B, Dv), (B, M, Dv)
        B, M = patches.shape[:2]
        rows = torch.arange(GRID).repeat_interleave(GRID)
        cols = torch.arange(GRID).repeat(GRID)
        target = {k: _cell_labels(scenes, k) for k in self.FOREGROUND}
        target["row"], target["col"] = rows.expand(B, M), cols.expand(B, M)
        total, acc = 0.0, {}
        for k, head in self.heads.items():
            logits = head(patches)  # (B, M, n)
            weight = None
            if k in self.FOREGROUND:  # most patches are "none": weigh it down
                weight = torch.ones(logits.shape[-1])
                weight[0] = self.NONE_WEIGHT
            total = total + F.cross_entropy(logits.flatten(0, 1), target[k].flatten(), weight=weight)
            fg = target[k] > 0 if k in self.FOREGROUND else torch.ones_like(target[k], dtype=torch.bool)
            acc[k] = float((logits.argmax(-1) == target[k])[fg].float().mean()) if fg.any() else 1.0
        bg = torch.tensor([s.labels.background for s in scenes])
        logits = self.background(cls)
        total = total + F.cross_entropy(logits, bg)
        acc["background"] = float((logits.argmax(-1) == bg).float().mean())
        return total, acc


# -- stage 2 ---------------------------------------------------------------------------------------
class Packer:
    """Builds packed multi-question sequences (see the module docstring)."""

    def __init__(self, tokenizer, num_patches: int):
        self.tok = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        head = tokenizer("<s>user:", add_special_tokens=False)["input_ids"]
        self.prefix = head + [self.image_id] * num_patches  # what the processor makes of prompt()'s head
        self.answer_ids = {}

    def turn(self, question: str) -> list[int]:
        return self.tok(f"{question} assistant:", add_special_tokens=False)["input_ids"]

    def answer(self, word: str) -> int:
        if word not in self.answer_ids:
            ids = self.tok(word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"answer '{word}' is not one token of the testbed vocabulary ({ids}); "
                                 "answers must be single words that build_tokenizer() knows")
            self.answer_ids[word] = ids[0]
        return self.answer_ids[word]

    def pack(self, questions_per_scene):
        """ids (B, T), bool mask (B, 1, T, T), positions (B, T), answer slots (N, 3): batch row,
        position of the answer's logits, answer id; plus the class of each slot."""
        P = len(self.prefix)
        rows, slots, klasses = [], [], []
        for b, qs in enumerate(questions_per_scene):
            ids, turn_of, pos = list(self.prefix), [-1] * P, list(range(P))
            for t, q in enumerate(qs):
                tt = self.turn(q.text)
                ids += tt
                turn_of += [t] * len(tt)
                pos += list(range(P, P + len(tt)))
                slots.append((b, len(ids) - 1, self.answer(q.answer)))
                klasses.append(q.klass)
            rows.append((ids, turn_of, pos))
        T = max(len(r[0]) for r in rows)
        pad = self.tok.pad_token_id
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        turn = torch.full((len(rows), T), -2, dtype=torch.long)  # -2: padding
        pos = torch.zeros((len(rows), T), dtype=torch.long)
        for b, (i, t, p) in enumerate(rows):
            ids[b, :len(i)] = torch.tensor(i)
            turn[b, :len(t)] = torch.tensor(t)
            pos[b, :len(p)] = torch.tensor(p)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = turn[:, :, None] == turn[:, None, :]  # (B, T, T)
        sees_prefix = (turn[:, None, :] == -1)
        mask = causal & (same | sees_prefix)
        return ids, mask[:, None], pos, torch.tensor(slots), klasses


def _lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _align_targets(scenes, word_id) -> dict[str, torch.Tensor]:
    """Per patch, the word id of its colour / shape / digit (-100 where there is none)."""
    color_words = torch.tensor([-100] + [word_id(c) for c in COLORS])
    shape_words = torch.tensor([-100] + [word_id(s) for s in SHAPES])
    digit_words = torch.tensor([-100] + [word_id(str(d % 10)) for d in range(20)])
    return {"color": color_words[_cell_labels(scenes, "color")],
            "shape": shape_words[_cell_labels(scenes, "shape")],
            "digit": digit_words[_cell_labels(scenes, "digit")]}


def qa_loss(model, packer: Packer, scenes, questions, align_weight: float, feats: torch.Tensor | None = None):
    """Answer loss (+ alignment loss) for a batch of scenes with their questions. ``feats``: the
    tower's features of the scenes, ``(B, M, Dv)``, if they are cached (else the tower runs)."""
    ids, mask, pos, slots, klasses = packer.pack(questions)
    if feats is None:
        pv = pixels([s.image for s in scenes])
        with torch.no_grad():
            out = model.model.vision_tower(pv, output_hidden_states=True)
            layer = model.config.vision_feature_layer
            feats = out.hidden_states[layer][:, 1:]  # (B, M, Dv): the "default" strategy drops [CLS]
    image = model.model.multi_modal_projector(feats)  # (B, M, D)
    embeds = model.get_input_embeddings()(ids)  # (B, T, D)
    is_image = ids == packer.image_id
    embeds = embeds.masked_scatter(is_image[..., None], image.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    h = hidden[slots[:, 0], slots[:, 1]]  # (N, D)
    logits = model.lm_head(h).float()  # (N, V); fp32 also under a bf16 autocast
    loss = F.cross_entropy(logits, slots[:, 2])
    correct = (logits.argmax(-1) == slots[:, 2]).tolist()
    if align_weight > 0:
        targets = _align_targets(scenes, packer.answer)
        word_logits = model.lm_head(image).float()  # (B, M, V)
        a = sum(F.cross_entropy(word_logits.flatten(0, 1), t.flatten(), ignore_index=-100) for t in targets.values())
        loss = loss + align_weight * a
    return loss, klasses, correct


def mimetic_init(model, qk_std: float | None = None, vo_std: float = 0.05) -> None:
    """Mimetic initialisation of the decoder's self-attention (Trockman & Kolter, 2023, "Mimetic
    initialization of self-attention layers"): ``W_k = W_q`` so that ``W_q^T W_k`` is positive
    semi-definite (a token starts out attending to tokens like itself, and with RoPE to nearby
    ones), and ``W_o = W_v^T`` so that a head starts out copying what it attends to. It only
    sets the starting point; no attention target is ever used. A decoder trained from scratch
    otherwise sits for a long time on the retrieval plateau (``docs/testbed.md``).

    ``qk_std`` defaults to ``0.08 * sqrt(128 / width)``, so the initial attention logits have the
    same scale at every decoder width (0.08 at v1's width 128)."""
    lm = model.model.language_model
    if qk_std is None:
        qk_std = 0.08 * math.sqrt(128 / lm.config.hidden_size)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for layer in lm.layers:
            a = layer.self_attn
            if a.k_proj.weight.shape != a.q_proj.weight.shape:
                raise ValueError("mimetic init needs as many key/value heads as query heads")
            q = torch.randn(a.q_proj.weight.shape, generator=g) * qk_std
            a.q_proj.weight.copy_(q)
            a.k_proj.weight.copy_(q)
            v = torch.randn(a.v_proj.weight.shape, generator=g) * vo_std
            a.v_proj.weight.copy_(v)
            a.o_proj.weight.copy_(v.T)


# -- the loop --------------------------------------------------------------------------------------
def train(cfg: TrainConfig, out: str | Path, *, log=print, max_minutes: float | None = None) -> dict:
    """Train (or resume) into ``out``; returns the training record (also ``out/training.json``).

    ``max_minutes`` stops early after a checkpoint (the next call resumes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arch = arch_with(cfg.arch)
    model, tok = build(cfg.seed, arch=arch)
    if cfg.mimetic:
        mimetic_init(model)
    tower = model.model.vision_tower
    heads = DenseHeads(tower.config.hidden_size)
    packer = Packer(tok, tokens_per_image(model))
    tower_params = list(tower.parameters()) + list(heads.parameters())
    qa_params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    opt1 = torch.optim.AdamW(tower_params, lr=cfg.tower_lr, weight_decay=0.01)
    opt2 = torch.optim.AdamW(qa_params, lr=cfg.qa_lr, weight_decay=0.01)
    ckpt_path = out / "checkpoint.pt"
    state = {"stage": 1, "step": 0, "curve": [], "seconds": 0.0}
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        heads.load_state_dict(ck["heads"])
        opt1.load_state_dict(ck["opt1"])
        opt2.load_state_dict(ck["opt2"])
        state = ck["state"]
        log(f"resumed from {ckpt_path}: stage {state['stage']} step {state['step']}")

    def checkpoint():
        torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "opt1": opt1.state_dict(),
                    "opt2": opt2.state_dict(), "state": state, "config": dataclasses.asdict(cfg)}, ckpt_path)

    t_start = time.perf_counter()
    seconds0 = state["seconds"]
    stopped = False

    def elapsed() -> float:
        return seconds0 + time.perf_counter() - t_start

    window: dict[str, list[float]] = {}
    while not stopped:
        stage, step = state["stage"], state["step"]
        if stage == 1 and step >= cfg.tower_steps:
            state.update(stage=2, step=0)
            continue
        if stage == 2 and step >= cfg.qa_steps:
            break
        if stage == 1:
            model.train()
            for g in opt1.param_groups:
                g["lr"] = _lr(step, cfg.tower_steps, cfg.warmup, cfg.tower_lr)
            scenes = [_train_scene(step * cfg.tower_batch + i, 7) for i in range(cfg.tower_batch)]
            hidden = tower(pixels([s.image for s in scenes]), output_hidden_states=True).hidden_states[
                model.config.vision_feature_layer]
            loss, acc = heads.loss(hidden, scenes)
            opt1.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tower_params, 1.0)
            opt1.step()
            for k, v in acc.items():
                window.setdefault(k, []).append(v)
        else:
            model.train()
            tower.eval()
            for g in opt2.param_groups:
                g["lr"] = _lr(step, cfg.qa_steps, cfg.warmup, cfg.qa_lr)
            grow = min(1.0, step / max(1, cfg.curriculum * cfg.qa_steps))
            max_objects = 2 + round(grow * (SPLITS["train"].num_objects[1] - 2))
            base = 10**7 + step * cfg.qa_batch  # stage-2 scenes never repeat stage-1 ones
            scenes = [_train_scene(base + i, max_objects) for i in range(cfg.qa_batch)]
            questions = [ask_all(s, cfg.draws) for s in scenes]
            loss, klasses, correct = qa_loss(model, packer, scenes, questions, cfg.align_weight)
            opt2.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(qa_params, 1.0)
            opt2.step()
            for k, c in zip(klasses, correct, strict=True):
                window.setdefault(k, []).append(float(c))
        window.setdefault("loss", []).append(float(loss.detach()))
        state["step"] += 1
        if state["step"] % cfg.log_every == 0:
            point = {"stage": stage, "step": state["step"], "seconds": round(elapsed(), 1),
                     **{k: round(float(np.mean(v)), 4) for k, v in window.items()}}
            if stage == 2:
                point["max_objects"] = max_objects
            state["curve"].append(point)
            log(json.dumps(point))
            window = {}
        if state["step"] % cfg.checkpoint_every == 0:
            state["seconds"] = elapsed()
            checkpoint()
            if max_minutes is not None and (time.perf_counter() - t_start) / 60 >= max_minutes:
                log(f"stopping after {max_minutes} min; run again to resume")
                stopped = True
    state["seconds"] = elapsed()
    checkpoint()
    record = {"config": dataclasses.asdict(cfg), "arch": arch, "stage": state["stage"], "step": state["step"],
              "seconds": round(state["seconds"], 1), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "finished": not stopped, "curve": state["curve"]}
    if not stopped:
        model.eval()
        save(model, tok, out, record)
        record["check"] = _check(out, cfg.check_scenes)
        (out / "training.json").write_text(json.dumps(record, indent=2))
    return record


def _check(out: Path, scenes: int) -> dict:
    """Unpruned accuracy of the saved weights on the first ``scenes`` val scenes, with every
    prediction: the shipped model's test re-computes it, so weights that load or score
    differently on another machine fail."""
    from .evaluate import evaluate
    from .model import load

    model, processor = load(out)
    report = evaluate(model, processor, [], [], "val", scenes=scenes)
    return {"split": "val", "scenes": scenes, "accuracy": report["unpruned"]["accuracy"]["overall"],
            "per_class": report["unpruned"]["accuracy"], "predictions": report["unpruned"]["predictions"]}
