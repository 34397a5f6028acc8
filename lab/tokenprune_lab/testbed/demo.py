"""``tokenprune demo``: the shipped testbed model answers questions about a few test scenes, unpruned
and pruned, and draws what was kept.

For every question it prints the routed class, the tokens kept (pivots + completion), the answers
unpruned and pruned, and both prefill times (medians of 5 forwards after a warm-up); for every
image it writes a PNG titled with the scene, spec and budget, with a legend and one panel per
question: the scene with the kept patches outlined, pivots in red and completion tokens in blue.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import tokenprune as tp
from tokenprune.contract import Provenance
from tokenprune.outputs import announce_replacing

from .model import check_budgets_fit, load, prompt, tokens_per_image
from .questions import ask
from .scenes import CELL, GRID, SIZE
from .splits import scene

__all__ = ["run_demo"]

SCENES = (0, 1, 2)
#: The classes asked about each demo scene (several per scene, all seven over the demo).
ASKED = (("ocr", "counting", "attribute"), ("spatial", "existence", "reasoning"), ("scene", "counting", "ocr"))
PIVOT, COMPLETION = (230, 30, 30), (30, 90, 240)


REPEATS = 5


def _timed(forward):
    """``(result, median seconds)`` of ``REPEATS`` calls of ``forward``."""
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        result = forward()
        times.append(time.perf_counter() - t0)
    return result, sorted(times)[REPEATS // 2]


def _panel(img: Image.Image, indices: list[int], provenance: list[int], caption: list[str]) -> Image.Image:
    shade = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    kept = set(indices)
    for i in range(GRID * GRID):  # dim what was dropped
        if i not in kept:
            r, c = divmod(i, GRID)
            draw.rectangle([c * CELL, r * CELL, c * CELL + CELL - 1, r * CELL + CELL - 1], fill=(0, 0, 0, 110))
    for i, p in zip(indices, provenance, strict=True):
        r, c = divmod(i, GRID)
        colour = PIVOT if p == Provenance.PIVOT else COMPLETION
        draw.rectangle([c * CELL, r * CELL, c * CELL + CELL - 1, r * CELL + CELL - 1], outline=colour + (255,), width=2)
    out = Image.alpha_composite(img.convert("RGBA"), shade).convert("RGB")
    font = ImageFont.load_default(size=12)
    lines = [w for line in caption for w in _wrap(line, font, SIZE - 8)]
    canvas = Image.new("RGB", (SIZE, SIZE + 16 * len(lines) + 6), "white")
    canvas.paste(out, (0, 0))
    d = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        d.text((4, SIZE + 3 + 16 * k), line, fill="black", font=font)
    return canvas


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (never mid-word)."""
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def _sheet(panels: list[Image.Image], title: str) -> Image.Image:
    """The panels side by side under a title line and a legend of the outline colours."""
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    head = 44
    width = sum(p.width for p in panels) + 8 * (len(panels) - 1)
    sheet = Image.new("RGB", (width, head + max(p.height for p in panels)), "white")
    d = ImageDraw.Draw(sheet)
    d.text((4, 4), title, fill="black", font=font)
    x = 4
    for colour, label in ((PIVOT, "pivot (attention-salient)"), (COMPLETION, "completion (coverage)"),
                          ((60, 60, 60), "dropped (dimmed)")):
        d.rectangle([x, 26, x + 12, 38], outline=colour, width=2, fill=(120, 120, 120) if colour[0] == 60 else None)
        d.text((x + 18, 25), label, fill="black", font=small)
        x += 28 + int(small.getlength(label))
    x = 0
    for p in panels:
        sheet.paste(p, (x, head))
        x += p.width + 8
    return sheet


def routing_note(pipe: tp.Pipeline, budget: int) -> str:
    """What routing can change at ``budget`` tokens: nothing when the spec reads no class (no
    class-adaptive fusion, no class-table policy), or when the class table gives every class the
    same cell there; else empty."""
    spec = pipe.spec
    if spec.stage_name("fusion") != "class-adaptive" and spec.stage_name("budget_policy") != "class-table":
        return "this spec reads no class, so routing changes nothing here"
    classes = tuple(pipe.table.classes)
    cells = {json.dumps(c.as_cell().model_dump(), sort_keys=True)
             for c in pipe.table.cells(classes, torch.full((len(classes),), budget))}
    if len(cells) == 1:
        return f"the class table gives every class the same cell at {budget} tokens, so routing changes nothing here"
    return ""


