"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``);
LLaVA-OneVision builds on the latter (:mod:`tokenprune.adapters.onevision`).

Both run a CLIP-style tower with a [CLS] token, drop the [CLS] (``vision_feature_select_strategy
= "default"``), project with ``multi_modal_projector`` and use plain 1-D positions.

LLaVA-NeXT packs each image as its base crop (576 tokens) followed by the unpadded high-resolution
grid, with one ``image_newline`` slot after every grid row. The adapter pushes an index tensor
through the model's own ``pack_image_features`` to map every packed slot back to its crop and
patch, so no layout rule is re-implemented. The pipeline sees the visual tokens only; a row's
newline is kept when at least one token of that grid row is kept (a budget of all tokens keeps
all of them) and it does not count against the budget; the in-LLM site applies the same rule.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..contract import Requirements, VisualTokens, grid_positions, normalize_layer
from . import capture
from .base import Encoded, UnsupportedModel
from .patch_grid import PatchGridAdapter
from .sequence import pad_flat


def _tower_layers(need: Requirements, feature_layer: int, num_layers: int) -> list[int]:
    layers = set(need.layers) | set(need.cls_token) | {normalize_layer(feature_layer, num_layers)}
    return sorted(layers)


class LlavaAdapter(PatchGridAdapter):
    family = "llava"
    llm_site = True
    downsample = True
    visual_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != "default":
            raise UnsupportedModel(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} keeps the [CLS] "
                "as an LLM token; tokenprune supports 'default' (patch tokens only)"
            )
        if not isinstance(cfg.vision_feature_layer, int):
            raise UnsupportedModel(
                f"vision_feature_layer={cfg.vision_feature_layer} concatenates several layers; "
                "tokenprune supports one feature layer"
            )

    def tower_features(self, inputs: dict[str, Any], need: Requirements,
                       **extra: Any) -> tuple[Any, dict[int, Tensor], dict[int, Tensor]]:
        """The model's own ``get_image_features`` on ``inputs["pixel_values"]`` asked for the hidden
        states the pipeline reads: its output (``pooler_output``, the per-image LLM features), the
        patch features ``{layer: (C, M, Dv)}`` of ``need.layers`` ([CLS] dropped) and each crop's
        [CLS] state ``{layer: (C, Dv)}`` of ``need.cls_token``. ``extra`` goes to
        ``get_image_features``."""
        cfg = self.model.config
        layers = _tower_layers(need, cfg.vision_feature_layer, self.num_layers)
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy="default",
            output_hidden_states=layers,
            return_dict=True,
            **extra,
        )
        feats = {li: out.hidden_states[li][:, 1:] for li in (need.layers or layers)}  # (C, M, Dv)
        cls = {li: out.hidden_states[li][:, 0] for li in need.cls_token}  # (C, Dv) each crop's [CLS]
        return out, feats, cls

    def encode(self, inputs: dict[str, Any], need: Requirements, recorder: capture.Recorder) -> Encoded:
        out, feats, cls = self.tower_features(inputs, need)
        own = torch.stack(list(out.pooler_output))  # (N, M, D)
        N, M, _ = own.shape
        patches = next(iter(feats.values())).shape[1]
        if patches != M:
            raise UnsupportedModel(
                f"{type(self.model).__name__} feeds its LLM {M} features per image, but its tower makes {patches} "
                "patch tokens: the model changes LLaVA's features (pooling, merging), so the LLaVA-1.5 adapter "
                "cannot map them; register an adapter for this class (docs/adapters.md)")
        side = math.isqrt(M)
        tokens = VisualTokens(
            layers=feats,
            num_layers=self.num_layers,
            positions=grid_positions(side, M // side, N, own.device) if side * side == M else None,
            project=self.project,
            cls_token=cls,
            **self.patch_signals(need, recorder),
        )
        return Encoded(tokens, own, torch.full((N,), M, dtype=torch.long, device=own.device))

    def placeholders_per_image(self, inputs: dict[str, Any]) -> int:
        """Patches per image at the size the processor gave (a tower's ``image_size`` is the size
        it was pretrained at: DINOv2 says 518 and interpolates its positions to 336 px inputs)."""
        return math.prod(self._patch_grid(inputs))

    def _patch_grid(self, inputs: dict[str, Any]) -> tuple[int, int]:
        p = self.model.config.vision_config.patch_size
        H, W = inputs["pixel_values"].shape[-2:]
        return H // p, W // p

    def encode_downsampled(self, inputs: dict[str, Any], need: Requirements, recorder: capture.Recorder,
                           tokens: int) -> Encoded:
        """The image resized to ``s x s`` patches, ``s = floor(sqrt(tokens))`` (bicubic with
        antialiasing), through the tower with interpolated position embeddings. The ``s**2``
        tokens fill the image's first ``s**2`` placeholder slots; the other slots are dropped, so
        the kept tokens keep their slots' original positions."""
        import torch.nn.functional as F

        v = self.model.config.vision_config
        P = self.placeholders_per_image(inputs)
        side = max(1, min(math.isqrt(tokens), *self._patch_grid(inputs)))
        pix = inputs["pixel_values"]
        small = F.interpolate(pix.float(), size=(side * v.patch_size,) * 2, mode="bicubic", antialias=True,
                              align_corners=False).to(pix.dtype)
        out, feats, cls = self.tower_features({"pixel_values": small}, need, interpolate_pos_encoding=True)
        own_small = torch.stack(list(out.pooler_output))  # (N, s*s, D)
        N, M, D = own_small.shape
        own = own_small.new_zeros(N, P, D)
        own[:, :M] = own_small
        slot_token = torch.arange(P, device=own.device).expand(N, P)
        slot_token = torch.where(slot_token < M, slot_token, -1)
        tokens_ = VisualTokens(
            layers=feats, num_layers=self.num_layers, positions=grid_positions(side, side, N, own.device),
            project=self.project, cls_token=cls, **self.patch_signals(need, recorder),
        )
        return Encoded(tokens_, own, torch.full((N,), P, dtype=torch.long, device=own.device), slot_token)


class LlavaNextAdapter(LlavaAdapter):
    family = "llava-next"
    llm_site = True  # a newline stays inside the LLM when a token of its grid row does
    downsample = False  # anyres crops: resize with the processor's image_grid_pinpoints instead
    cls_token = False  # one [CLS] per crop, none per image
    #: the modeling module whose anyres helpers (crop counts, grid shapes) the family's model uses
    modeling = "transformers.models.llava_next.modeling_llava_next"

    def encode(self, inputs: dict[str, Any], need: Requirements, recorder: capture.Recorder) -> Encoded:
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes next to pixel_values (the processor returns both)")
        out, feats, _ = self.tower_features(inputs, need, image_sizes=sizes)  # per-crop [CLS]: refused up front
        packed = list(out.pooler_output)  # per image (P_i, D), newline slots included
        slots = torch.tensor([p.shape[0] for p in packed], device=packed[0].device)  # (N,)
        own, _ = pad_flat(torch.cat(packed), slots)  # (N, P, D)
        C, Mc, _ = next(iter(feats.values())).shape  # crops of all images, 576 patches each
        crops = self._crops_per_image(sizes)  # (N,)
        slot_flat = self._slot_patches(sizes, crops, C * Mc, slots)  # (N, P) crop * Mc + patch, -1 newline
        slot_valid = torch.arange(slot_flat.shape[1], device=slot_flat.device) < slots.unsqueeze(1)
        is_token = slot_valid & (slot_flat >= 0)  # (N, P)
        slot_token = torch.where(is_token, is_token.long().cumsum(1) - 1, -1)  # (N, P)
        token_flat, token_valid = pad_flat(slot_flat[is_token], is_token.sum(1))  # (N, M) crop * Mc + patch
        newline, rows = _grid_rows(slot_flat, slot_valid, is_token, crops, Mc)

        def per_token(x: Tensor) -> Tensor:  # (C, Mc, ...) -> (N, M, ...)
            return _at_tokens(x, token_flat, token_valid)

        def attention(signal: str, layers: frozenset[int]) -> dict[int, Tensor]:  # (C, H, 1 + Mc) -> (N, H, M)
            return {li: per_token(recorder.take(li, signal)[0][:, :, 1:].transpose(1, 2)).transpose(1, 2)
                    for li in layers}

        tokens = VisualTokens(
            layers={li: per_token(h) for li, h in feats.items()},
            num_layers=self.num_layers,
            mask=token_valid,
            positions=self._token_positions(token_flat, sizes, crops, Mc),
            cls_attention=attention("cls", need.cls_attention),
            received_attention=attention("received", need.received_attention),
            attention_keys={li: per_token(recorder.take(li, "keys")[0][:, 1:]) for li in need.attention_keys},
            project=self.project,
        )
        return Encoded(tokens, own, slots, slot_token, layout={"rows": rows, "newline": newline})

    def _slot_patches(self, sizes: Tensor, crops: Tensor, patches: int, slots: Tensor) -> Tensor:
        """``(N, P)`` the global patch (``crop * Mc + patch``) behind each packed slot, ``-1`` for a
        newline: an index tensor pushed through the model's own ``pack_image_features``, so no
        layout rule is re-implemented."""
        device = slots.device
        flat_ids = torch.arange(patches, dtype=torch.float64, device=device).view(int(crops.sum()), -1, 1)
        mapped, _ = self.model.model.pack_image_features(
            list(torch.split(flat_ids, crops.tolist())), sizes, "default",
            image_newline=torch.tensor([-1.0], dtype=torch.float64, device=device))
        return pad_flat(torch.cat(mapped).squeeze(-1).round().long(), slots)[0]

    def _token_positions(self, token_flat: Tensor, sizes: Tensor, crops: Tensor, Mc: int) -> Tensor:
        """``(N, M, 2)`` each token's (row, column) on its image's full-resolution patch grid; a base
        crop token sits at its patch scaled to the grid."""
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        device = token_flat.device
        grids = torch.tensor([self._grid_shape(s) for s in sizes.tolist()], device=device)  # (N, 2) crops high x wide
        crop_start = (crops.cumsum(0) - crops).to(device)  # (N,)
        local = token_flat % Mc
        pr, pc = torch.div(local, side, rounding_mode="floor"), local % side
        lc = torch.div(token_flat, Mc, rounding_mode="floor") - crop_start.unsqueeze(1)  # 0 = base crop
        gh, gw = grids[:, :1], grids[:, 1:]
        base = lc == 0
        r = torch.where(base, pr * gh, torch.div(lc - 1, gw, rounding_mode="floor") * side + pr).float()
        c = torch.where(base, pc * gw, ((lc - 1) % gw) * side + pc).float()
        return torch.stack([r, c], -1)

    def _crops_per_image(self, sizes: Tensor) -> Tensor:
        """``(N,)`` crops of each anyres image (base crop included), by the model's own rule."""
        import importlib

        cfg = self.model.config
        count = importlib.import_module(self.modeling).image_size_to_num_patches
        return torch.tensor([count(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                   patch_size=cfg.vision_config.image_size) for s in sizes.tolist()])

    def _grid_shape(self, size: list[int]) -> tuple[int, int]:
        """Crops high x wide of an anyres image's grid (base crop not counted), by the model's own rule."""
        import importlib

        cfg = self.model.config
        shape = importlib.import_module(self.modeling).get_anyres_image_grid_shape
        return shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)


