"""``tokenprune bench stages``: per-stage and end-to-end timings of the CLASP pipeline, side by
side with two references measured in the same run:

- **matmul**: the unavoidable matrix products alone (the redundancy product and the ``T``
  k-means similarity products CLASP actually ran), as bare ``torch.matmul`` calls of the same
  shapes; **bound** adds one bare multiply-add pass over each layer the fusion reads (its
  memory traffic);
- **naive**: the same pipeline written the obvious way: ``torch.stack`` of all ``L`` layers,
  a Python loop over the batch, and k-means with Python loops over clusters.

The model's projector is not timed: the decoder-space features are given precomputed.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

import tokenprune as tp
from tokenprune.spec import PipelineSpec

#: name -> (M, L, Dv, D)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "llava-1.5-7b": (576, 24, 1024, 4096),
    "llava-next-7b": (2880, 24, 1024, 4096),
}
STAGES = ("routing", "fusion", "scoring", "budget", "selection", "completion", "output")
PROMPT = "What is going on here?"  # routes to 'general' (a = 0.5) with the default table


@dataclass
class BenchRow:
    device: str
    shape: str
    M: int
    B: int
    budget: int
    k1: int
    k2: int
    iterations: int
    stage_ms: dict[str, float] = field(default_factory=dict)
    clasp_ms: float = 0.0
    matmul_ms: float = 0.0
    naive_ms: float = 0.0
    fusion_pass_ms: float = 0.0

    @property
    def vs_matmul(self) -> float:
        return self.clasp_ms / self.matmul_ms

    @property
    def vs_bound(self) -> float:
        """CLASP over its products plus one bare pass over the fused layers (fusion's memory traffic)."""
        return self.clasp_ms / (self.matmul_ms + self.fusion_pass_ms)

    @property
    def naive_speedup(self) -> float:
        return self.naive_ms / self.clasp_ms

    def as_dict(self) -> dict:
        d = asdict(self)
        d["vs_matmul"] = self.vs_matmul
        d["vs_bound"] = self.vs_bound
        d["naive_speedup"] = self.naive_speedup
        return d


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def make_inputs(M: int, L: int, Dv: int, D: int, B: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Synthetic inputs with the redundancy of real patch features: every token is one of
    ``M // 16`` prototype directions plus noise (i.i.d. Gaussian tokens in 4096-d are nearly
    orthogonal, which makes k-means converge in one or two steps and flatters the pipeline)."""
    g = torch.Generator(device=device).manual_seed(seed)
    layers = {l: torch.randn(B, M, Dv, generator=g, device=device, dtype=dtype) for l in range(1, L + 1)}
    cls = torch.rand(B, 16, M, generator=g, device=device, dtype=dtype).softmax(-1)
    protos = torch.randn(B, max(1, M // 16), D, generator=g, device=device)
    owner = torch.randint(0, protos.shape[1], (B, M), generator=g, device=device)
    projected = (tp.ops.gather_rows(protos, owner) + 1.5 * torch.randn(B, M, D, generator=g, device=device)).to(dtype)
    return tp.VisualTokens(
        layers=layers,
        num_layers=L,
        cls_attention={L - 1: cls},
        projected=projected,
        prompts=[PROMPT] * B,
    )


# -- references --------------------------------------------------------------------------------
def matmul_reference(B: int, M: int, D: int, k1: int, k2: int, T: int, device: str, dtype: torch.dtype):
    """Bare products of CLASP's shapes: (B, M-K1, D) x (B, D, K1) and T x (B, M-K1, D) x (B, D, K2)."""
    g = torch.Generator(device=device).manual_seed(1)
    U = torch.randn(B, M - k1, D, generator=g, device=device, dtype=dtype)
    P = torch.randn(B, D, max(k1, 1), generator=g, device=device, dtype=dtype)
    C = torch.randn(B, D, max(k2, 1), generator=g, device=device, dtype=dtype)

    def run():
        if k1:
            torch.matmul(U, P)
        for _ in range(T):
            torch.matmul(U, C)

    return run


def fusion_pass(tokens: tp.VisualTokens, layers: list[int]):
    """One bare multiply-add pass over each fused layer into one buffer: the memory traffic any
    fusion of those layers costs (``out += w h_l``), without CLASP's weights bookkeeping."""
    out = torch.zeros_like(tokens.reference)

    def run():
        out.zero_()
        for layer in layers:
            out.add_(tokens.layer(layer), alpha=0.5)

    return run


def naive_clasp(tokens: tp.VisualTokens, alpha: Tensor, k1: int, k2: int, T: int,
                representative: str = "medoid") -> list[list[int]]:
    """CLASP written naively: stack every layer, loop over the batch, loop over clusters.
    ``representative``: each cluster's ``medoid`` (the paper) or its ``novel`` member (lowest rho)."""
    L = tokens.num_layers
    B, M = tokens.shape
    out = []
    for b in range(B):
        H = torch.stack([tokens.layers[l][b] for l in range(1, L + 1)])  # (L, M, Dv)
        fused = (alpha[b].to(H.device, H.dtype).view(L, 1, 1) * H).sum(0)  # (M, Dv)  # noqa: F841
        z = tokens.projected[b]  # (M, D): the projector's output for `fused`
        u = z / z.norm(dim=-1, keepdim=True)
        phi = tokens.cls_attention[L - 1][b].float().mean(0)
        piv = phi.topk(k1).indices if k1 else torch.zeros(0, dtype=torch.long, device=u.device)
        is_piv = torch.zeros(M, dtype=torch.bool, device=u.device)
        is_piv[piv] = True
        rest = (~is_piv).nonzero().flatten()
        U = u[rest]
        rho = (U @ u[piv].T).max(1).values if k1 else torch.zeros(len(rest), device=u.device)
        seeds = torch.argsort(rho, stable=True)[:k2]
        mu = U[seeds].clone()
        assign = None
        for _step in range(T):
            new = (U @ mu.T).argmax(1)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            for k in range(k2):  # eq. 40 after every assignment, the last one included
                members = U[assign == k]
                if len(members):
                    s = members.sum(0)
                    mu[k] = s / s.norm()
        keep = set(piv.tolist())
        for k in range(k2):
            idx = (assign == k).nonzero().flatten()
            if len(idx) and representative == "novel" and k1:  # lowest rho; ties to the higher score, then index
                low = float(rho[idx].min())
                tol = tp.ops.TIE_ULPS * torch.finfo(rho.dtype).eps * max(abs(low), 1.0)
                near = idx[rho[idx] <= low + tol].tolist()
                keep.add(int(rest[min(near, key=lambda i: (-float(U[i] @ mu[k]), i))]))
            elif len(idx):  # the medoid; scores within rounding of the best tie, to the lower rho, then index
                score = U[idx] @ mu[k]
                top = float(score.max())
                tol = tp.ops.TIE_ULPS * torch.finfo(score.dtype).eps * max(abs(top), 1.0)
                near = idx[score >= top - tol].tolist()
                keep.add(int(rest[min(near, key=lambda i: (float(rho[i]), i))]))
        out.append(sorted(keep))
    return out


# -- the run ------------------------------------------------------------------------------------
def grid(devices: list[str], shapes: list[str], batches: list[int]):
    """Every ``(device, shape, (M, L, Dv, D), B)`` a benchmark visits, in order; frees the CUDA
    cache after each batch size so one row's inputs do not crowd the next."""
    for device in devices:
        for shape in shapes:
            dims = SHAPES[shape] if shape in SHAPES else _parse_shape(shape)
            for B in batches:
                yield device, shape, dims, B
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()


def run(
    spec: PipelineSpec,
    devices: list[str],
    shapes: list[str],
    batches: list[int],
    budgets: list[int],
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
    on_row: Callable[[BenchRow], None] | None = None,
) -> list[BenchRow]:
    """CLASP's stages at every (device, shape, batch, budget); ``on_row`` sees each row as soon
    as it is measured (so an interrupted run keeps what it finished)."""
    pipe = tp.Pipeline(spec)
    representative = getattr(spec.completion, "representative", "medoid")  # what the naive CLASP keeps per cluster
    rows = []
    for device, shape, (M, L, Dv, D), B in grid(devices, shapes, batches):
        tokens = make_inputs(M, L, Dv, D, B, device, dtype)
        routing = pipe.route(tokens.prompts)
        alpha = spec.class_table.alpha(routing.classes, L)
        a = float(spec.budget_policy.pivot_ratio(routing, spec.class_table)[0])
        fused_layers = sorted(spec.fusion.requirements(routing, spec.class_table, L).layers)  # what fusion reads
        for R in budgets:
            k1 = int(a * R + 1e-6)
            k2 = R - k1
            if progress:
                progress(f"{device} {shape} B={B} R={R}")
            # iterations CLASP actually runs on this input
            iters = _iterations(pipe, tokens, R, routing)
            stage_ms, _ = _stage_times(pipe, tokens, R, routing, device, repeats)
            clasp_ms = _time(lambda: pipe(tokens, budget=R, routing=routing), device, repeats)
            mm = matmul_reference(B, M, D, k1, k2, iters, device, dtype)
            matmul_ms = _time(mm, device, repeats)
            naive_ms = _time(lambda: naive_clasp(tokens, alpha, k1, k2, iters, representative), device,
                             max(1, repeats // 2))
            fusion_ms = _time(fusion_pass(tokens, fused_layers), device, repeats)
            rows.append(BenchRow(device, shape, M, B, R, k1, k2, iters, stage_ms, clasp_ms,
                                 matmul_ms, naive_ms, fusion_ms))
            if on_row:
                on_row(rows[-1])
        tokens = None  # free this batch's inputs before the next one
    return rows


def _stage_times(pipe: tp.Pipeline, tokens: tp.VisualTokens, R: int | None, routing, device: str,
                 repeats: int) -> tuple[dict[str, float], tp.Selection]:
    """Median milliseconds of each pipeline stage over ``repeats`` timed calls (after one
    warm-up), through the pipeline's ``timer`` hook; and the last call's selection."""
    acc: dict[str, list[float]] = defaultdict(list)

    @contextlib.contextmanager
    def timer(name):
        _sync(device)
        t0 = time.perf_counter()
        yield
        _sync(device)
        acc[name].append((time.perf_counter() - t0) * 1e3)

    for _ in range(repeats + 1):
        sel = pipe(tokens, budget=R, routing=routing, timer=timer)
    return {s: statistics.median(v[1:]) for s, v in acc.items()}, sel


def _iterations(pipe: tp.Pipeline, tokens: tp.VisualTokens, R: int, routing) -> int:
    """Run CLASP's completion once with tracing to learn how many k-means steps it takes."""
    from tokenprune_plugins.completion import ClaspCompletion

    comp = pipe.spec.completion
    if not isinstance(comp, ClaspCompletion):
        return 0
    spec = pipe.spec
    fused = spec.fusion.fuse(tokens, routing, spec.class_table)
    phi = spec.scoring.score(tokens, fused)
    valid = tokens.valid()
    Rt = tp.resolve_budget(R, valid.sum(1))
    a = spec.budget_policy.pivot_ratio(routing, spec.class_table).to(Rt.device).double()
    k1 = torch.floor(a * Rt + 1e-6).long()
    pivots = spec.selection.select(phi, k1, valid, fused)
    req = tp.stages.CompletionRequest(phi, pivots, Rt - k1, valid, tokens, fused)
    return comp.plan(req).kmeans.iterations


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    """``MxLxDvxD`` for custom shapes (e.g. tiny ones in tests)."""
    try:
        M, L, Dv, D = (int(x) for x in text.split("x"))
    except ValueError:
        raise ValueError(f"unknown shape '{text}': use one of {list(SHAPES)} or 'MxLxDvxD'") from None
    return M, L, Dv, D


def table_head() -> list[str]:
    """The markdown header lines of :func:`format_table`."""
    head = ["device", "shape", "B", "R", "K1/K2", "T"] + [f"{s} ms" for s in STAGES[1:]] + [
        "CLASP ms", "matmul ms", "CLASP/matmul", "fusion pass ms", "CLASP/bound", "naive ms", "naive/CLASP"]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def table_line(r: BenchRow) -> str:
    cells = [r.device, r.shape, str(r.B), str(r.budget), f"{r.k1}/{r.k2}", str(r.iterations)]
    cells += [f"{r.stage_ms.get(s, 0):.2f}" for s in STAGES[1:]]
    cells += [f"{r.clasp_ms:.2f}", f"{r.matmul_ms:.2f}", f"{r.vs_matmul:.2f}x", f"{r.fusion_pass_ms:.2f}",
              f"{r.vs_bound:.2f}x", f"{r.naive_ms:.1f}", f"{r.naive_speedup:.1f}x"]
    return "| " + " | ".join(cells) + " |"


def format_table(rows: list[BenchRow]) -> str:
    return "\n".join(table_head() + [table_line(r) for r in rows])


# -- every method, side by side -------------------------------------------------------------------
#: the pre-LLM presets compared with CLASP (paths relative to the specs directory)
METHOD_SPECS = (
    "clasp.toml", "methods/visionzip.toml", "methods/vispruner.toml", "methods/cdpruner.toml",
    "methods/dart.toml", "methods/prumerge-plus.toml", "variants/divprune.toml", "methods/pool-2x2.toml",
    "methods/pool-3x3.toml", "variants/random.toml",
)
#: the in-LLM presets, whose selection runs on the LLM's hidden states
LLM_SPECS = ("methods/fastv-matched.toml", "methods/pyramid-drop.toml", "methods/dart-llm.toml")
SELECT_STAGES = ("scoring", "budget", "selection", "completion", "output")


@dataclass
class MethodRow:
    device: str
    shape: str
    M: int
    B: int
    method: str
    kept: int
    select_ms: float
    total_ms: float
    select_vs_clasp: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _method_inputs(M: int, L: int, Dv: int, D: int, B: int, device: str, dtype: torch.dtype) -> tp.VisualTokens:
    """:func:`make_inputs` plus what the other methods read: attention keys, the prompt's
    embedding, grid positions and the projector's output for the fused layer."""
    import dataclasses
    import math

    base = make_inputs(M, L, Dv, D, B, device, dtype)
    g = torch.Generator(device=device).manual_seed(2)
    rows = max(r for r in range(1, math.isqrt(M) + 1) if M % r == 0)  # the squarest grid
    cols = M // rows
    W = torch.randn(Dv, D, generator=g, device=device, dtype=dtype) / Dv**0.5
    return dataclasses.replace(
        base,
        attention_keys={L - 1: torch.randn(B, M, 64, generator=g, device=device, dtype=dtype)},
        text_embedding=torch.randn(B, D, generator=g, device=device, dtype=dtype),
        positions=tp.grid_positions(rows, cols, B, device),
        project=lambda z: z @ W,
    )


def run_methods(
    specs_dir,
    devices: list[str],
    shapes: list[str],
    batches: list[int],
    budget: int = 64,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
    on_group: Callable[[list[MethodRow]], None] | None = None,
) -> list[MethodRow]:
    """Every method's selection time (scoring to output, the stages a method owns; the fusion of
    the encoder's layers and routing are CLASP's alone and are reported in ``total_ms``), and its
    ratio to CLASP's selection time measured in the same loop. In-LLM pruners are timed on their
    ``select`` over hidden states of the same size (``total_ms`` = ``select_ms``)."""
    from pathlib import Path

    specs_dir = Path(specs_dir)
    pre = [(p, tp.load_spec(specs_dir / p)) for p in METHOD_SPECS]
    llm = [(p, tp.load_spec(specs_dir / p)) for p in LLM_SPECS]
    rows: list[MethodRow] = []
    for device, shape, (M, L, Dv, D), B in grid(devices, shapes, batches):
        tokens = _method_inputs(M, L, Dv, D, B, device, dtype)
        clasp_select = None
        group: list[MethodRow] = []
        for _path, spec in pre:
            if progress:
                progress(f"{device} {shape} B={B} {spec.name}")
            pipe = tp.Pipeline(spec)
            routing = pipe.route(tokens.prompts)
            R = None if pipe.fixed_budget(tokens) is not None else budget
            stage_ms, sel = _stage_times(pipe, tokens, R, routing, device, repeats)
            select_ms = sum(stage_ms[s] for s in SELECT_STAGES if s in stage_ms)
            total_ms = _time(lambda: pipe(tokens, budget=R, routing=routing), device, repeats)
            row = MethodRow(device, shape, M, B, spec.name, int(sel.counts[0]), select_ms, total_ms)
            if spec.name == "clasp":
                clasp_select = select_ms
            group.append(row)
        for _path, spec in llm:
            if progress:
                progress(f"{device} {shape} B={B} {spec.name} (in-LLM select)")
            ms = _time(_llm_select(spec, M, D, B, budget, device, dtype), device, repeats)
            group.append(MethodRow(device, shape, M, B, spec.name, budget, ms, ms))
        for row in group:
            row.select_vs_clasp = row.select_ms / clasp_select if clasp_select else float("nan")
        rows += group
        if on_group:  # the ratios need CLASP's time, so a (device, shape, batch) group at a time
            on_group(group)
        tokens = None  # free this batch's inputs before the next one
    return rows


def llm_request(spec: PipelineSpec, M: int, D: int, B: int, budget: int, device: str, dtype: torch.dtype,
                T: int = 16, start: int = 35) -> tp.stages.LlmRequest:
    """One in-LLM step's request on random hidden states, attention and key norms: ``B`` prompts of
    ``start`` tokens (LLaVA-1.5's system prompt), ``M`` visual tokens, then ``T`` question tokens."""
    g = torch.Generator(device=device).manual_seed(3)
    pruner = spec.llm
    total = torch.full((B,), M, device=device)
    keep = pruner.keep_counts(total, torch.full((B,), budget, device=device), len(pruner.schedule(10**6)))
    return tp.stages.LlmRequest(
        layer=2, step=0, hidden=torch.randn(B, M, D, generator=g, device=device, dtype=dtype),
        valid=torch.ones(B, M, dtype=torch.bool, device=device), keep=keep[-1],
        attention=torch.rand(B, M, generator=g, device=device),
        key_norms=torch.rand(B, M, generator=g, device=device),
        text_hidden=torch.randn(B, T, D, generator=g, device=device, dtype=dtype),
        text_valid=torch.ones(B, T, dtype=torch.bool, device=device),
        text_key_norms=torch.rand(B, T, generator=g, device=device),
        norm=torch.nn.RMSNorm(D, device=device, dtype=dtype),
        index=(start + torch.arange(M, device=device)).expand(B, M),
        text_index=(start + M + torch.arange(T, device=device)).expand(B, T),
    )


def _llm_select(spec: PipelineSpec, M: int, D: int, B: int, budget: int, device: str, dtype: torch.dtype):
    """One in-LLM step's selection (:func:`llm_request`)."""
    req = llm_request(spec, M, D, B, budget, device, dtype)

    def run():
        with torch.no_grad():
            spec.llm.select(req)

    return run


def methods_head() -> list[str]:
    head = ["device", "shape", "B", "method", "kept", "select ms", "select / CLASP", "pipeline ms"]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def methods_line(r: MethodRow) -> str:
    return "| " + " | ".join([r.device, r.shape, str(r.B), r.method, str(r.kept), f"{r.select_ms:.2f}",
                              f"{r.select_vs_clasp:.2f}x", f"{r.total_ms:.2f}"]) + " |"


def format_methods(rows: list[MethodRow]) -> str:
    return "\n".join(methods_head() + [methods_line(r) for r in rows])
