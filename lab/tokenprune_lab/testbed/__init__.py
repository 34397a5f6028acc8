"""The testbed: a measurement ground for pruning on a small trained LLaVA.

- :mod:`.scenes`: deterministic 336 x 336 PIL scenes on the 24 x 24 patch grid;
- :mod:`.questions`: one-word-answer questions in CLASP's seven classes, varied phrasings;
- :mod:`.splits`: train / val / calibration / test / hard, each its own seed;
- :mod:`.model`: the ``LlavaForConditionalGeneration`` config, tokenizer, processor, shipped weights;
- :mod:`.train`: ``tokenprune testbed train`` (two stages, checkpoints, resume);
- :mod:`.evaluate`, :mod:`.ablation`, :mod:`.calibrate`, :mod:`.report`: ``eval``, ``ablate``,
  ``calibrate`` (data parallel under ``torchrun``);
- :mod:`.demo`: ``tokenprune demo``.
"""