def _at_tokens(x: Tensor, token_flat: Tensor, token_valid: Tensor) -> Tensor:
    """``x`` ``(C, Mc, ...)`` per crop and patch, read at each item's tokens ``token_flat`` ``(N, M)``
    (``crop * Mc + patch``): ``(N, M, ...)``, zero on padding."""
    N = token_flat.shape[0]
    flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    out = flat.index_select(0, token_flat.flatten()).view(N, -1, *x.shape[2:])
    return out.masked_fill(~token_valid.view(N, -1, *([1] * (x.dim() - 2))), 0)


def _grid_rows(slot_flat: Tensor, slot_valid: Tensor, is_token: Tensor, crops: Tensor, Mc: int) -> tuple[Tensor, Tensor]:
    """The ``(N, P)`` newline slots and each slot's grid row (newlines strictly before it; ``-1``
    for the base crop and padding), which ``slot_keep`` and the in-LLM site read."""
    newline = slot_valid & (slot_flat < 0)
    row = newline.long().cumsum(1) - newline.long()
    crop_start = (crops.cumsum(0) - crops).to(slot_flat.device)  # (N,)
    local_crop = torch.div(slot_flat.clamp_min(0), Mc, rounding_mode="floor") - crop_start.unsqueeze(1)
    in_base = is_token & (local_crop == 0) & (crops.to(slot_flat.device).unsqueeze(1) > 1)
    return newline, torch.where(in_base | ~slot_valid, -1, row)
