"""The model and processor behind ``pretrained=``: the shipped testbed model, or any Hugging Face
image-text-to-text checkpoint (a local folder or a hub id in the local cache)."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TESTBED_NAMES", "load_model", "torch_dtype"]

#: ``pretrained`` values that name the shipped testbed model (``testbed`` is the default version)
TESTBED_NAMES = {"testbed": None, "testbed-v1": "v1", "testbed-v2": "v2"}


def torch_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """``auto`` (float32 on the CPU, bfloat16 on CUDA), ``float16``, ``bfloat16`` or ``float32``."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={name!r} is not a floating dtype: use auto, float16, bfloat16 or float32")
    return dtype


def _is_testbed_folder(path: Path) -> bool:
    return (path / "training.json").exists() and (path / "model.safetensors").exists()


def load_model(pretrained: str, device: torch.device, dtype: torch.dtype, attn: str):
    """``(model, processor)`` in eval mode on ``device``. Testbed weights (a name of
    :data:`TESTBED_NAMES` or a folder that ``tokenprune testbed train`` wrote) load through
    :func:`tokenprune_lab.testbed.model.load`; anything else through ``AutoModelForImageTextToText``
    and ``AutoProcessor``."""
    if pretrained in TESTBED_NAMES or _is_testbed_folder(Path(pretrained)):
        from ..testbed.model import load

        where = TESTBED_NAMES.get(pretrained, pretrained)
        return load(where, dtype=dtype, device=device, attn=attn)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=dtype, attn_implementation=attn)
    processor = AutoProcessor.from_pretrained(pretrained)
    processor.tokenizer.padding_side = "left"  # batched generation appends after the prompt
    return model.to(device).eval(), processor
