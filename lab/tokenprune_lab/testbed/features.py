"""Cached tower features for a fixed pool of training scenes.

The v2 tower is frozen, so its output for a training scene never changes: computing it once per
scene makes a training step cost only the projector and the decoder. The pool is the train
split's scenes ``POOL_BASE + i`` drawn with 1 to 7 objects (so a curriculum can pick the easy
ones), and the cache holds, per scene, the hidden state the projector reads
(``vision_feature_layer``), [CLS] dropped, in float16: ``(576, 384)``, 442 KB a scene.

The cache is a folder of chunk files (``chunk-00000.pt`` ... of :data:`CHUNK` scenes each), written
atomically one chunk at a time, so an interrupted build resumes where it stopped and two runs never
read half a file. It is a function of the tower weights, the layer and the pool indices, all of
which are recorded in ``pool.json`` and checked on reuse.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from .scenes import Scene, make_scene
from .splits import SPLITS
from .splits import scene as split_scene

__all__ = ["POOL_BASE", "POOL_OBJECTS", "CHUNK", "pool_scene", "FeaturePool"]

#: Pool scenes are train-split indices from here on (the v1 recipe never drew them).
POOL_BASE = 2 * 10**7
#: Object counts of pool scenes: down to 1, so a curriculum can start easy.
POOL_OBJECTS = (1, 7)
CHUNK = 64


def pool_scene(i: int) -> Scene:
    """Pool scene ``i`` (deterministic, drawn like the train split but with 1-7 objects)."""
    s = SPLITS["train"]
    return make_scene(s.seed, POOL_BASE + i, num_objects=POOL_OBJECTS, small=s.small, small_text=s.small_text)


class FeaturePool:
    """``features(indices) -> (B, M, Dv)`` float32 for the first ``size`` scenes of ``source``
    (``"pool"``: :func:`pool_scene`; or a split name, e.g. ``"val"`` for a held-out curve),
    computed once and cached."""

    def __init__(self, directory: str | Path, model, processor, size: int, source: str = "pool",
                 chunk: int = CHUNK):
        self.dir = Path(directory)
        self.model, self.processor, self.size = model, processor, size
        self.layer = model.config.vision_feature_layer
        self.scene = pool_scene if source == "pool" else partial(split_scene, source)
        self.chunk = chunk
        self.meta = {"source": source, "layer": self.layer, "chunk": chunk, "tower": _fingerprint(model.model.vision_tower)}
        if source == "pool":
            self.meta.update(pool_base=POOL_BASE, objects=list(POOL_OBJECTS))
        self._chunks: dict[int, torch.Tensor] = {}

    def build(self, log: Callable[[str], None] = print) -> None:
        """Compute every missing chunk (resumable)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_file = self.dir / "pool.json"
        if meta_file.exists():
            old = json.loads(meta_file.read_text())
            if old != self.meta:
                raise ValueError(f"{self.dir} holds features of another tower or layer ({old}); "
                                 f"delete it or choose another folder")
        else:
            meta_file.write_text(json.dumps(self.meta, indent=2))
        chunks = range((self.size + self.chunk - 1) // self.chunk)
        todo = [c for c in chunks if not self._file(c).exists()]
        t0 = time.perf_counter()
        for n, c in enumerate(todo):
            feats = self._compute(range(c * self.chunk, (c + 1) * self.chunk))
            tmp = self._file(c).with_suffix(".part")
            torch.save(feats, tmp)
            os.replace(tmp, self._file(c))
            rate = (time.perf_counter() - t0) / (n + 1)
            log(f"features ({self.meta['source']}): chunk {c + 1}/{len(chunks)} ({rate / self.chunk:.2f} s per scene, "
                f"{rate * (len(todo) - n - 1) / 60:.1f} min left)")

    def _file(self, chunk: int) -> Path:
        return self.dir / f"chunk-{chunk:05d}.pt"

    @torch.no_grad()
    def _compute(self, indices: range) -> torch.Tensor:
        out = []
        for start in range(indices.start, indices.stop, 16):
            images = [self.scene(i).image for i in range(start, min(start + 16, indices.stop))]
            pv = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            hidden = self.model.model.vision_tower(pv, output_hidden_states=True).hidden_states[self.layer]
            out.append(hidden[:, 1:].to(torch.float16))  # (b, M, Dv), [CLS] dropped
        return torch.cat(out)

    def features(self, indices: list[int]) -> torch.Tensor:
        """``(B, M, Dv)`` float32 features of pool scenes ``indices``."""
        rows = []
        for i in indices:
            if not 0 <= i < self.size:
                raise IndexError(f"pool scene {i} is outside the pool of {self.size}")
            c = i // self.chunk
            if c not in self._chunks:
                if not self._file(c).exists():
                    raise FileNotFoundError(f"{self._file(c)} is missing: build the pool first")
                self._chunks[c] = torch.load(self._file(c), weights_only=True)
            rows.append(self._chunks[c][i % self.chunk])
        return torch.stack(rows).float()


def _fingerprint(tower: torch.nn.Module) -> str:
    """A short digest of the tower's weights (a cache of another tower is refused)."""
    import hashlib

    h = hashlib.sha1()
    for name, p in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:64].numpy().tobytes())
    return h.hexdigest()[:16]
