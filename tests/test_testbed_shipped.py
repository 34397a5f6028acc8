"""The testbed model shipped inside the package."""

from __future__ import annotations

import json

import pytest
from tokenprune_lab.testbed import model as tb_model


@pytest.mark.parametrize("version", [1, 2])
def test_shipped_model_loads_and_scores_as_its_card_says(version):
    """The shipped weights of each version load offline and reproduce, prediction by prediction,
    the check recorded when they were saved (v2 rebuilds its DINOv2 tower from the cache)."""
    from tokenprune_lab.testbed.evaluate import evaluate

    d = tb_model.shipped_dir(version)
    card = json.loads((d / "training.json").read_text())
    assert (d / "model.safetensors").stat().st_size <= 25 * 2**20
    model, proc = tb_model.load(f"v{version}")
    assert model.config.vision_config.model_type == ("clip_vision_model" if version == 1 else "dinov2")
    report = evaluate(model, proc, [], [], "val", scenes=card["check"]["scenes"])
    assert report["unpruned"]["predictions"] == card["check"]["predictions"]
    assert report["unpruned"]["accuracy"]["overall"] == card["check"]["accuracy"]


def test_the_default_model_is_v2():
    """``load()`` and every command without ``--model`` use the v2 weights (DINOv2 tower)."""
    assert tb_model.resolve_dir(None) == tb_model.shipped_dir(2)
