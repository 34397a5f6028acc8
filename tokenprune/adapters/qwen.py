"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: images and videos.

The towers have no [CLS]; every LLM token is one 2x2 merge unit of four consecutive patches.
The pipeline sees one row per image and one row per video (all of a video's frames together, so
selection removes temporal as well as spatial redundancy), whose token features are the four
patches' encoder features side by side, ``(N, M, 4*Dv)``: fusion is a weighted sum, so it runs at
patch level, and the projector is the model's own merger applied to those patches. Received
attention is averaged over the unit's patches (the towers attend within a frame). Images and
videos go through the tower in one call (videos are images with more temporal patches).

- A video token's grid position is ``(t * h + row, col)``: its frames stacked along the rows.
- Qwen3-VL's processor separates a video's frames by timestamp text; that text is never pruned.

- Qwen2.5-VL runs its blocks in window order; hidden states and attention are un-permuted with
  the tower's own ``get_vision_window_index``.
- Qwen3-VL also feeds deepstack features into the first LLM layers; they are pruned with the
  same indices.
- Positions are M-RoPE (t, h, w) from the model's ``get_rope_index`` on the *unpruned*
  sequence, gathered at the kept columns.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from ..contract import Requirements, VisualTokens
from . import capture
from .base import Adapter, Encoded, Entry, UnsupportedInput
from .sequence import pad_flat, take

#: per modality: its pixels and grid inputs
_INPUTS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


