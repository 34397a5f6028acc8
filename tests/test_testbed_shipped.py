"""The testbed model shipped inside the package."""

from __future__ import annotations

import json

from tokenprune.testbed import model as tb_model


def test_shipped_model_loads_and_scores_as_its_card_says():
    """The shipped weights load offline and reproduce the accuracy recorded when they were saved."""
    from tokenprune.testbed.evaluate import evaluate

    d = tb_model.shipped_dir()
    card = json.loads((d / "training.json").read_text())
    assert (d / "model.safetensors").stat().st_size <= 25 * 2**20
    model, proc = tb_model.load()
    report = evaluate(model, proc, [], [], "val", scenes=card["check"]["scenes"])
    assert report["unpruned"]["predictions"] == card["check"]["predictions"]
    assert report["unpruned"]["accuracy"]["overall"] == card["check"]["accuracy"]
