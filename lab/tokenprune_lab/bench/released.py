"""The released selection rules, written out from the authors' released code's behaviour and
structure (the same tensor operations in the same order, batch loops where the released code has
them), never copied from it. ``tokenprune bench stages`` times each preset's "as released" mode
against them on the same inputs and reports the kept-set overlap (1.0 = the same tokens).

Each function takes the inputs of a batch and returns ``(B, M)`` bool kept masks (for VisionZip,
the kept patch tokens; its [CLS] slot is not a patch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

import tokenprune as tp


def visionzip(cls_attention: Tensor, keys: Tensor, h: Tensor, R: int, project: Callable[[Tensor], Tensor],
              dominant_ratio: float = 0.84375) -> Tensor:
    """VisionZip, batched as released: ``cls_attention`` ``(B, H, M)`` [CLS]-to-patch attention,
    ``keys`` ``(B, M, Dk)`` layer -2 keys averaged over heads, ``h`` ``(B, M, Dv)`` layer -2
    features. ``[CLS]`` + the top ``floor(ratio R) - 1`` patches are dominant; ``R - floor(ratio R)``
    contextual targets, each the sum of its own and its members' mean features, projected (the
    presets hand the LLM projected features; the dominant tokens' projections are the model's
    own, given to both). The features are computed and discarded: the mask is returned."""
    B, H, M = cls_attention.shape
    dominant = math.floor(dominant_ratio * R + 1e-6)
    contextual = R - dominant
    top = cls_attention.sum(1).topk(dominant - 1, dim=1).indices  # (B, d-1)
    keep = torch.zeros(B, M, dtype=torch.bool, device=keys.device).scatter_(1, top, True)
    rest = ~keep  # (B, M) the filtered patches
    metric = keys[rest].view(B, M - dominant + 1, -1)  # (B, n, Dk) in index order
    metric = metric / metric.norm(dim=-1, keepdim=True)
    n = metric.shape[1]
    step = max(1, n // contextual)
    targets = torch.arange(0, n, step, device=keys.device)[:contextual]  # (c,) ordinals
    rest_index = rest.nonzero()[:, 1].view(B, n)  # (B, n) token index of each filtered patch
    is_target = torch.zeros(n, dtype=torch.bool, device=keys.device)
    is_target[targets] = True
    sim = torch.bmm(metric[:, ~is_target], metric[:, targets].transpose(1, 2))  # (B, n - c, c)
    assign = torch.zeros_like(sim).scatter_(2, sim.argmax(2, keepdim=True), 1.0)
    counts = assign.sum(1).clamp(min=1).unsqueeze(-1)  # (B, c, 1)
    filtered = h[rest].view(B, n, -1)
    aggregated = torch.bmm(assign.transpose(1, 2), filtered[:, ~is_target]) / counts  # (B, c, Dv)
    project(filtered[:, targets] + aggregated)  # (B, c, D) the contextual tokens the LLM receives
    return keep.scatter(1, rest_index[:, targets], True)


def divprune(x: Tensor, R: int) -> Tensor:
    """DivPrune as released, one image at a time: the cosine-distance matrix, then each pick
    re-reduces the distances from every selected row (first pick: the largest distance to the
    nearest other token)."""
    B, M, _ = x.shape
    out = torch.zeros(B, M, dtype=torch.bool, device=x.device)
    for b in range(B):  # the released code runs one image per call
        u = x[b] / x[b].norm(dim=-1, keepdim=True)
        dist = 1 - u @ u.T  # (M, M)
        selected: list[int] = []
        for i in range(R):
            if i == 0:
                scores = dist.topk(2, dim=0, largest=False).values[1]  # (M,) distance to the nearest other
            else:
                scores = dist[selected].min(0).values  # (M,)
                scores[selected] = -1.0
            selected.append(int(scores.argmax()))
        out[b, selected] = True
    return out


def cdpruner(x: Tensor, relevance: Tensor, R: int) -> Tensor:
    """CDPruner as released, batched: relevance negated and min-max normalised over the batch,
    linear quality, the kernel ``q_i S_ij q_j`` materialised, then the fast greedy MAP with
    ``(T, B, M)`` Cholesky rows."""
    B, M, _ = x.shape
    u = x / x.norm(dim=-1, keepdim=True)
    sim = u @ u.transpose(1, 2)  # (B, M, M)
    r = -relevance
    r = (r - r.min() + 1e-6) / (r.max() - r.min())  # over the whole batch, as released
    kernel = r.unsqueeze(2) * sim * r.unsqueeze(1)  # (B, M, M)
    rows = torch.arange(B, device=x.device)
    cis = torch.zeros(R, B, M, device=x.device, dtype=kernel.dtype)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, M)
    out = torch.zeros(B, M, dtype=torch.bool, device=x.device)
    for i in range(R):
        j = di2s.argmax(-1)  # (B,)
        out[rows, j] = True
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / di2s[rows, j].sqrt().unsqueeze(-1)
        cis[i] = eis
        di2s -= eis.square()
        di2s[rows, j] = -torch.inf
    return out


def vispruner(cls_attention: Tensor, h: Tensor, R: int, important_ratio: float = 0.5, per_round: int = 8) -> Tensor:
    """VisPruner as released, batched (ties to the lower index, which the released argsort
    leaves unspecified): the top ``important_ratio R`` by [CLS] attention (mean over heads), then
    rounds over the rest in attention order: the even and odd ordinals form two halves, the
    ``per_round`` tokens of the first half most similar to the second are dropped, the first
    half's survivors (by descending similarity) are followed by the second half; each round
    gathers its tokens from the normalised features and recomputes the half-by-half product."""
    B, M, _ = h.shape
    important = int(R * important_ratio)
    target = R - important
    order = cls_attention.float().mean(1).argsort(dim=-1, descending=True, stable=True)  # (B, M)
    keep, rest = order[:, :important], order[:, important:]
    u = h / h.norm(dim=-1, keepdim=True)  # (B, M, C)
    rows = torch.arange(B, device=h.device).unsqueeze(-1)
    while True:
        n = rest.shape[1]
        r = min(per_round, n - target)
        if r <= 0:
            break
        tokens = u[rows.expand(-1, n), rest]  # (B, n, C)
        scores = (tokens[:, ::2] @ tokens[:, 1::2].transpose(-1, -2)).max(dim=-1).values  # (B, n/2)
        distinct = scores.argsort(dim=-1, descending=True, stable=True)[:, r:]
        rest = torch.cat([rest[:, ::2][rows.expand(-1, distinct.shape[1]), distinct], rest[:, 1::2]], dim=-1)
    out = torch.zeros(B, M, dtype=torch.bool, device=h.device)
    return out.scatter_(1, torch.cat([keep, rest], dim=-1), True)


def dart_llm(hidden: Tensor, key_l1: Tensor, index: Tensor, text_hidden: Tensor, text_key_l1: Tensor,
             text_index: Tensor, R: int, image_pivots: int = 4, text_pivots: int = 4) -> Tensor:
    """DART in the LLM as released, one prompt at a time: 4 + 4 pivots by the L1 key norm, visited
    in ``set`` order of their sequence indices, each taking the ``R // 8`` remaining visual tokens
    least cosine-similar to it; the image pivots are kept. ``hidden`` / ``text_hidden`` are the
    normalised hidden states (the LLM's final norm applied)."""
    B, M, _ = hidden.shape
    topk = R // (image_pivots + text_pivots)
    out = torch.zeros(B, M, dtype=torch.bool, device=hidden.device)
    for b in range(B):
        img = key_l1[b].topk(image_pivots).indices.tolist()
        txt = text_key_l1[b].topk(text_pivots).indices.tolist()
        by_seq = {int(index[b, i]): hidden[b, i] for i in img} | {int(text_index[b, t]): text_hidden[b, t] for t in txt}
        valid = set(range(M)) - set(img)
        kept = set(img)
        for item in list(set([int(index[b, i]) for i in img] + [int(text_index[b, t]) for t in txt])):
            cand = list(valid)
            cos = -torch.nn.functional.cosine_similarity(by_seq[item], hidden[b, cand], dim=-1)
            take = [cand[i] for i in cos.topk(topk).indices.tolist()]
            kept.update(take)
            valid.difference_update(take)
        out[b, sorted(kept)] = True
    return out


# -- the side-by-side run --------------------------------------------------------------------------
#: preset (relative to the specs directory) -> the released rule it reproduces
PRESETS = {
    "visionzip": "methods/visionzip-released.toml",
    "divprune": "variants/divprune.toml",
    "cdpruner": "methods/cdpruner-released.toml",
    "vispruner": "methods/vispruner.toml",
    "dart-llm": "methods/dart-llm-released.toml",
}


@dataclass
class ReleasedRow:
    device: str
    shape: str
    M: int
    B: int
    method: str
    budget: int
    kept: int  # tokens the preset keeps per image
    released_kept: int  # tokens the released rule keeps per image ([CLS] not counted)
    preset_ms: float
    released_ms: float
    overlap: float  # share of the released rule's kept tokens that the preset keeps (mean over images)
    clasp_ms: float = 0.0

    @property
    def speedup(self) -> float:
        """How many times faster the preset is than the released rule (>= 1: at least as fast)."""
        return self.released_ms / self.preset_ms

    def as_dict(self) -> dict:
        return asdict(self) | {"speedup": self.speedup}


def bench_inputs(M: int, L: int, Dv: int, D: int, B: int, device: str, dtype: torch.dtype) -> tp.VisualTokens:
    from .stages import _method_inputs

    base = _method_inputs(M, L, Dv, D, B, device, dtype)
    g = torch.Generator(device=device).manual_seed(4)
    return dataclasses.replace(base, cls_token={L - 1: torch.randn(B, Dv, generator=g, device=device, dtype=dtype)})


def overlap(ours: Tensor, ref: Tensor) -> float:
    both = (ours & ref).sum(1).double() / ref.sum(1).clamp_min(1).double()  # (B,)
    return float(both.mean())


def pre_llm_pair(name: str, spec: tp.PipelineSpec, tokens: tp.VisualTokens, R: int) -> tuple[Callable, Callable]:
    """The preset's call and the released rule's call on the same inputs; each returns ``(B, M)`` kept."""
    pipe = tp.Pipeline(spec)
    routing = pipe.route(tokens.prompts)
    L = tokens.num_layers
    B, M = tokens.shape

    def preset() -> Tensor:
        sel = pipe(tokens, budget=R, routing=routing)
        return torch.zeros(B, M + 1, dtype=torch.bool, device=sel.indices.device).scatter_(
            1, sel.indices.masked_fill(sel.indices < 0, M), True)[:, :M]

    x = tokens.projected  # the decoder-space features the diversity presets read
    cls = tokens.cls_attention[L - 1]
    released: dict[str, Callable[[], Tensor]] = {
        "visionzip": lambda: visionzip(cls, tokens.key_features(-2), tokens.layer(-2), R, tokens.project),
        "divprune": lambda: divprune(x, R),
        "cdpruner": lambda: cdpruner(x, _relevance(x, tokens.text_embedding), R),
        "vispruner": lambda: vispruner(cls, tokens.layer(-2), R),
    }
    return preset, released[name]


def _relevance(x: Tensor, text: Tensor) -> Tensor:
    """Cosine between each token and the prompt embedding: ``(B, M)``."""
    return torch.einsum("bmd,bd->bm", x / x.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True))