class QwenAdapter(Adapter):
    family = "qwen2-vl"
    has_cls = False
    llm_site = True
    modalities = ("image", "video")
    pixel_inputs = ("pixel_values", "pixel_values_videos")
    visual_inputs = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.visual: Any = self.model.model.visual
        self.unit = self.visual.spatial_merge_size ** 2

    @property
    def num_layers(self) -> int:
        return len(self.visual.blocks)

    def attention_module(self, layer: int) -> nn.Module:
        return self.visual.blocks[layer - 1].attn

    def _project(self, x: Tensor) -> Tensor:  # (N, M, unit*Dv) -> (N, M, D)
        N, M, _ = x.shape
        return self.visual.merger(x.reshape(N * M * self.unit, -1)).view(N, M, -1)

    def _order(self, grid: Tensor) -> Tensor | None:
        """Token-order -> tower-order index over merge units (Qwen2.5-VL's windows), or None."""
        return None

    def check_inputs(self, inputs: dict[str, Any]) -> None:
        super().check_inputs(inputs)
        for pixels, grid in _INPUTS.values():
            if (inputs.get(pixels) is None) != (inputs.get(grid) is None):
                raise UnsupportedInput(f"Qwen-VL takes {pixels} and {grid} together (the processor returns both); "
                                       f"this call gives only {pixels if inputs.get(pixels) is not None else grid}")
        if inputs.get("mm_token_type_ids") is None and inputs.get("position_ids") is None:
            raise UnsupportedInput(
                "Qwen-VL needs mm_token_type_ids to compute M-RoPE positions; pass what the processor "
                "returns (or mm_token_type_ids: 1 at image placeholders, 2 at video placeholders, 0 elsewhere)"
            )
        for modality, token in zip(self.modalities, self.placeholder_ids, strict=True):
            self._check_grid(inputs, modality, token)

    def _check_grid(self, inputs: dict[str, Any], modality: str, token: int) -> None:
        """Before the tower runs: ``modality``'s pixels hold the patch rows its grid says
        (``t * h * w`` per item), and each prompt's placeholders are whole items' token counts
        (``t * h * w / merge**2``), so that no item is split between rows or modalities."""
        pixels, grid_name = _INPUTS[modality]
        grid = inputs.get(grid_name)
        if grid is None:
            return
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise UnsupportedInput(f"{grid_name} must be (items, 3) rows of (t, h, w), got shape {tuple(grid.shape)}")
        patches = grid.prod(-1)  # (N,) patch rows per item
        rows = int(inputs[pixels].shape[0])
        if rows != int(patches.sum()):
            raise UnsupportedInput(
                f"{pixels} holds {rows} patch rows, but {grid_name} gives {int(patches.sum())} "
                f"(t*h*w per {modality}: {patches.tolist()}): pass {pixels} and {grid_name} as the processor "
                f"returns them, each {modality}'s patches in {pixels} and no other modality's")
        per_item = patches // self.unit  # (N,) placeholder tokens per item
        per_row = (inputs["input_ids"] == token).sum(1)  # (B,)
        ends = per_row.cumsum(0)  # (B,) placeholders in rows 0..b
        bounds = torch.cat([per_item.new_zeros(1), per_item.cumsum(0)]).to(ends.device)  # item boundaries
        split = ~torch.isin(ends, bounds)  # (B,) a row that ends inside an item
        if bool(split.any()):
            b = int(split.nonzero()[0])
            raise UnsupportedInput(
                f"input_ids row {b} holds {int(per_row[b])} {modality} placeholder tokens, which do not end on a "
                f"whole {modality} ({modality}s give {per_item.tolist()} tokens each, in order; rows 0..{b} hold "
                f"{int(ends[b])}): build input_ids with the model's processor, which expands each {modality} "
                f"placeholder to its token count")
        at = int(ends[-1]) if ends.numel() else 0  # every row's placeholders
        per_item = per_item.tolist()
        if at != sum(per_item):
            raise UnsupportedInput(
                f"input_ids hold {at} {modality} placeholder tokens, but {grid_name} gives {sum(per_item)} "
                f"({per_item} per {modality}): build input_ids with the model's processor")

    def encode(self, inputs: dict[str, Any], need: Requirements, recorder: capture.Recorder) -> Encoded:
        given = [m for m, (pixels, _) in _INPUTS.items() if inputs.get(pixels) is not None]
        grids = {m: inputs[_INPUTS[m][1]] for m in given}
        grid = torch.cat(list(grids.values()))  # (N, 3) images, then videos
        pixels = torch.cat([inputs[_INPUTS[m][0]].to(self.visual.dtype) for m in given])
        L = self.num_layers
        layers = sorted(need.layers) or [L]
        out = self.model.model.get_image_features(pixels, grid, output_hidden_states=layers, return_dict=True)
        pooled = list(out.pooler_output)  # per image (M_i, D)
        counts = torch.tensor([p.shape[0] for p in pooled], device=pooled[0].device)  # (N,)
        own, valid = pad_flat(torch.cat(pooled), counts)  # (N, M, D)
        N, M, _ = own.shape
        order = self._order(grid)

        def units(x: Tensor) -> Tensor:  # (sum patches, ...) tower order -> (sum tokens, unit, ...) token order
            x = x.reshape(-1, self.unit, *x.shape[1:])
            return x if order is None else x.index_select(0, order)

        feats = {li: pad_flat(units(out.hidden_states[li]).flatten(1), counts)[0] for li in (need.layers or layers)}
        received = {}
        for li in need.received_attention:
            chunks = recorder.take(li, "received")  # per kernel call (1, H, n)
            a = torch.cat([c[0] for c in chunks], -1).transpose(0, 1)  # (sum patches, H)
            a = units(a).mean(1)  # (sum tokens, H)
            received[li] = pad_flat(a, counts)[0].transpose(1, 2)  # (N, H, M)

        keys = {}
        for li in need.attention_keys:
            k = torch.cat([c[0] for c in recorder.take(li, "keys")], 0)  # (sum patches, Dh)
            keys[li] = pad_flat(units(k).flatten(1), counts)[0]  # (N, M, unit*Dh)

        # (row, col) of each token in its image's merged grid; a video's frames stacked along the rows
        side = self.visual.spatial_merge_size
        w = (grid[:, 2] // side).to(own.device)  # (N,)
        local = torch.arange(M, device=own.device).expand(N, M)
        pos = torch.stack([torch.div(local, w.unsqueeze(1), rounding_mode="floor"), local % w.unsqueeze(1)], -1)
        tokens = VisualTokens(
            layers=feats, num_layers=L, mask=valid, positions=pos.float(),
            received_attention=received, attention_keys=keys, project=self._project,
        )
        deep = getattr(out, "deepstack_features", None) or []
        deepstack = [pad_flat(torch.cat(list(d)), counts)[0] for d in deep]
        videos = grids["video"].shape[0] if "video" in grids else 0
        return Encoded(tokens, own, counts, deepstack=deepstack, videos=videos, frames=grid[:, 0].to(own.device))

    def positions(self, ids: Tensor, mask: Tensor, inputs: dict[str, Any], entry: Entry) -> Tensor:
        given = inputs.get("position_ids")
        if given is not None:
            if given.dim() != 3:
                raise UnsupportedInput(
                    f"Qwen-VL position_ids must be (3, B, S) or (4, B, S) M-RoPE positions, got {tuple(given.shape)}"
                )
            return given[-3:]
        timing = {k: inputs[k] for k in ("second_per_grid_ts",) if inputs.get(k) is not None}  # Qwen2.5-VL video
        pos, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask, **timing,
        )
        return pos  # (3, B, S)

    def pruned_positions(self, pos: Tensor, src: Tensor, valid: Tensor, entry: Entry) -> Tensor:
        kept = take(pos, src, valid, 1)  # (3, B, S')
        if entry == "forward":
            return kept
        text = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)  # generate's text row
        return torch.cat([text.unsqueeze(0), kept], 0)  # (4, B, S')


class Qwen25Adapter(QwenAdapter):
    family = "qwen2.5-vl"

    def _order(self, grid: Tensor) -> Tensor:
        from transformers.vision_utils import get_vision_window_index

        v = self.visual
        win, _ = get_vision_window_index(grid, spatial_merge_size=v.spatial_merge_size,
                                         window_size=v.window_size, patch_size=v.patch_size)
        return torch.argsort(win.to(grid.device))


class Qwen3Adapter(QwenAdapter):
    family = "qwen3-vl"
    llm_injection_method = "_deepstack_process"

    @property
    def llm_injections(self) -> int:
        """Decoder layers ``0..n-1`` after which the LLM adds the deepstack features to the visual
        tokens. An in-LLM step at layer ``K <= n`` prunes layer ``K - 1``'s output before that
        layer's deepstack features are added; the later ones are added to the kept tokens only."""
        return len(self.model.config.vision_config.deepstack_visual_indexes)

    def encoder_output(self, features: Tensor, deepstack: list[Tensor], modality: str = "image") -> Any:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        return BaseModelOutputWithDeepstackFeatures(
            pooler_output=cast(Any, [features]), deepstack_features=cast(Any, [[d] for d in deepstack])  # lists, as the model reads
        )
