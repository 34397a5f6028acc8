"""CDPruner's conditional DPP (Zhang et al., NeurIPS 2025), reimplemented from the paper.

CDPruner keeps the tokens that maximise a determinantal point process conditioned on the
instruction: ``L = diag(q) S diag(q)`` with ``S`` the cosine similarity of the visual tokens and
``q`` their relevance to the prompt. CLIP's text tower is not available offline, so relevance is
the ``text-similarity`` scorer: the cosine between each token's decoder-space feature and the
prompt's mean embedding in the decoder's embedding space (``req.scores``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from tokenprune import hookimpl
from tokenprune.stages import Completion, CompletionRequest, CompletionResult

from .greedy import greedy_dpp_map


class ConditionalDPP(Completion):
    """Greedy fast MAP of the conditional DPP (:func:`tokenprune_plugins.greedy.greedy_dpp_map`).

    Relevance ``r`` = ``phi`` min-max normalised over the row's valid tokens; quality
    ``q = exp(theta / (2 (1 - theta)) r)``, so ``theta = 0`` is a pure diversity DPP and larger
    ``theta`` weighs relevance more (the paper's trade-off). Pivots, if any, are conditioned on:
    the DPP continues from them. With no pivots (the published method) the whole budget is
    the DPP's.

    ``released = True`` reproduces the released code's quality (see ``docs/methods.md``): the
    relevance is negated and enters linearly. The released code normalises over the whole batch;
    here each image is normalised on its own, which is the same at batch size 1 (how it is run).
    """

    theta: float = Field(0.5, ge=0, lt=1, description="relevance/diversity trade-off in [0, 1)")
    released: bool = Field(
        False, description="the released code's quality instead of the paper's: relevance negated, "
        "q = (r - min + 1e-6) / (max - min), linear (its exp(theta ...) line is commented out; theta unused)"
    )

    def complete(self, req: CompletionRequest) -> CompletionResult:
        phi = req.scores.float()
        valid = req.valid
        if self.released:
            phi = -phi  # the released code ranks by negated image-text similarity
        lo = phi.masked_fill(~valid, float("inf")).amin(1, keepdim=True)
        hi = phi.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
        if self.released:  # linear quality, strictly positive (the released normalisation)
            q = ((phi - lo + 1e-6) / (hi - lo).clamp_min(1e-6)).masked_fill(~valid, 1.0)  # (B, M)
        else:
            r = ((phi - lo) / (hi - lo).clamp_min(1e-6)).masked_fill(~valid, 0)  # (B, M) in [0, 1]
            q = torch.exp(self.theta / (2 * (1 - self.theta)) * r)  # (B, M)
        picks = int(req.k2.max()) + int(req.pivots.sum(1).max())  # Cholesky rows per image
        gram, x = req.similarity_or_unit(picks)
        return CompletionResult(greedy_dpp_map(x, q, req.pool, req.pivots, req.k2, gram=gram))


@hookimpl
def register_completions(register):
    register("dpp", ConditionalDPP)
