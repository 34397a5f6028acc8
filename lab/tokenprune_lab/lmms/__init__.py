"""tokenprune as an lmms-eval model: ``lmms-eval --model tokenprune --model_args pretrained=...,spec=clasp,budget=64``.

lmms-eval (0.7) finds external models through the Python entry-point group ``lmms_eval.models``;
tokenprune's ``pyproject.toml`` registers :func:`manifest` there, so ``pip install
tokenprune[lmms-eval]`` is all it takes: no fork, no copy, no environment variable.

- :mod:`.model`: :class:`~tokenprune_lab.lmms.model.TokenPrune`, the lmms-eval model (batches, data
  parallelism through accelerate, per-sample pruning records in the logged samples).
- :mod:`.loading`: the model and processor from ``pretrained`` (a Hugging Face folder or hub id, or
  the shipped testbed model).
- :mod:`.task`: a local lmms-eval task written from testbed scenes (``tokenprune lmms-eval task``),
  which CI runs through lmms-eval's own evaluator.

Recipes: ``docs/lmms-eval.md``. Nothing here is imported by the core.
"""

from __future__ import annotations

MODEL_ID = "tokenprune"


def manifest():
    """The lmms-eval model manifest (the ``lmms_eval.models`` entry point calls this)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="tokenprune_lab.lmms.model.TokenPrune")
