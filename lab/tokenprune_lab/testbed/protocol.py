"""The lab's evaluation protocol, in one place: the default budgets and what counts as decisive.

Every testbed command (``eval``, ``ablate``, ``calibrate``, ``results``) reads its defaults here,
so that a change of protocol is one edit. Light on purpose: the CLI imports it to build its help.
"""

from __future__ import annotations

__all__ = ["BUDGETS", "CALIBRATION_BUDGETS", "CALIBRATION_RATIOS", "OBJECTIVES", "DECISIVE_MARGIN"]

#: Default budgets, visual tokens per image of 576. At 64 and above every good method keeps every
#: evidence cell and they are level; 8-32 is where methods differ.
BUDGETS: tuple[int, ...] = (8, 16, 32, 64, 128, 192)
#: Budgets a calibration cell is scored at: the tight ones, where the cells differ, and one wide.
CALIBRATION_BUDGETS: tuple[int, ...] = (8, 16, 32, 64)
#: Pivot ratios a calibration tries: 0 to 1 in steps of 0.125.
CALIBRATION_RATIOS: tuple[float, ...] = tuple(i / 8 for i in range(9))
#: What a calibration cell is scored by; the first is the default (docs: calibrate.py).
OBJECTIVES: tuple[str, ...] = ("agreement", "accuracy", "kl")
#: A question is *decisive* when the unpruned answer's probability leads the runner-up's by at
#: least this much; agreement on the others counts near-tie flips of a model at chance.
DECISIVE_MARGIN = 0.1