def _dart(spec: tp.PipelineSpec, M: int, D: int, B: int, R: int, device: str, dtype: torch.dtype):
    from .stages import llm_request

    req = llm_request(spec, M, D, B, R, device, dtype)
    pruner = spec.llm

    def preset() -> Tensor:
        with torch.no_grad():
            return pruner.select(req)

    def released() -> Tensor:
        with torch.no_grad():
            return dart_llm(req.norm(req.hidden), req.key_norms, req.index, req.norm(req.text_hidden),
                            req.text_key_norms, req.text_index, R, pruner.image_pivots, pruner.text_pivots)

    return preset, released


def run(specs_dir: Path, devices: list[str], shapes: list[str], batches: list[int], budget: int,
        repeats: int = 5, dtype: torch.dtype = torch.float32,
        progress: Callable[[str], None] | None = None,
        on_group: Callable[[list[ReleasedRow]], None] | None = None) -> list[ReleasedRow]:
    """Each preset's "as released" mode beside the released rule, timed in the same loop on the
    same inputs, with CLASP's pipeline time in every row for the ratios."""
    from .stages import _time, grid

    specs = {name: tp.load_spec(Path(specs_dir) / path) for name, path in PRESETS.items()}
    clasp = tp.Pipeline(tp.load_spec(Path(specs_dir) / "clasp.toml"))
    rows: list[ReleasedRow] = []
    for device, shape, (M, L, Dv, D), B in grid(devices, shapes, batches):
        tokens = bench_inputs(M, L, Dv, D, B, device, dtype)
        routing = clasp.route(tokens.prompts)
        clasp_ms = _time(lambda: clasp(tokens, budget=budget, routing=routing), device, repeats)
        group = []
        for name, spec in specs.items():
            if progress:
                progress(f"{device} {shape} B={B} {name} (preset and released rule)")
            if name == "dart-llm":
                preset, released = _dart(spec, M, D, B, budget, device, dtype)
            else:
                preset, released = pre_llm_pair(name, spec, tokens, budget)
            ours, ref = preset(), released()
            p_ms = _time(preset, device, repeats)
            r_ms = _time(released, device, max(1, repeats // 2) if B > 1 else repeats)
            group.append(ReleasedRow(device, shape, M, B, name, budget, int(ours.sum(1).max()),
                                     int(ref.sum(1).max()), p_ms, r_ms, overlap(ours, ref), clasp_ms))
        rows += group
        if on_group:
            on_group(group)
        tokens = None
    return rows


def table_head() -> list[str]:
    head = ["device", "shape", "B", "method", "R", "kept", "released kept", "overlap", "preset ms", "released ms",
            "released / preset", "CLASP / released"]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def table_line(r: ReleasedRow) -> str:
    return "| " + " | ".join([
        r.device, r.shape, str(r.B), r.method, str(r.budget), str(r.kept), str(r.released_kept), f"{r.overlap:.3f}",
        f"{r.preset_ms:.2f}", f"{r.released_ms:.2f}", f"{r.speedup:.2f}x", f"{r.clasp_ms / r.released_ms:.2f}x",
    ]) + " |"
