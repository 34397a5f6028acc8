"""Model-family adapters: where a pipeline meets a transformers model.

:func:`adapter_for` picks the adapter by the model's class (its MRO, so subclasses work).
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, Encoded, PruneRecord, UnsupportedInput
from .llava import LlavaAdapter, LlavaNextAdapter, UnsupportedModel
from .qwen import Qwen3Adapter, Qwen25Adapter, QwenAdapter

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Encoded",
    "PruneRecord",
    "UnsupportedInput",
    "UnsupportedModel",
    "adapter_for",
]

#: transformers class name -> adapter
ADAPTERS: dict[str, type[Adapter]] = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "Qwen2VLForConditionalGeneration": QwenAdapter,
    "Qwen2_5_VLForConditionalGeneration": Qwen25Adapter,
    "Qwen3VLForConditionalGeneration": Qwen3Adapter,
}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``, or a clear error naming the supported classes."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](model)
    raise UnsupportedModel(
        f"tokenprune has no adapter for {type(model).__name__}; supported: {', '.join(ADAPTERS)}. "
        "Load the model with its *ForConditionalGeneration class (e.g. LlavaForConditionalGeneration), "
        "or prune precomputed features with tokenprune.Pipeline directly"
    )
