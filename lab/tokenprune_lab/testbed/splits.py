"""The testbed's data splits: each is a seed (no two share scenes) and a scene recipe.

=============  =====  =============================================================
split          seed   what it is for
=============  =====  =============================================================
train          1000   training (scenes drawn on the fly, one index per example)
val            5000   the training curve (never used for calibration or results)
calibration    2000   ``tokenprune calibrate`` (fitting CLASP's class table)
test           3000   ``tokenprune eval`` / ``ablate``: the reported figures
hard           4000   test-like, but every object is one cell and every digit one cell
=============  =====  =============================================================

The test split asks two questions per class per scene (``draws``) about 300 scenes: about 600
questions per class, so that the paired standard error of a difference between two methods is
about 0.012 at 8 % discordant answers and a 3-point difference per class is detectable.
"""

from __future__ import annotations

import dataclasses

from .questions import Question, ask_all
from .scenes import Scene, make_scene

__all__ = ["SPLITS", "Split", "Example", "examples", "scene"]


@dataclasses.dataclass(frozen=True)
class Split:
    seed: int
    size: int                  # scenes in the split (train: unbounded, this is only a default)
    num_objects: tuple[int, int] = (3, 7)
    small: float = 0.5
    small_text: float = 0.5
    draws: int = 1             # questions per class per scene in examples()


SPLITS: dict[str, Split] = {
    "train": Split(1000, 10**9),
    "val": Split(5000, 70),
    "calibration": Split(2000, 200, draws=2),
    "test": Split(3000, 300, draws=2),
    "hard": Split(4000, 150, small=1.0, small_text=1.0),
}


@dataclasses.dataclass(frozen=True)
class Example:
    """One question about one scene of a split."""

    split: str
    index: int        # scene index in the split
    question: Question

    @property
    def klass(self) -> str:
        return self.question.klass


def split_of(name: str) -> Split:
    if name not in SPLITS:
        raise ValueError(f"unknown split '{name}'; choose one of {sorted(SPLITS)}")
    return SPLITS[name]


def scene(split: str, index: int) -> Scene:
    s = split_of(split)
    return make_scene(s.seed, index, num_objects=s.num_objects, small=s.small, small_text=s.small_text)


def examples(split: str, scenes: int | None = None) -> list[Example]:
    """Up to ``draws`` distinct questions per class (the split's) for each of the first ``scenes``
    scenes of ``split``. A class a scene cannot support is skipped, and a later draw that repeats
    an earlier question of the same scene is dropped (a repeat would count one answer twice and
    narrow every interval), so counts per class can differ."""
    s = split_of(split)
    n = s.size if scenes is None else scenes
    return [Example(split, i, q) for i in range(n) for q in _distinct(ask_all(scene(split, i), s.draws))]


def _distinct(questions: list[Question]) -> list[Question]:
    seen: set[tuple[str, str]] = set()
    return [q for q in questions if (q.klass, q.text) not in seen and not seen.add((q.klass, q.text))]
