"""Deterministic 336 x 336 scenes for the testbed, drawn with PIL.

A scene lives on the encoder's 24 x 24 grid of 14-px cells, so that one object covers one cell
(small) or a 2 x 2 block (large) and the pruning question stays real: *which* patches carry the
evidence. A scene holds

- a background: one of :data:`BACKGROUNDS` (plain, striped, dotted, checkered) in a light tint
  that varies per scene;
- a few objects, each a unique (colour, shape) pair from :data:`COLORS` x :data:`SHAPES`;
- a white box with a black frame holding a two-digit number; each digit fills one cell (small
  text) or a 2 x 2 block (large text).

Everything is a function of ``(seed, index)``: :func:`make_scene` draws the same scene on every
machine. The generator also returns the per-cell ground truth (:class:`CellLabels`) that the
tower's dense pre-training uses; question answering never sees it.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "BACKGROUNDS", "COLORS", "SHAPES", "GRID", "CELL", "SIZE", "Scene", "SceneObject",
    "CellLabels", "make_scene", "scene_rng",
]

SIZE = 336
CELL = 14
GRID = SIZE // CELL  # 24

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (34, 160, 60),
    "blue": (31, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (148, 60, 190),
    "orange": (250, 125, 14),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    row: int   # top-left cell
    col: int
    span: int  # 1 (one cell) or 2 (a 2 x 2 block)

    @property
    def center(self) -> tuple[float, float]:
        """(row, col) of the centre, in cells."""
        return self.row + self.span / 2, self.col + self.span / 2


@dataclasses.dataclass(frozen=True)
class CellLabels:
    """Per-cell ground truth, each ``(GRID, GRID)`` int64; 0 means "none"."""

    color: np.ndarray   # 1 + index into COLORS
    shape: np.ndarray   # 1 + index into SHAPES
    digit: np.ndarray   # 1 + digit for the number's first digit, 11 + digit for the second
    anchor: np.ndarray  # 1 on an object's top-left cell
    background: int     # index into BACKGROUNDS


@dataclasses.dataclass(frozen=True)
class Scene:
    image: Image.Image
    background: str
    objects: tuple[SceneObject, ...]
    number: int            # 10..99, written in the box
    text_span: int         # 1 (small text) or 2
    labels: CellLabels
    seed: int
    index: int


def scene_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for scene ``index`` of split ``seed`` (``stream`` separates uses)."""
    return np.random.default_rng([seed, index, stream])


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _tint(rng: np.random.Generator) -> tuple[int, int, int]:
    base = rng.integers(205, 246)
    return tuple(int(np.clip(base + rng.integers(-12, 13), 190, 250)) for _ in range(3))


def _darker(c: tuple[int, int, int], by: int) -> tuple[int, int, int]:
    return tuple(max(0, v - by) for v in c)


def _draw_background(draw: ImageDraw.ImageDraw, kind: str, rng: np.random.Generator) -> None:
    tint = _tint(rng)
    draw.rectangle([0, 0, SIZE, SIZE], fill=tint)
    ink = _darker(tint, int(rng.integers(35, 60)))
    if kind == "striped":
        width = int(rng.integers(2, 5))
        vertical = bool(rng.integers(2))
        for p in range(0, SIZE, 7):
            box = [p, 0, p + width - 1, SIZE] if vertical else [0, p, SIZE, p + width - 1]
            draw.rectangle(box, fill=ink)
    elif kind == "dotted":
        r = int(rng.integers(1, 3))
        for y in range(3, SIZE, 7):
            for x in range(3, SIZE, 7):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=ink)
    elif kind == "checkered":
        for i in range(GRID):
            for j in range(i % 2, GRID, 2):
                draw.rectangle([j * CELL, i * CELL, j * CELL + CELL - 1, i * CELL + CELL - 1], fill=ink)


