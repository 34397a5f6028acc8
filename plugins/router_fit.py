"""Fitting the ``classifier`` router's head on the development set, and judging any router on it.

- the development set itself (:func:`load_dev_set`, :func:`is_held_out`) is read by
  :mod:`tokenprune_plugins.router_dev`, which the router reads too (for ``--explain``); both names
  are re-exported here;
- :func:`fit_head`: the weight decay chosen by 5-fold cross-validation on the fitting part, the
  temperature by the negative log-likelihood of the out-of-fold predictions, then one fit on the
  whole fitting part; the held-out part is never read;
- :func:`judge`: a router's accuracy on the held-out part, per class with Wilson intervals, per
  style, and the confusion matrix.

``tokenprune router fit`` and ``tokenprune router eval`` are the commands (docs/routing.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .router_classifier import CUES, LinearHead, question_features
from .router_dev import DevQuestion, is_held_out, load_dev_set
from .routers import ROUTED

__all__ = ["DevQuestion", "load_dev_set", "is_held_out", "fit_head", "judge", "Judgement", "WEIGHT_DECAYS"]

#: Weight decays tried by the cross-validation (an L2 penalty on the weight, summed).
WEIGHT_DECAYS: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)


def _fold(text: str, folds: int) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % folds


def _fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS (deterministic): ``(F, C)``, ``(C,)``."""
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach()


def _out_of_fold_logits(x, y, fold, folds: int, weight_decay: float) -> torch.Tensor:
    logits = torch.empty(len(y), len(ROUTED))
    for k in range(folds):
        test = fold == k
        w, b = _fit_linear(x[~test], y[~test], len(ROUTED), weight_decay)
        logits[test] = x[test] @ w + b
    return logits


def _temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The temperature minimising the negative log-likelihood of ``softmax(logits / T)``."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss
    opt.step(closure)
    return float(log_t.detach().exp())


def fit_head(rows: Sequence[DevQuestion], model_path: str, *, folds: int = 5,
             weight_decays: Sequence[float] = WEIGHT_DECAYS) -> tuple[LinearHead, dict]:
    """Fit the classifier router's head on the rows that are *not* held out; returns the head
    and a report (cross-validated accuracy per weight decay, the chosen one, the temperature)."""
    fit = [r for r in rows if not r.held_out]
    missing = sorted(set(ROUTED) - {r.klass for r in fit})
    if missing:
        raise ValueError(f"the development set's fitting part has no question of classes {missing}")
    x = question_features([r.question for r in fit], model_path)  # (N, F)
    y = torch.tensor([ROUTED.index(r.klass) for r in fit])
    fold = torch.tensor([_fold(r.text, folds) for r in fit])
    cv = {}
    for wd in weight_decays:
        cv[wd] = float((_out_of_fold_logits(x, y, fold, folds, wd).argmax(1) == y).float().mean())
    best = max(weight_decays, key=lambda wd: (round(cv[wd], 4), wd))  # ties: the stronger penalty
    temperature = _temperature(_out_of_fold_logits(x, y, fold, folds, best), y)
    w, b = _fit_linear(x, y, len(ROUTED), best)
    report = {"questions": len(fit), "folds": folds, "cv_accuracy": {repr(k): round(v, 4) for k, v in cv.items()},
              "weight_decay": best, "temperature": round(temperature, 4)}
    head = LinearHead(w, b, temperature, ROUTED, tuple(CUES.items()), report)
    return head, report


@dataclass(frozen=True)
class Judgement:
    """A router on a set of questions. ``confusion[i][j]``: questions of class ``ROUTED[i]`` routed
    to ``columns[j]`` (the seven classes, then ``general``)."""

    n: int
    correct: int
    per_class: dict[str, tuple[int, int]]     # class -> (correct, questions)
    per_style: dict[str, tuple[int, int]]
    confusion: list[list[int]]
    columns: tuple[str, ...]

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


def judge(router, rows: Sequence[DevQuestion]) -> Judgement:
    """Route ``rows`` (their extracted questions, as a pipeline does) and count."""
    if not rows:
        raise ValueError("no questions to judge the router on")
    routed = router.route([r.question for r in rows]).classes
    columns = (*ROUTED, "general")
    confusion = [[0] * len(columns) for _ in ROUTED]
    per_class: dict[str, list[int]] = {}
    per_style: dict[str, list[int]] = {}
    for r, c in zip(rows, routed, strict=True):
        confusion[ROUTED.index(r.klass)][columns.index(c) if c in columns else -1] += 1
        for table, key in ((per_class, r.klass), (per_style, r.style)):
            hit = table.setdefault(key, [0, 0])
            hit[0] += c == r.klass
            hit[1] += 1
    correct = sum(confusion[i][i] for i in range(len(ROUTED)))
    return Judgement(len(rows), correct, {k: (v[0], v[1]) for k, v in per_class.items()},
                     {k: (v[0], v[1]) for k, v in sorted(per_style.items())}, confusion, columns)
