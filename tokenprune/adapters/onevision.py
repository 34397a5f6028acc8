"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): anyres images, multi-image, video.

The LLM tokens of OneVision are not always single tower patches: a large anyres grid is resized
(bilinear, ``vision_aspect_ratio = "anyres_max_N"``) after the projector, and every video frame is
pooled 2x2 (bilinear, ``apply_pooling``). Both are linear maps of the per-patch features, so the
adapter pushes every per-patch signal the pipeline reads through the model's *own*
``pack_image_features`` / ``apply_pooling``: encoder hidden states, received attention, keys and
patch coordinates. A token's encoder features, attention and position are therefore the same
mixture of patches as its LLM feature, and no layout rule is re-implemented. (Fused features fed
to the LLM are projected after that mixing, while the model mixes after its projector: for
``feed = "llm"`` fusion the two orders differ by the projector's non-linearity.)

Rows: every image (prompt by prompt), then every video (all its frames). Slots: an anyres image
is its base crop then each row of its (resized) grid followed by a newline; a single-crop image
(multi-image prompts, ``batch_num_images > 1``) and a video end with one newline. A newline is
kept when a token of its row (of its image / video for a single newline) is kept, before and
inside the LLM, and does not count against the budget.

Positions: an anyres grid token's is its (row, column) in the full-resolution patch grid (resized
tokens sit at the centre of the patches they mix); the base crop is put on the grid's scale; a
video token's is ``(frame * side + row, col)`` in patch units, frames stacked along the rows.

