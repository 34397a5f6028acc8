"""The visual-token budget: parsed once where a user gives it, then carried as one value.

A user gives a budget as tokens per image (``64``), a share of each image's tokens (``0.25``), or
one count per image (``[8, 4]``, in the order the images appear in the batch: prompt by prompt,
then image by image within a prompt, then the videos). A video is one item: a count or a share
holds for the whole clip, and :meth:`Budget.per_frame` gives a count per frame instead (``R`` tokens
per frame, ``R * T`` for a video of ``T`` frames, chosen over all of its frames together).
:meth:`Budget.parse` turns any of these into a
:class:`Budget` at the API boundary (``apply``, a call's ``tokenprune_budget=``, the pipeline, a
spec's ``budget``/``budget_ratio``); everything after that reads :meth:`Budget.counts`. "Keep
every token" is a value too, :data:`KEEP_ALL` (the pre-LLM stages of an in-LLM spec, image
down-sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import Tensor

__all__ = ["Budget", "BudgetLike", "KEEP_ALL", "row_counts"]

#: What a user may pass as a budget.
BudgetLike = Union[int, float, Sequence[int], Tensor, "Budget"]


@dataclass(frozen=True)
class Budget:
    """Visual tokens to keep per image (or per video: a video is one item).

    Attributes:
        form: ``"tokens"`` (the same count for every item), ``"ratio"`` (a share of each
            item's tokens, ``R = max(1, round(ratio * M))``), ``"per_image"`` (one count per
            item), ``"per_frame"`` (``tokens`` per frame: ``tokens * T`` for a video of ``T``
            frames, ``tokens`` for an image) or ``"all"`` (every token).
        tokens: the count, for ``"tokens"`` and ``"per_frame"``.
        ratio: the share in ``(0, 1]``, for ``"ratio"``.
        per_image: the counts, for ``"per_image"``.
    """

    form: Literal["tokens", "ratio", "per_image", "per_frame", "all"]
    tokens: int = 0
    ratio: float = 1.0
    per_image: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: BudgetLike | None) -> Budget:
        """The budget a user gave, checked; a :class:`Budget` is returned as it is.

        Raises:
            ValueError: no budget, a ratio outside ``(0, 1]``, a count ``<= 0``.
            TypeError: a bool, a string, or a list that does not hold integers.
        """
        if isinstance(value, Budget):
            return value
        if value is None:
            raise ValueError("no budget given: pass budget=<tokens per image> or a ratio in (0, 1], "
                             "or set 'budget' / 'budget_ratio' in the spec")
        if isinstance(value, (bool, str)):
            raise TypeError(f"budget must be an int, a float ratio or a sequence of ints, not {value!r}")
        if isinstance(value, float):
            if not 0 < value <= 1:
                raise ValueError(f"a float budget is a ratio and must be in (0, 1], got {value}; "
                                 "give an int for a token count")
            return cls("ratio", ratio=value)
        if isinstance(value, int):
            if value <= 0:
                raise ValueError(f"budget must be > 0 tokens per image, got {value}")
            return cls("tokens", tokens=value)
        counts = torch.as_tensor(value)
        if counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise TypeError(f"a per-sample budget must hold integers (one token count per image), got dtype {counts.dtype}")
        if counts.dim() == 0:  # a numpy or tensor scalar
            return cls.parse(int(counts))
        if counts.dim() != 1:
            raise ValueError(f"a per-sample budget is a flat list of token counts, one per image; got shape "
                             f"{tuple(counts.shape)}")
        if bool((counts <= 0).any()):
            raise ValueError(f"every per-sample budget must be > 0, got {counts.tolist()}")
        return cls("per_image", per_image=tuple(int(c) for c in counts.tolist()))

    @classmethod
    def per_frame(cls, tokens: int) -> Budget:
        """``tokens`` per frame of each video (an image is one frame): ``tokens * T`` for a video of
        ``T`` frames (temporal patches, ``video_grid_thw[:, 0]``), selected over all its frames."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise ValueError(f"a per-frame budget is a token count > 0, got {tokens!r}")
        return cls("per_frame", tokens=tokens)

    def for_frames(self, frames: Tensor | None) -> Budget:
        """This budget for items of ``frames`` ``(N,)`` frames each (``None``: images only): a
        per-frame budget becomes one count per item; every other form is returned unchanged."""
        if self.form != "per_frame":
            return self
        if frames is None:
            return Budget("tokens", tokens=self.tokens)
        return Budget("per_image", per_image=tuple(int(f) * self.tokens for f in frames.tolist()))

    def counts(self, valid_counts: Tensor) -> Tensor:
        """``R`` ``(N,)`` int64 on ``valid_counts``' device: each image's budget, clipped to its
        ``valid_counts`` real tokens.

        Raises:
            ValueError: a per-image list whose length is not the number of images.
        """
        N = valid_counts.shape[0]
        device = valid_counts.device
        if self.form == "all":
            return valid_counts.long().clone()
        if self.form == "per_frame":
            raise ValueError("a per-frame budget needs each item's frame count: tokenprune.apply resolves it "
                             "(Budget.for_frames); give a Pipeline a count, a ratio or per-item counts")
        if self.form == "ratio":
            r = torch.round(valid_counts.double() * self.ratio).long().clamp_min(1)
        elif self.form == "tokens":
            r = torch.full((N,), self.tokens, dtype=torch.int64, device=device)
        else:
            if len(self.per_image) != N:
                raise ValueError(
                    f"a per-sample budget needs {N} entries (one per image), got shape ({len(self.per_image)},): "
                    f"a list gives one token count per image, in the order the images appear in the batch "
                    f"(prompt by prompt); give {N} counts, or one int for every image")
            r = torch.tensor(self.per_image, dtype=torch.int64, device=device)
        return torch.minimum(r, valid_counts.long())

    def __str__(self) -> str:
        return {"tokens": f"{self.tokens} tokens per image", "ratio": f"{self.ratio:g} of each image's tokens",
                "per_image": f"{list(self.per_image)} tokens per image", "per_frame": f"{self.tokens} tokens per frame",
                "all": "every token"}[self.form]


#: Keep every token (what the pre-LLM stages do under an in-LLM spec).
KEEP_ALL = Budget("all")


def row_counts(budget: Budget | None, valid_counts: Tensor, fixed: Tensor | None, fixer: str) -> Tensor:
    """``R`` ``(N,)`` int64: each row's count under ``budget``, clipped to its ``valid_counts``;
    or, when a stage fixes the counts (``fixed``, pooling's one token per window), those counts,
    refusing a budget that asks for others. ``fixer`` names that stage in the error.

    Raises:
        ValueError: no budget and no fixed counts; a budget that disagrees with the fixed counts.
    """
    if fixed is None:
        if budget is None:
            raise ValueError("no budget given: pass budget=<tokens per image> or a ratio in (0, 1], "
                             "or set 'budget' / 'budget_ratio' in the spec")
        return budget.counts(valid_counts)
    R = fixed.to(valid_counts.device)
    asked = None if budget is None or budget == KEEP_ALL else budget.counts(valid_counts)
    if asked is not None and not torch.equal(asked, R):
        raise ValueError(
            f"{fixer} decides how many tokens each image keeps ({R.tolist()} here), but the budget asks for "
            f"{asked.tolist()}: leave the budget out (budget=None and no budget in the spec) for this stage"
        )
    return R