def _polygon(kind: str, x0: float, y0: float, s: float) -> list[tuple[float, float]]:
    cx, cy, r = x0 + s / 2, y0 + s / 2, s / 2
    if kind == "triangle":
        return [(cx, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if kind == "hexagon":
        a = np.arange(6) * np.pi / 3
        return list(zip(cx + r * np.cos(a), cy + r * np.sin(a), strict=True))
    if kind == "star":
        a = np.arange(10) * np.pi / 5 - np.pi / 2
        rr = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
        return list(zip(cx + rr * np.cos(a), cy + rr * np.sin(a), strict=True))
    raise KeyError(kind)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    m = 1 if obj.span == 1 else 2
    x0, y0 = obj.col * CELL + m, obj.row * CELL + m
    s = obj.span * CELL - 2 * m - 1
    fill = COLORS[obj.color]
    edge = _darker(fill, 60)
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x0 + s, y0 + s], fill=fill, outline=edge)
    elif obj.shape == "square":
        draw.rectangle([x0 + 1, y0 + 1, x0 + s - 1, y0 + s - 1], fill=fill, outline=edge)
    else:
        draw.polygon(_polygon(obj.shape, x0, y0, s), fill=fill, outline=edge)


def _free(occupied: np.ndarray, r: int, c: int, span: int, margin: int = 1) -> bool:
    r0, c0 = max(0, r - margin), max(0, c - margin)
    return not occupied[r0:r + span + margin, c0:c + span + margin].any()


def make_scene(
    seed: int,
    index: int,
    *,
    num_objects: tuple[int, int] = (3, 7),
    small: float = 0.5,
    small_text: float = 0.5,
) -> Scene:
    """Draw scene ``index`` of the split with seed ``seed``.

    Args:
        num_objects: inclusive range of the object count.
        small: probability that an object is one cell (else a 2 x 2 block).
        small_text: probability that the number is written one cell per digit (else 2 x 2).
    """
    rng = scene_rng(seed, index)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    img = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(img)
    _draw_background(draw, background, rng)

    occupied = np.zeros((GRID, GRID), dtype=bool)
    color = np.zeros((GRID, GRID), dtype=np.int64)
    shape = np.zeros((GRID, GRID), dtype=np.int64)
    digit = np.zeros((GRID, GRID), dtype=np.int64)
    anchor = np.zeros((GRID, GRID), dtype=np.int64)

    # the number box: 2 digits of t x t cells, plus nothing else in a one-cell margin
    number = int(rng.integers(10, 100))
    t = 1 if rng.random() < small_text else 2
    br, bc = int(rng.integers(0, GRID - t + 1)), int(rng.integers(0, GRID - 2 * t + 1))
    occupied[br:br + t, bc:bc + 2 * t] = True
    x0, y0 = bc * CELL, br * CELL
    draw.rectangle([x0, y0, x0 + 2 * t * CELL - 1, y0 + t * CELL - 1], fill=(255, 255, 255), outline=(0, 0, 0))
    font = _font(13 if t == 1 else 27)
    for k, ch in enumerate(f"{number:02d}"):
        cx = x0 + k * t * CELL + t * CELL / 2
        cy = y0 + t * CELL / 2
        draw.text((cx, cy + (0.5 if t == 1 else 1)), ch, fill=(0, 0, 0), font=font, anchor="mm")
        digit[br:br + t, bc + k * t:bc + (k + 1) * t] = 1 + int(ch) + 10 * k

    lo, hi = num_objects
    n = int(rng.integers(lo, hi + 1))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    order = rng.permutation(len(pairs))
    objects: list[SceneObject] = []
    for p in order:
        if len(objects) == n:
            break
        span = 1 if rng.random() < small else 2
        for _ in range(50):
            r, c = int(rng.integers(0, GRID - span + 1)), int(rng.integers(0, GRID - span + 1))
            if _free(occupied, r, c, span):
                break
        else:
            continue
        obj = SceneObject(pairs[p][0], pairs[p][1], r, c, span)
        occupied[r:r + span, c:c + span] = True
        color[r:r + span, c:c + span] = 1 + list(COLORS).index(obj.color)
        shape[r:r + span, c:c + span] = 1 + SHAPES.index(obj.shape)
        anchor[r, c] = 1
        _draw_object(draw, obj)
        objects.append(obj)

    labels = CellLabels(color, shape, digit, anchor, BACKGROUNDS.index(background))
    return Scene(img, background, tuple(objects), number, t, labels, seed, index)
