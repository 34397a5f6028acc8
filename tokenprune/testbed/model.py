"""The testbed model: a small ``LlavaForConditionalGeneration`` (CLIP tower at patch 14, 576 visual
tokens at 336 px, Llama decoder), its word-level tokenizer and its real ``LlavaProcessor``.

The architecture is :data:`ARCH`. The trained weights ship in ``tokenprune/data/testbed/``
(``model.safetensors``, ``config.json``, ``tokenizer.json``, ``training.json``); :func:`load`
reads them and needs no network. :func:`build` makes a fresh, untrained model from the same config
(training starts there).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from .questions import answer_words, question_words
from .scenes import SIZE

__all__ = ["ARCH", "IMAGE_TOKEN", "arch_with", "build", "build_tokenizer", "build_processor", "load", "save",
           "shipped_dir", "prompt", "CLIP_MEAN", "CLIP_STD"]

IMAGE_TOKEN = "<image>"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The model's shape. ``vision_feature_layer = -1``: the projector reads the last tower layer.
ARCH = {
    "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
               "num_attention_heads": 4, "image_size": SIZE, "patch_size": 14},
    "text": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3,
             "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 1024,
             "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    "vision_feature_layer": -1,
}


def shipped_dir() -> Path:
    return Path(str(resources.files("tokenprune").joinpath("data/testbed")))


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over every word the testbed can produce."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Lowercase()
    pre = pre_tokenizers.Whitespace()
    words: list[str] = []
    for text in ["user: assistant:", *question_words(), *answer_words()]:
        for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
            if w not in words:
                words.append(w)
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", padding_side="left",
                                   extra_special_tokens={"image_token": IMAGE_TOKEN})
    return fast


def arch_with(overrides: dict | None = None) -> dict:
    """A copy of :data:`ARCH` with ``overrides`` merged in (a nested dict updates that part)."""
    arch = {k: dict(v) if isinstance(v, dict) else v for k, v in ARCH.items()}
    for k, v in (overrides or {}).items():
        if isinstance(v, dict):
            arch[k].update(v)
        else:
            arch[k] = v
    return arch


def _config(tokenizer, arch: dict):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       **arch["text"])
    return LlavaConfig(vision_config=CLIPVisionConfig(**arch["vision"]), text_config=text,
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                       vision_feature_layer=arch["vision_feature_layer"],
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)


def build(seed: int = 0, tokenizer=None, arch: dict | None = None):
    """A fresh (untrained) testbed model and its tokenizer, initialised from ``seed``, with the
    architecture ``arch`` (default :data:`ARCH`; see :func:`arch_with`)."""
    from transformers import LlavaForConditionalGeneration

    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(_config(tokenizer, arch or ARCH),
                                                       attn_implementation="sdpa")
    _generation_defaults(model, tokenizer)
    return model, tokenizer


def _generation_defaults(model, tokenizer) -> None:
    g = model.generation_config
    g.pad_token_id, g.eos_token_id, g.bos_token_id = (tokenizer.pad_token_id, tokenizer.eos_token_id,
                                                       tokenizer.bos_token_id)
    g.do_sample = False


def build_processor(tokenizer):
    """The real ``LlavaProcessor``: CLIP preprocessing at 336 px, ``<image>`` expanded to 576."""
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE},
                                         crop_size={"height": SIZE, "width": SIZE},
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def prompt(question: str) -> str:
    """The single-turn prompt the model was trained on; the answer is the next token."""
    return f"<s>user: {IMAGE_TOKEN}\n{question} assistant:"


def save(model, tokenizer, directory: str | Path, meta: dict | None = None) -> None:
    """Write ``model.safetensors``, ``config.json``, the tokenizer and ``training.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if meta is not None:
        (directory / "training.json").write_text(json.dumps(meta, indent=2))


def load(directory: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device="cpu",
         attn: str = "sdpa"):
    """``(model, processor)`` from ``directory`` (default: the weights shipped in the package)."""
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    directory = Path(directory) if directory else shipped_dir()
    if not (directory / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no testbed weights in {directory}: train them with `tokenprune testbed train --out {directory}`")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype, attn_implementation=attn)
    _generation_defaults(model, tokenizer)
    return model.to(device).eval(), build_processor(tokenizer)
