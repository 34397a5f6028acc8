"""The lmms-eval model ``tokenprune``: a Hugging Face checkpoint with ``tokenprune.apply(spec, budget)``.

::

    lmms-eval --model tokenprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,spec=clasp,budget=64 \\
        --tasks mme --batch_size 8 --log_samples --output_path out/

``model_args``:

- ``pretrained``: a Hugging Face folder or hub id (LLaVA-1.5/NeXT, Qwen2/2.5/3-VL), or ``testbed``
  (``testbed-v1``, ``testbed-v2``, a testbed folder) for the shipped testbed model.
- ``spec``: a preset name (``clasp``, ``visionzip``, ``divprune``, ``dart-llm``... :func:`tokenprune.spec.presets`),
  a spec file, or ``none`` for the unpruned model (the baseline row of every table).
- ``budget``: visual tokens kept per image (``64``) or a ratio of them (``0.25``); omitted, the
  spec's own budget.
- ``dtype`` (``auto``: bfloat16 on CUDA, float32 on the CPU), ``attn_implementation`` (``sdpa``),
  ``device`` (default: this process's GPU under data parallelism, else ``cuda`` when present, else the CPU),
  ``max_new_tokens`` (default 128; a task's ``generation_kwargs`` take precedence).

``--batch_size N`` batches N requests per ``generate`` (requests with equal generation arguments;
left padding). Data parallel: ``accelerate launch --num_processes K -m lmms_eval ...`` (or
``torchrun``); each process loads the model on its own device and answers its share of the
documents, and lmms-eval gathers the results, which equal a single process's.

Each logged sample's ``token_counts`` says what the LLM saw: ``input_tokens`` (prompt positions at
prefill, after pruning), ``output_tokens``, and for a pruned run ``visual_tokens`` and
``visual_tokens_kept`` (per image, before and after pruning; after the in-LLM stage's last layer
when the spec has one), ``routed_class`` and ``spec``. Each process also logs a per-task summary.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger

from tokenprune.adapters.base import UnsupportedInput
from tokenprune.apply import PruningHandle, apply
from tokenprune.spec import load_spec

from .loading import load_model, torch_dtype

__all__ = ["TokenPrune", "PrunedTokenCounts", "UNPRUNED_SPECS"]

#: ``spec=`` values that mean "do not prune" (the unpruned baseline)
UNPRUNED_SPECS = ("none", "unpruned")

MODEL_ARGS = ("pretrained", "spec", "budget", "batch_size", "device", "dtype", "attn_implementation",
              "max_new_tokens")


@dataclasses.dataclass
class PrunedTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts, with what pruning did to the sample's images."""

    visual_tokens: list[int] | None = None       # per image, before pruning
    visual_tokens_kept: list[int] | None = None  # per image, reaching the LLM (its last in-LLM layer)
    routed_class: str | None = None
    spec: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = super().to_dict()
        for key in ("visual_tokens", "visual_tokens_kept", "routed_class", "spec"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class TokenPrune(lmms):
    """tokenprune's lmms-eval model (see the module docstring for ``model_args``)."""

    is_simple = True

    def __init__(self, pretrained: str = "testbed", spec: str = "clasp", budget: int | float | None = None,
                 batch_size: int | str = 1, device: str | None = None, dtype: str = "auto",
                 attn_implementation: str = "sdpa", max_new_tokens: int = 128, max_batch_size: int | None = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"the tokenprune lmms-eval model does not take {', '.join(sorted(unknown))}; "
                            f"its model_args are {', '.join(MODEL_ARGS)}")
        if str(batch_size).startswith("auto") or max_batch_size is not None:
            raise ValueError("the tokenprune lmms-eval model needs a fixed --batch_size N (no auto batch size)")
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self._device = self._pick_device(device)
        self._model, self.processor = load_model(str(pretrained), self._device,
                                                 torch_dtype(dtype, self._device), attn_implementation)
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self.spec_name = str(spec)
        self.handle: PruningHandle | None = None
        if self.spec_name.lower() not in UNPRUNED_SPECS:
            budget = None if budget in (None, "", "none") else budget
            self.handle = apply(self._model, load_spec(self.spec_name), budget=budget,
                                tokenizer=self.processor.tokenizer)
        self._summary: dict[str, dict[str, Any]] = defaultdict(lambda: {"images": 0, "tokens": 0, "kept": 0,
                                                                         "classes": Counter()})

    # -- what lmms-eval reads --------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _pick_device(self, device: str | None) -> torch.device:
        """This process's device: under data parallelism, its own GPU (or the CPU without one)."""
        if self._world_size > 1:
            return self.accelerator.device
        if device in (None, ""):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(device)

    # -- requests --------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        out: list[GenerationResult | None] = [None] * len(requests)
        for batch in self._batches(requests):
            gen_kwargs = dict(requests[batch[0]].args[1])
            answers = self._generate([requests[i] for i in batch], gen_kwargs)
            for i, answer in zip(batch, answers, strict=True):
                out[i] = answer
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), answer.text)
        self._log_summary()
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            out += self._loglikelihood(requests[start:start + self.batch_size_per_gpu])
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the tokenprune lmms-eval model answers single-round tasks "
                                  "(generate_until, loglikelihood); this task is multi-round")

    def _batches(self, requests: list[Instance]) -> list[list[int]]:
        """Request indices in batches of ``batch_size``, each with one set of generation arguments."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        size = self.batch_size_per_gpu
        return [idx[s:s + size] for idx in groups.values() for s in range(0, len(idx), size)]

    # -- one batch -------------------------------------------------------------------------------------
    def _doc(self, req: Instance) -> dict:
        _, _, _, doc_id, task, split = req.args[:6]
        return self.task_dict[task][split][doc_id]

    def _images(self, req: Instance) -> list:
        """The request's images as RGB PIL images; any other visual input is refused, by name."""
        from PIL import Image

        doc_to_visual, doc_id, task = req.args[2], req.args[3], req.args[4]
        visuals = doc_to_visual(self._doc(req)) if doc_to_visual is not None else []
        images = []
        for v in visuals or []:
            if not isinstance(v, Image.Image):
                raise UnsupportedInput(
                    f"task '{task}', doc {doc_id}: a visual input of type {type(v).__name__} (a video path or "
                    f"audio?); the tokenprune lmms-eval model takes images only")
            images.append(v.convert("RGB"))
        return images

    def _prompt(self, context: str, images: int, req: Instance, answer: str | None = None) -> str:
        """The model's chat-template prompt: the images first, then the task's text (as lmms-eval's
        Hugging Face models do), unless the text already places the images itself."""
        if self.processor.chat_template is None:
            raise ValueError(f"{type(self.processor).__name__} has no chat template; the tokenprune lmms-eval model "
                             f"builds prompts with processor.apply_chat_template")
        token = getattr(self.processor, "image_token", None)
        placed = context.count(token) if token else 0
        if placed and placed != images:
            raise UnsupportedInput(f"task '{req.args[4]}', doc {req.args[3]}: the text places {placed} images "
                                   f"({token}) but the document has {images}")
        content: Any = context if placed else [{"type": "image"}] * images + [{"type": "text", "text": context}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
        return text if answer is None else text + answer

    def _inputs(self, texts: list[str], images: list) -> dict[str, torch.Tensor]:
        inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        dtype = self._model.dtype
        return {k: v.to(self._device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}

    def _pruned(self, reqs: list[Instance], images: list, before) -> Any:
        """The call's prune record, or ``None`` unpruned; a pruned model never passes images silently."""
        if self.handle is None:
            return None
        record = self.handle.last
        if images and record is before:
            raise RuntimeError(f"tokenprune did not prune a batch with {len(images)} images "
                               f"(task '{reqs[0].args[4]}', docs {[r.args[3] for r in reqs]})")
        return record if images else None

    def _generate(self, reqs: list[Instance], gen_kwargs: dict) -> list[GenerationResult]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        images = [self._images(r) for r in reqs]
        texts = [self._prompt(r.args[0], len(im), r) for r, im in zip(reqs, images, strict=True)]
        flat = [im for row in images for im in row]
        inputs = self._inputs(texts, flat)
        before = self.handle.last if self.handle is not None else None
        with torch.inference_mode():
            out = self._model.generate(**inputs, **self._generation(gen_kwargs))
        record = self._pruned(reqs, flat, before)
        new = out[:, inputs["input_ids"].shape[1]:]  # (B, T)
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        counts = self._counts(inputs, new, record, [r.args[4] for r in reqs])
        return [GenerationResult(text=_cut(text, until), token_counts=c) for text, c in zip(decoded, counts, strict=True)]

    def _generation(self, gen_kwargs: dict) -> dict[str, Any]:
        """``model.generate`` arguments from a task's ``generation_kwargs`` (greedy unless temperature > 0)."""
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        args: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                                "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
                                "do_sample": temperature > 0,
                                "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            args["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                args["top_p"] = float(gen_kwargs["top_p"])
        return args

    def _loglikelihood(self, reqs: list[Instance]) -> list[tuple[float, bool]]:
        """log p(continuation | context) per request, and whether greedy decoding gives it."""
        images = [self._images(r) for r in reqs]
        flat = [im for row in images for im in row]
        continuations = [r.args[1] if isinstance(r.args[1], str) else r.args[1](self._doc(r)) for r in reqs]
        contexts = [self._prompt(r.args[0], len(im), r) for r, im in zip(reqs, images, strict=True)]
        fulls = [c + a for c, a in zip(contexts, continuations, strict=True)]
        inputs = self._inputs(fulls, flat)
        # (B,) continuation tokens: the image placeholders count alike on both sides, so the text alone tells
        n = torch.tensor([len(f) - len(c) for f, c in zip(self.tokenizer(fulls).input_ids,
                                                           self.tokenizer(contexts).input_ids, strict=True)], device=self._device)
        if bool((n < 1).any()):
            raise ValueError(f"task '{reqs[0].args[4]}': an empty continuation tokenises to no tokens")
        before = self.handle.last if self.handle is not None else None
        with torch.inference_mode():
            logits = self._model(**inputs).logits  # (B, S', V): text is never dropped, the ends align
        self._pruned(reqs, flat, before)
        width = int(n.max())
        targets = inputs["input_ids"][:, -width:]  # (B, W)
        logp = torch.log_softmax(logits[:, -width - 1:-1].float(), -1)  # (B, W, V)
        mine = torch.arange(width, device=n.device) >= (width - n)[:, None]  # (B, W)
        total = (logp.gather(2, targets[..., None])[..., 0] * mine).sum(1)
        greedy = ((logp.argmax(-1) == targets) | ~mine).all(1)
        return [(float(t), bool(g)) for t, g in zip(total.tolist(), greedy.tolist(), strict=True)]

    # -- records ---------------------------------------------------------------------------------------
    def _counts(self, inputs: dict, new: torch.Tensor, record, tasks: list[str]) -> list[TokenCounts]:
        """Per sample: prompt positions the LLM saw, tokens generated, and the pruning record."""
        ended = (new == self.tokenizer.eos_token_id) | (new == self.tokenizer.pad_token_id)  # (B, T)
        generated = ((ended.cumsum(1) == 0).sum(1) + ended.any(1)).tolist()
        seen = (record.keep_mask if record is not None else inputs["attention_mask"].bool()).sum(1).tolist()
        if record is None:
            return [TokenCounts(input_tokens=s, output_tokens=g) for s, g in zip(seen, generated, strict=True)]
        final = record.llm_kept[-1] if record.llm_kept else record.kept  # (N,)
        rows, total, kept = record.image_sample.tolist(), record.total.tolist(), final.tolist()
        out = []
        for r, (s, g) in enumerate(zip(seen, generated, strict=True)):
            mine = [i for i, row in enumerate(rows) if row == r]
            counts = PrunedTokenCounts(input_tokens=s, output_tokens=g, visual_tokens=[total[i] for i in mine],
                                       visual_tokens_kept=[kept[i] for i in mine],
                                       routed_class=record.classes[r], spec=self.handle.pipeline.spec.name)
            self._tally(tasks[r], counts)
            out.append(counts)
        return out

    def _tally(self, task: str, counts: PrunedTokenCounts) -> None:
        s = self._summary[task]
        s["images"] += len(counts.visual_tokens or [])
        s["tokens"] += sum(counts.visual_tokens or [])
        s["kept"] += sum(counts.visual_tokens_kept or [])
        s["classes"][counts.routed_class] += 1

    def _log_summary(self) -> None:
        for task, s in self._summary.items():
            if s["images"]:
                logger.info(f"tokenprune rank {self._rank}: task {task}: {s['images']} images, "
                            f"{s['kept'] / s['images']:.1f} of {s['tokens'] / s['images']:.1f} visual tokens kept "
                            f"per image; routed classes {dict(s['classes'])}")
        self._summary.clear()


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first stop sequence of ``until``."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