The tower is SigLIP in the released checkpoints (no [CLS]): score with ``received-attention``.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from ..contract import Requirements, VisualTokens, normalize_layer
from . import capture
from .base import Adapter, Encoded, UnsupportedInput
from .llava import LlavaNextAdapter, UnsupportedModel
from .patch_grid import PatchGridAdapter
from .sequence import pad_flat


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava-onevision"
    has_cls = False
    cls_token = False
    downsample = False
    modalities = ("image", "video")
    pixel_inputs = ("pixel_values", "pixel_values_videos")
    visual_inputs = ("pixel_values", "image_sizes", "pixel_values_videos", "image_sizes_videos", "batch_num_images")
    modeling = "transformers.models.llava_onevision.modeling_llava_onevision"

    def __init__(self, model: nn.Module):  # not LlavaAdapter's: OneVision's "full" strategy has no [CLS] to drop
        PatchGridAdapter.__init__(self, model)
        cfg = self.model.config
        if cfg.vision_feature_select_strategy not in ("default", "full"):
            raise UnsupportedModel(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}; "
                                   "tokenprune supports 'full' (SigLIP) and 'default' (drop the [CLS])")
        if not isinstance(cfg.vision_feature_layer, int):
            raise UnsupportedModel(f"vision_feature_layer={cfg.vision_feature_layer} concatenates several layers; "
                                   "tokenprune supports one feature layer")
        self.skip = 1 if cfg.vision_feature_select_strategy == "default" else 0  # leading [CLS] column

    def check_inputs(self, inputs: dict[str, Any]) -> None:
        Adapter.check_inputs(self, inputs)
        if inputs.get("pixel_values") is not None and inputs.get("image_sizes") is None:
            raise UnsupportedInput("LLaVA-OneVision images need image_sizes next to pixel_values (the processor returns both)")
        self._check_pixels(inputs)

    def _check_pixels(self, inputs: dict[str, Any]) -> None:
        """Before the tower runs: images are ``(images, crops, C, H, W)`` with one ``image_sizes`` row
        each and at least the crops their size implies; videos are ``(videos, frames, C, H, W)``."""
        pixels, videos = inputs.get("pixel_values"), inputs.get("pixel_values_videos")
        if videos is not None and videos.dim() != 5:
            raise UnsupportedInput(f"pixel_values_videos must be (videos, frames, C, H, W), got shape "
                                   f"{tuple(videos.shape)}: pass what the processor returns")
        if pixels is None:
            return
        sizes = inputs["image_sizes"]
        if pixels.dim() != 5:
            raise UnsupportedInput(f"LLaVA-OneVision pixel_values must be (images, crops, C, H, W), got shape "
                                   f"{tuple(pixels.shape)}: pass what the processor returns")
        if pixels.shape[0] != sizes.shape[0]:
            raise UnsupportedInput(f"pixel_values holds {pixels.shape[0]} images but image_sizes gives "
                                   f"{sizes.shape[0]}: pass both as the processor returns them, each image's "
                                   "crops in pixel_values and no video's frames")
        crops = self._crops_per_image(sizes)  # (N,)
        per_prompt = inputs.get("batch_num_images")
        if per_prompt is not None:  # a prompt with several images gives one crop each
            single = torch.tensor([int(n) == 1 for n in per_prompt.tolist() for _ in range(int(n))])
            if single.numel() != crops.numel():
                raise UnsupportedInput(f"batch_num_images counts {single.numel()} images, but pixel_values holds "
                                       f"{crops.numel()}: pass what the processor returns")
            crops = torch.where(single, crops, torch.ones_like(crops))
        short = (crops > pixels.shape[1]).nonzero().flatten().tolist()
        if short:
            i = short[0]
            raise UnsupportedInput(f"image {i} of pixel_values holds {pixels.shape[1]} crops, but its size "
                                   f"{sizes[i].tolist()} in image_sizes needs {int(crops[i])}: pass pixel_values "
                                   "and image_sizes as the processor returns them")

    def encoder_output(self, features: Tensor, deepstack: list[Tensor], modality: str = "image") -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # the model concatenates an image output's list, and flattens a video output's (videos, slots) axes
        return BaseModelOutputWithPooling(pooler_output=cast(Any, [features] if modality == "image" else features[None]))

    # -- encode: the model's own features, and every signal pushed through the same packing ----------
    def encode(self, inputs: dict[str, Any], need: Requirements, recorder: capture.Recorder) -> Encoded:
        layers = sorted(set(need.layers) | {normalize_layer(self.model.config.vision_feature_layer, self.num_layers)})
        items: list[dict[str, Tensor]] = []  # per image, then per video: per-slot tensors
        chunk = 0  # the recorder's kernel calls: the images' tower call, then the videos'
        if inputs.get("pixel_values") is not None:
            out = self.model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs.get("batch_num_images"),
                output_hidden_states=layers, return_dict=True)
            items += self._images(out, inputs, need, recorder, chunk)
            chunk += 1
        videos = 0
        if inputs.get("pixel_values_videos") is not None:
            out = self.model.model.get_video_features(inputs["pixel_values_videos"], output_hidden_states=layers,
                                                      return_dict=True)
            clips = self._videos(out, inputs["pixel_values_videos"].shape[:2], need, recorder, chunk)
            items += clips
            videos = len(clips)
        return self._assemble_rows(items, need, videos)

    def _signals(self, tower_out: Any, need: Requirements, recorder: capture.Recorder,
                 chunk: int) -> dict[str, Tensor]:
        """Per-patch signals of one tower call, ``(C, S, K)`` each (C crops or frames, S patches):
        the hidden states the pipeline reads (the feature layer when it reads none), the recorded
        attention of the call ``chunk``."""
        s = self.skip
        layers = need.layers or {normalize_layer(self.model.config.vision_feature_layer, self.num_layers)}
        out = {f"layer{li}": tower_out.hidden_states[li][:, s:] for li in sorted(layers)}
        for li in need.received_attention:
            out[f"received{li}"] = recorder.take(li, "received")[chunk][:, :, s:].transpose(1, 2)  # (C, S, H)
        for li in need.attention_keys:
            out[f"keys{li}"] = recorder.take(li, "keys")[chunk][:, s:]  # (C, S, Dh)
        return out

    def _images(self, out: Any, inputs: dict[str, Any], need: Requirements, recorder: capture.Recorder,
                chunk: int) -> list[dict[str, Tensor]]:
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        signals = self._signals(out, need, recorder, chunk)
        C = next(iter(signals.values())).shape[0]
        crops = self._crop_counts(inputs, C)  # (N,)
        # patch coordinates on each image's full grid (the base crop on the grid's scale)
        pr = torch.arange(side * side) // side
        pc = torch.arange(side * side) % side
        coords = []
        for size, c in zip(inputs["image_sizes"].tolist(), crops.tolist(), strict=True):
            gh, gw = self._grid_shape(size) if c > 1 else (1, 1)
            k = torch.arange(c).unsqueeze(1)  # crop index, 0 = base
            row = torch.where(k == 0, pr * gh, (k - 1) // gw * side + pr)
            col = torch.where(k == 0, pc * gw, (k - 1) % gw * side + pc)
            coords.append(torch.stack([row, col], -1).float())  # (c, S, 2)
        signals["pos"] = torch.cat(coords).to(next(iter(signals.values())).device)
        packed = self._push(signals, lambda feats, nl: self.model.model.pack_image_features(
            [f for f in torch.split(feats, crops.tolist())], inputs["image_sizes"], image_newline=nl,
            vision_aspect_ratio=cfg.vision_aspect_ratio)[0])
        return [dict(p, own=o, base=torch.tensor(int(c > 1) * side * side), frames=torch.tensor(1))
                for p, o, c in zip(packed, out.pooler_output, crops.tolist(), strict=True)]

    def _videos(self, out: Any, shape: torch.Size, need: Requirements, recorder: capture.Recorder,
                chunk: int) -> list[dict[str, Tensor]]:
        cfg = self.model.config
        V, F = shape
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        signals = self._signals(out, need, recorder, chunk)
        p = torch.arange(side * side)
        frame = torch.arange(V * F).unsqueeze(1) % F
        signals["pos"] = torch.stack([frame * side + p // side, (p % side).expand(V * F, -1)], -1).float().to(
            next(iter(signals.values())).device)

        def pool(feats: Tensor, nl: Tensor) -> list[Tensor]:  # (V*F, S, K) -> per video (F*S' + 1, K)
            pooled = self.model.model.apply_pooling(feats).reshape(V, -1, feats.shape[-1])
            return list(torch.cat([pooled, nl.expand(V, 1, -1)], 1))

        packed = self._push(signals, pool)
        return [dict(p, own=o, base=torch.tensor(0), frames=torch.tensor(F)) for p, o in zip(packed, out.pooler_output, strict=True)]

    @staticmethod
    def _push(signals: dict[str, Tensor], pack) -> list[dict[str, Tensor]]:
        """Every ``(C, S, K)`` signal through the model's packing, in one call: the signals side by
        side plus a marker channel that only the newline slots carry. Per item, the packed slots
        ``(P, K)`` of each signal and ``newline`` ``(P,)``."""
        names = list(signals)
        widths = [signals[n].shape[-1] for n in names]
        ref = signals[names[0]]
        feats = torch.cat([signals[n].to(ref.device, torch.float32) for n in names]
                          + [torch.zeros(*ref.shape[:2], 1, device=ref.device)], -1)  # (C, S, sum K + 1)
        newline = torch.zeros(feats.shape[-1], device=ref.device)
        newline[-1] = 1.0
        out = []
        for slots in pack(feats, newline):  # per item (P, sum K + 1)
            parts = dict(zip(names, torch.split(slots[:, :-1], widths, -1), strict=True))
            parts["newline"] = slots[:, -1] > 0.5
            out.append(parts)
        return out

    def _crop_counts(self, inputs: dict[str, Any], total: int) -> Tensor:
        """Crops per image, as the model counts them (one per image of a multi-image prompt)."""
        crops = self._crops_per_image(inputs["image_sizes"])
        per_prompt = inputs.get("batch_num_images")
        if per_prompt is not None:
            single = torch.tensor([int(n) == 1 for n in per_prompt.tolist() for _ in range(int(n))])
            crops = torch.where(single, crops, torch.ones_like(crops))
        if int(crops.sum()) != total:
            raise UnsupportedInput(f"the tower saw {total} crops but image_sizes and batch_num_images give "
                                   f"{int(crops.sum())}: pass what the processor returns")
        return crops

    def _assemble_rows(self, items: list[dict[str, Tensor]], need: Requirements, videos: int) -> Encoded:
        """One padded row per item: the pipeline's tokens (non-newline slots) and the slot layout."""
        slots = torch.tensor([it["newline"].shape[0] for it in items])
        dev = items[0]["own"].device
        slots = slots.to(dev)

        def per_slot(key: str) -> Tensor:  # (N, P, ...)
            return pad_flat(torch.cat([it[key].to(dev) for it in items]), slots)[0]

        own = per_slot("own")  # (N, P, D)
        newline = per_slot("newline")
        P = own.shape[1]
        slot_valid = torch.arange(P, device=dev) < slots.unsqueeze(1)
        is_token = slot_valid & ~newline  # (N, P)
        slot_token = torch.where(is_token, is_token.long().cumsum(1) - 1, -1)
        counts = is_token.sum(1)  # (N,)
        row = newline.long().cumsum(1) - newline.long()  # newlines strictly before each slot
        base = torch.stack([it["base"] for it in items]).to(dev)  # (N,) base-crop slots (anyres images)
        rows = torch.where((torch.arange(P, device=dev) < base.unsqueeze(1)) | ~slot_valid, -1, row)

        def per_token(key: str) -> Tensor:  # (N, M, K)
            x = per_slot(key)
            return pad_flat(x[is_token], counts)[0]

        token_valid = torch.arange(int(counts.max()), device=dev) < counts.unsqueeze(1)
        layers = {int(k[5:]): per_token(k) for k in items[0] if k.startswith("layer")}
        tokens = VisualTokens(
            layers={li: x.to(own.dtype) for li, x in layers.items()}, num_layers=self.num_layers, mask=token_valid,
            positions=per_token("pos"),
            received_attention={li: per_token(f"received{li}").transpose(1, 2) for li in need.received_attention},
            attention_keys={li: per_token(f"keys{li}") for li in need.attention_keys},
            project=self.project,
        )
        frames = torch.stack([it["frames"] for it in items]).to(dev)  # (N,) 1 per image
        return Encoded(tokens, own, slots, slot_token, layout={"rows": rows, "newline": newline & slot_valid},
                       videos=videos, frames=frames)
