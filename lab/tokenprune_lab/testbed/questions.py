"""Questions about a :class:`~tokenprune_lab.testbed.scenes.Scene`, in CLASP's seven classes.

Every question has a one-word answer. Each class has several phrasings with synonyms, chosen at
random, so that a router is not handed one template per class. Existence negatives are POPE-style
adversarial: when possible, both the colour and the shape occur in the scene, only not together.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .scenes import BACKGROUNDS, COLORS, GRID, SHAPES, Scene, SceneObject, scene_rng

__all__ = ["QA_CLASSES", "AUX_KINDS", "Question", "ask", "ask_all", "ask_aux", "answer_words", "question_words",
           "aux_words"]

QA_CLASSES: tuple[str, ...] = ("ocr", "counting", "spatial", "attribute", "existence", "scene", "reasoning")


@dataclasses.dataclass(frozen=True)
class Question:
    """A question with its one-word answer. ``evidence``: the grid cells (row-major indices into
    the 24 x 24 patches) that hold what the answer depends on, known to the generator; a pruning
    method that drops them has lost the evidence. Empty when the evidence is everywhere (scene) or
    nowhere (counting something absent).

    - ocr, reasoning: the digits' cells;
    - counting: the cells of every object counted;
    - spatial: both objects' cells;
    - attribute: the object's cells;
    - existence: "yes": the object's cells; "no": the cells of every object that has the asked
      colour or the asked shape (the distractors that must be looked at to answer "no").
    """

    klass: str
    text: str
    answer: str
    evidence: tuple[int, ...] = ()


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith("x") else shape + "s"


_OCR = (
    "What number is written in the box?",
    "Read the number in the box.",
    "Which number is printed on the label?",
    "What two-digit number can you see?",
    "Tell me the number shown in the white box.",
    "What does the text in the box say?",
)
_COUNT_SHAPE = (
    "How many {ps} are there?",
    "Count the {ps} in the picture.",
    "How many {ps} can you see?",
    "What is the number of {ps} in the image?",
)
_COUNT_COLOR = (
    "How many {c} objects are there?",
    "Count the {c} shapes.",
    "How many things are {c}?",
    "How many {c} items can you find?",
)
_SPATIAL = (
    "Is the {a} {rel} the {b}?",
    "Is the {a} located {rel} the {b}?",
    "Does the {a} appear {rel} the {b}?",
    "Relative to the {b}, is the {a} {rel} it?",
)
_REL = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_ATTR_COLOR = (
    "What color is the {s}?",
    "Which colour does the {s} have?",
    "What is the color of the {s}?",
    "Tell me the colour of the {s}.",
)
_ATTR_SHAPE = (
    "What shape is the {c} object?",
    "Which shape is drawn in {c}?",
    "What is the {c} thing?",
    "Name the shape of the {c} item.",
)
_EXIST = (
    "Is there a {c} {s}?",
    "Is there a {c} {s} in the image?",
    "Can you see a {c} {s}?",
    "Does the picture contain a {c} {s}?",
    "Do you spot any {c} {s}?",
)
_SCENE = (
    "What kind of background is this?",
    "What pattern does the background have?",
    "Describe the backdrop of this picture.",
    "What does the background look like?",
    "Which pattern fills the background?",
)
_SUM = (
    "What is the sum of the two digits?",
    "Add the two digits in the box together. What do you get?",
    "What do the digits of the number add up to?",
    "If you add both digits, what is the total?",
)
_COMPARE = (
    "Is the number in the box greater than fifty?",
    "Is the written number larger than 50?",
    "Is the number in the box bigger than fifty?",
)


def _cells(*objects: SceneObject) -> tuple[int, ...]:
    """Row-major cell indices covered by ``objects``, sorted."""
    return tuple(sorted({(o.row + dr) * GRID + o.col + dc for o in objects
                         for dr in range(o.span) for dc in range(o.span)}))


def _digit_cells(scene: Scene) -> tuple[int, ...]:
    return tuple(int(i) for i in np.flatnonzero(scene.labels.digit.reshape(-1) > 0))


def _ocr(scene: Scene, rng) -> Question:
    return Question("ocr", _pick(rng, _OCR), str(scene.number), _digit_cells(scene))


def _counting(scene: Scene, rng) -> Question:
    if rng.random() < 0.5:
        s = _pick(rng, SHAPES)
        hits = [o for o in scene.objects if o.shape == s]
        return Question("counting", _pick(rng, _COUNT_SHAPE).format(ps=_plural(s)), str(len(hits)), _cells(*hits))
    c = _pick(rng, list(COLORS))
    hits = [o for o in scene.objects if o.color == c]
    return Question("counting", _pick(rng, _COUNT_COLOR).format(c=c), str(len(hits)), _cells(*hits))


def _spatial(scene: Scene, rng) -> Question | None:
    objs = scene.objects
    for _ in range(20):
        i, j = rng.choice(len(objs), size=2, replace=False) if len(objs) >= 2 else (0, 0)
        if i == j:
            return None
        a, b = objs[int(i)], objs[int(j)]
        (ar, ac), (br, bc) = a.center, b.center
        horizontal = rng.random() < 0.5
        d = (ac - bc) if horizontal else (ar - br)
        if abs(d) < 1.5:  # too close along that axis to be unambiguous
            continue
        rel = ("right" if d > 0 else "left") if horizontal else ("below" if d > 0 else "above")
        truth = True
        if rng.random() < 0.5:  # ask the opposite relation
            rel = {"left": "right", "right": "left", "above": "below", "below": "above"}[rel]
            truth = False
        text = _pick(rng, _SPATIAL).format(a=f"{a.color} {a.shape}", b=f"{b.color} {b.shape}", rel=_REL[rel])
        return Question("spatial", text, "yes" if truth else "no", _cells(a, b))
    return None


def _attribute(scene: Scene, rng) -> Question | None:
    shapes = [o.shape for o in scene.objects]
    colors = [o.color for o in scene.objects]
    by_shape = [o for o in scene.objects if shapes.count(o.shape) == 1]
    by_color = [o for o in scene.objects if colors.count(o.color) == 1]
    if by_shape and (not by_color or rng.random() < 0.5):
        o = by_shape[int(rng.integers(len(by_shape)))]
        return Question("attribute", _pick(rng, _ATTR_COLOR).format(s=o.shape), o.color, _cells(o))
    if by_color:
        o = by_color[int(rng.integers(len(by_color)))]
        return Question("attribute", _pick(rng, _ATTR_SHAPE).format(c=o.color), o.shape, _cells(o))
    return None


def _existence(scene: Scene, rng) -> Question:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5 and scene.objects:
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        c, s, ans = o.color, o.shape, "yes"
    else:
        colors = {o.color for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        adversarial = [(c, s) for c in sorted(colors) for s in sorted(shapes) if (c, s) not in present]
        pool = adversarial or [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        c, s = pool[int(rng.integers(len(pool)))]
        ans = "no"
    text = _pick(rng, _EXIST).format(c=c, s=s).replace(" a orange", " an orange")
    if ans == "yes":
        evidence = _cells(o)
    else:
        evidence = _cells(*(x for x in scene.objects if x.color == c or x.shape == s))
    return Question("existence", text, ans, evidence)


def _scene(scene: Scene, rng) -> Question:
    return Question("scene", _pick(rng, _SCENE), scene.background)


def _reasoning(scene: Scene, rng) -> Question:
    if rng.random() < 0.7:
        return Question("reasoning", _pick(rng, _SUM), str(sum(int(d) for d in str(scene.number))),
                        _digit_cells(scene))
    return Question("reasoning", _pick(rng, _COMPARE), "yes" if scene.number > 50 else "no", _digit_cells(scene))


_ASK = {
    "ocr": _ocr, "counting": _counting, "spatial": _spatial, "attribute": _attribute,
    "existence": _existence, "scene": _scene, "reasoning": _reasoning,
}


def ask(scene: Scene, klass: str, draw: int = 0) -> Question | None:
    """Question ``draw`` of class ``klass`` about ``scene`` (deterministic), or ``None`` if the
    scene cannot support that class (e.g. no object with a unique shape or colour)."""
    rng = scene_rng(scene.seed, scene.index, stream=1 + 7 * draw + QA_CLASSES.index(klass))
    return _ASK[klass](scene, rng)


def ask_all(scene: Scene, draws: int = 1) -> list[Question]:
    """Up to ``draws`` questions per class, classes in :data:`QA_CLASSES` order."""
    out = []
    for d in range(draws):
        for k in QA_CLASSES:
            q = ask(scene, k, d)
            if q is not None:
                out.append(q)
    return out


# -- training-only one-hop questions ---------------------------------------------------------------
# Decomposed steps of the evaluated classes, asked only in training (never evaluated, never
# routed): does a colour / a shape occur, where is an object (row / column), how many objects, what
# is each digit. They teach the decoder to find and read one patch, the step every class needs,
# without any supervision of attention.
AUX_KINDS: tuple[str, ...] = ("has-color", "has-shape", "row", "column", "objects", "digit")
_HAS_COLOR = ("Is there a {c} object?", "Is anything {c}?")
_HAS_SHAPE = ("Is there a {s}?", "Can you see any {s}?")
_ROW = ("Which row is the {o} in?", "In which row is the {o}?")
_COLUMN = ("Which column is the {o} in?", "In which column is the {o}?")
_OBJECTS = ("How many objects are there?", "How many shapes are in the picture?")
_DIGIT = ("What is the {nth} digit in the box?", "Read the {nth} digit of the number.")


def _aux(scene: Scene, kind: str, rng) -> Question | None:
    objs = scene.objects
    if kind == "has-color":
        c = _pick(rng, list(COLORS))
        text = _pick(rng, _HAS_COLOR).format(c=c).replace(" a orange", " an orange")
        return Question("aux:" + kind, text, "yes" if any(o.color == c for o in objs) else "no")
    if kind == "has-shape":
        s = _pick(rng, SHAPES)
        return Question("aux:" + kind, _pick(rng, _HAS_SHAPE).format(s=s), "yes" if any(o.shape == s for o in objs) else "no")
    if kind in ("row", "column"):
        if not objs:
            return None
        o = objs[int(rng.integers(len(objs)))]
        text = _pick(rng, _ROW if kind == "row" else _COLUMN).format(o=f"{o.color} {o.shape}")
        return Question("aux:" + kind, text, str(o.row if kind == "row" else o.col))
    if kind == "objects":
        return Question("aux:" + kind, _pick(rng, _OBJECTS), str(len(objs)))
    if kind == "digit":
        k = int(rng.integers(2))
        return Question("aux:" + kind, _pick(rng, _DIGIT).format(nth=("first", "second")[k]), f"{scene.number:02d}"[k])
    raise KeyError(kind)


def ask_aux(scene: Scene, draws: int = 1, first: int = 0) -> list[Question]:
    """Up to ``draws`` training-only questions of each kind in :data:`AUX_KINDS`, draws
    ``first .. first + draws - 1`` (deterministic; their random streams are disjoint from
    :func:`ask`'s)."""
    out = []
    for d in range(first, first + draws):
        for j, kind in enumerate(AUX_KINDS):
            rng = scene_rng(scene.seed, scene.index, stream=10_000 + len(AUX_KINDS) * d + j)
            q = _aux(scene, kind, rng)
            if q is not None:
                out.append(q)
    return out


def answer_words() -> list[str]:
    """Every possible answer, each a single word (one token)."""
    nums = [str(i) for i in range(100)]
    return ["yes", "no", *COLORS, *SHAPES, *BACKGROUNDS, *nums]


def question_words() -> list[str]:
    """Every word the question templates can produce (before tokenisation)."""
    texts = [*_OCR, *_COUNT_SHAPE, *_COUNT_COLOR, *_SPATIAL, *_ATTR_COLOR, *_ATTR_SHAPE, *_EXIST,
             *_SCENE, *_SUM, *_COMPARE, *_REL.values()]
    fills = ["an", *COLORS, *SHAPES, *(_plural(s) for s in SHAPES)]
    return texts + fills


def aux_words() -> list[str]:
    """Every word the training-only questions add (the tokenizer appends them last, so the
    words of the evaluated questions keep their ids)."""
    return [*_HAS_COLOR, *_HAS_SHAPE, *_ROW, *_COLUMN, *_OBJECTS, *_DIGIT, "first", "second"]