def run_demo(spec_path: str | Path, budget: int | float = 64, out: str | Path = "out/demo", model_dir: str | None = None) -> int:
    pipe = tp.Pipeline.from_file(spec_path)  # a bad spec fails before the model loads
    model, processor = load(model_dir)
    check_budgets_fit([budget], model, "--budget")
    tok = processor.tokenizer
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"testbed model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, 576 visual tokens "
          f"per image); spec {pipe.spec.name} ({spec_path}), budget {budget}; CPU, {torch.get_num_threads()} threads\n")
    with torch.inference_mode():  # warm-up, so the first timing is not a cold start
        s0 = scene("test", SCENES[0])
        warm = processor(images=[s0.image], text=[prompt("What color is the square?")], return_tensors="pt")
        model(**warm)
    right = {"unpruned": 0, "pruned": 0}
    asked = 0
    for si, classes in zip(SCENES, ASKED, strict=True):
        sc = scene("test", si)
        questions = [q for k in classes if (q := ask(sc, k)) is not None]
        panels = []
        print(f"scene {si} of the test split ({sc.background} background, {len(sc.objects)} objects, number {sc.number})")
        for q in questions:
            inputs = processor(images=[sc.image], text=[prompt(q.text)], return_tensors="pt")
            with torch.inference_mode():
                full, t_full = _timed(lambda: model(**inputs).logits[0, -1].argmax())
                with tp.apply(model, pipe, budget=budget, tokenizer=tok) as handle:
                    pruned, t_pruned = _timed(lambda: model(**inputs).logits[0, -1].argmax())
            rec = handle.last
            sel = rec.selection
            n = int(sel.counts[0])
            idx, prov = sel.row(0).tolist(), sel.provenance[0, :n].tolist()
            pivots = sum(p == Provenance.PIVOT for p in prov)
            a_full, a_pruned = tok.decode([int(full)]), tok.decode([int(pruned)])
            right["unpruned"] += a_full == q.answer
            right["pruned"] += a_pruned == q.answer
            asked += 1
            mark = lambda a: "right" if a == q.answer else "wrong"  # noqa: E731
            print(f"  Q [{q.klass}] {q.text}")
            note = routing_note(pipe, n)  # the row's budget: what it kept
            print(f"    routed to '{rec.classes[0]}'; kept {n}/{int(rec.total[0])} tokens = {pivots} pivots + "
                  f"{n - pivots} completion" + (f" ({note})" if note else ""))
            print(f"    answer: unpruned '{a_full}' ({mark(a_full)}, prefill {1e3 * t_full:.0f} ms), "
                  f"pruned '{a_pruned}' ({mark(a_pruned)}, prefill {1e3 * t_pruned:.0f} ms); truth '{q.answer}'")
            panels.append(_panel(sc.image, idx, prov, [
                f"[{rec.classes[0]}] {q.text}",
                f"kept {n}: {pivots} pivots (red), {n - pivots} completion (blue)",
                f"pruned: {a_pruned} | unpruned: {a_full} | truth: {q.answer}",
            ]))
        title = f"test scene {si} - spec {pipe.spec.name}, budget {budget} of {tokens_per_image(model)} tokens"
        path = out / f"scene{si}.png"
        announce_replacing(path)
        _sheet(panels, title).save(path)
        print(f"  -> {path}\n")
    print(f"{asked} questions: unpruned {right['unpruned']}/{asked} right, pruned to {budget} tokens "
          f"{right['pruned']}/{asked} right. Accuracy over the whole test split: tokenprune eval (docs/results.md)")
    print(f"Prefill times are medians of {REPEATS} forwards after a warm-up and include the vision tower, which "
          "pruning does not shorten; on a model this small they show little of what pruning saves. "
          "`tokenprune bench prefill` measures that on a real language model.")
    return 0

