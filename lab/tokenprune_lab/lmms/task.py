"""A local lmms-eval task from testbed scenes: ``tokenprune lmms-eval task --out DIR``.

The folder holds everything lmms-eval needs, offline:

- ``images/<split>-<scene>.png``: the scenes, drawn by the testbed's generator;
- ``questions.jsonl``: one line per question (the same questions, in the same order, as
  ``tokenprune eval --split S --scenes N``), with its class and its one-token answer;
- ``<name>.yaml``: the task (``dataset_path: json``, generation of one greedy token, metric
  ``accuracy`` = exact match of the answer token), and ``utils.py``, which binds the task's
  functions below to the folder.

Run it with ``lmms-eval --model tokenprune --model_args pretrained=testbed,spec=clasp,budget=64
--tasks <name> --include_path DIR``; its accuracy equals ``tokenprune eval`` on the same questions
(``tests/test_lmms_eval.py`` checks it, single-process and data-parallel).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_task", "task_functions", "DEFAULT_NAME"]

DEFAULT_NAME = "tokenprune_testbed"

_YAML = """\
# Written by `tokenprune lmms-eval task` ({split} split, {scenes} scenes, {questions} questions).
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 1
  temperature: 0
  do_sample: false
  num_beams: 1
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""

_UTILS = '''\
"""Written by `tokenprune lmms-eval task`: the task's functions, bound to this folder."""
from pathlib import Path

from tokenprune_lab.lmms.task import task_functions

doc_to_visual, doc_to_text, process_results = task_functions(Path(__file__).resolve().parent)
'''


def write_task(out: str | Path, split: str = "test", scenes: int | None = 4, name: str = DEFAULT_NAME) -> Path:
    """Write the task folder (see the module docstring); returns the YAML's path."""
    from ..testbed.splits import examples, scene

    out = Path(out).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    exs = examples(split, scenes)
    if not exs:
        raise ValueError(f"split '{split}' with {scenes} scenes has no questions")
    lines = []
    for n, ex in enumerate(exs):
        image = f"images/{split}-{ex.index:05d}.png"
        if not (out / image).exists():
            scene(split, ex.index).image.save(out / image)
        lines.append(json.dumps({"question_id": n, "split": split, "scene": ex.index, "class": ex.klass,
                                 "question": ex.question.text, "answer": ex.question.answer, "image": image}))
    (out / "questions.jsonl").write_text("\n".join(lines) + "\n")
    (out / "utils.py").write_text(_UTILS)
    yaml = out / f"{name}.yaml"
    yaml.write_text(_YAML.format(name=name, data=out / "questions.jsonl", split=split,
                                 scenes=len({e.index for e in exs}), questions=len(exs)))
    return yaml


def task_functions(folder: Path) -> tuple[Callable, Callable, Callable]:
    """``doc_to_visual``, ``doc_to_text`` and ``process_results`` of a task written in ``folder``."""

    def doc_to_visual(doc: dict[str, Any]) -> list:
        from PIL import Image

        with Image.open(folder / doc["image"]) as image:
            return [image.convert("RGB")]

    def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
        return doc["question"]

    def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
        return {"accuracy": float(results[0].strip() == doc["answer"])}

    return doc_to_visual, doc_to_text, process_results
