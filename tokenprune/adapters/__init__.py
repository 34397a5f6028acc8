"""Model-family adapters: where a pipeline meets a transformers model.

Families are registered through the ``register_adapters`` hook, the built-in ones here exactly as
a third party's (``docs/adapters.md``); :func:`adapter_for` picks the adapter by the model's class
(its MRO, so subclasses work, and an adapter registered for a subclass wins over its parent's).
"""

from __future__ import annotations

from torch import nn

from ..hookspecs import hookimpl
from .base import Adapter, Batch, Encoded, UnsupportedInput, UnsupportedModel
from .llava import LlavaAdapter, LlavaNextAdapter
from .onevision import LlavaOnevisionAdapter
from .qwen import Qwen3Adapter, Qwen25Adapter, QwenAdapter

__all__ = [
    "Adapter",
    "Batch",
    "Encoded",
    "UnsupportedInput",
    "UnsupportedModel",
    "adapter_for",
]


@hookimpl
def register_adapters(register) -> None:
    register("LlavaForConditionalGeneration", LlavaAdapter)
    register("LlavaNextForConditionalGeneration", LlavaNextAdapter)
    register("LlavaOnevisionForConditionalGeneration", LlavaOnevisionAdapter)
    register("Qwen2VLForConditionalGeneration", QwenAdapter)
    register("Qwen2_5_VLForConditionalGeneration", Qwen25Adapter)
    register("Qwen3VLForConditionalGeneration", Qwen3Adapter)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (the first class of its MRO with a registered adapter), or a clear
    error naming the supported classes."""
    from ..registry import get_registry

    adapters = get_registry().adapters
    for cls in type(model).__mro__:
        if cls.__name__ in adapters:
            return adapters[cls.__name__].cls(model)
    raise UnsupportedModel(
        f"tokenprune has no adapter for {type(model).__name__}; supported: {', '.join(adapters)}. "
        "Load the model with its *ForConditionalGeneration class (e.g. LlavaForConditionalGeneration), "
        "add the family with an adapter (docs/adapters.md), or prune precomputed features with "
        "tokenprune.Pipeline directly"
    )
