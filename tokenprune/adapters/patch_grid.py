"""A public base for patch-grid families: a ViT tower (CLIP, SigLIP, DINOv2, InternViT...) over one
patch grid per image, an optional [CLS] token first, and a projector into the LLM.

A family written on :class:`PatchGridAdapter` implements ``encode`` with public names only: the
tower's attention modules (:func:`tower_attentions`), :meth:`PatchGridAdapter.project`,
:meth:`PatchGridAdapter.patch_signals` (the recorded attention per patch, [CLS] dropped) and
:class:`~tokenprune.contract.VisualTokens`; ``docs/adapters.md`` writes two families on it (a
pooled LLaVA and an InternVL with pixel shuffle).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..contract import Requirements
from . import capture
from .base import Adapter, UnsupportedModel

__all__ = ["PatchGridAdapter", "tower_attentions"]


def tower_attentions(tower: nn.Module) -> list[nn.Module]:
    """The self-attention module of each tower block, in order: ``encoder.layers[i].self_attn``
    (CLIP, SigLIP) or ``encoder.layer[i].attention`` (DINOv2, InternViT). Both call their kernel
    through ``AttentionInterface``, which is what attention capture needs.

    Raises:
        UnsupportedModel: a tower with neither layout.
    """
    encoder: Any = getattr(tower, "encoder", None)  # an untyped module tree
    if hasattr(encoder, "layers") and all(hasattr(b, "self_attn") for b in encoder.layers):
        return [b.self_attn for b in encoder.layers]
    if hasattr(encoder, "layer") and all(hasattr(b, "attention") for b in encoder.layer):
        return [b.attention for b in encoder.layer]
    raise UnsupportedModel(
        f"the vision tower {type(tower).__name__} has neither encoder.layers[i].self_attn (CLIP/SigLIP) nor "
        "encoder.layer[i].attention (DINOv2/InternViT); override num_layers and attention_module for it"
    )


class PatchGridAdapter(Adapter):
    """Base of families whose tower makes one patch grid per image (see the module docstring).

    It finds the tower at ``model.model.vision_tower`` (override :meth:`vision_tower` elsewhere)
    and its attention modules, and gives ``num_layers``, ``attention_module``, :meth:`project` and
    :meth:`patch_signals`; a subclass implements ``encode`` and sets ``has_cls`` to whether the
    tower puts a [CLS] token first.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        #: the vision tower (an untyped module tree)
        self.tower: Any = self.vision_tower()
        self._attentions = tower_attentions(self.tower)

    def vision_tower(self) -> nn.Module:
        """The model's vision tower: ``model.model.vision_tower``."""
        return self.model.model.vision_tower

    @property
    def num_layers(self) -> int:
        return len(self._attentions)

    def attention_module(self, layer: int) -> nn.Module:
        return self._attentions[layer - 1]

    def project(self, x: Tensor) -> Tensor:
        """``(N, M, Dv) -> (N, M, D)``: the model's ``multi_modal_projector`` (what
        ``VisualTokens.project`` maps fused tower features into the LLM with)."""
        return self.model.model.multi_modal_projector(x)

    def patch_signals(self, need: Requirements, recorder: capture.Recorder) -> dict[str, Any]:
        """The recorded attention signals of a one-grid-per-image tower, as ``VisualTokens``
        keywords, over the patches ([CLS] dropped when :attr:`has_cls`): ``cls_attention`` and
        ``received_attention`` ``{layer: (N, H, M)}``, ``attention_keys`` ``{layer: (N, M, Dk)}``."""
        first = 1 if self.has_cls else 0
        return dict(
            cls_attention={li: recorder.take(li, "cls")[0][:, :, first:] for li in need.cls_attention},
            received_attention={li: recorder.take(li, "received")[0][:, :, first:] for li in need.received_attention},
            attention_keys={li: recorder.take(li, "keys")[0][:, first:] for li in need.attention_keys},
        )
