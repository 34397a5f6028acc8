"""CLASP stage 4 against its equations, and the kernels against hand-written references."""

from __future__ import annotations

import itertools
import math

import torch
from helpers import DTYPES, make_tokens
from hypothesis import given
from hypothesis import strategies as st
from tokenprune_plugins import greedy
from tokenprune_plugins.completion import ClaspCompletion

import tokenprune as tp
from tokenprune import ops
from tokenprune.stages import CompletionRequest


@st.composite
def requests(draw, max_B=3, max_M=10, min_k1=0):
    B = draw(st.integers(1, max_B))
    M = draw(st.integers(2, max_M))
    seed = draw(st.integers(0, 2**31 - 1))
    counts = [draw(st.integers(2, M)) for _ in range(B)]
    k1 = [draw(st.integers(min(min_k1, c - 1), c - 1)) for c in counts]
    k2 = [draw(st.integers(1, c - a)) for c, a in zip(counts, k1, strict=True)]
    return dict(B=B, M=M, seed=seed, counts=counts, k1=k1, k2=k2)


def build_request(case, dtype=torch.float32, device="cpu", D=6) -> CompletionRequest:
    tokens = make_tokens(case["B"], case["M"], D=D, dtype=dtype, device=device, seed=case["seed"],
                         valid_counts=case["counts"])
    valid = tokens.valid()
    g = torch.Generator().manual_seed(case["seed"] + 1)
    phi = torch.rand(case["B"], case["M"], generator=g).to(device)
    pivots = ops.topk_mask(phi, torch.tensor(case["k1"], device=device), valid)
    unit = ops.unit(tokens.project(tokens.layer(1)))
    fused = tp.Fused(tokens.layer(1), unit)
    return CompletionRequest(phi, pivots, torch.tensor(case["k2"], device=device), valid, tokens, fused, unit)


@given(case=requests(max_M=9, min_k1=1))
def test_seeds_minimise_pivot_redundancy_brute_force(device, case):
    """C0 = BottomK2(rho) minimises D(C|P) = sum rho over every K2-subset of U (eq. 37-38)."""
    req = build_request(case, torch.float64, device)
    plan = ClaspCompletion().plan(req)
    for b in range(case["B"]):
        pool = plan.pool[b].cpu().nonzero().flatten().tolist()
        u = req.unit[b].cpu()
        piv = req.pivots[b].cpu().nonzero().flatten().tolist()
        rho = {t: max(float(u[t] @ u[j]) for j in piv) for t in pool}  # eq. 36 by hand
        seeds = plan.seeds[b].cpu().nonzero().flatten().tolist()
        assert len(seeds) == case["k2"][b]
        best = min(sum(rho[t] for t in c) for c in itertools.combinations(pool, case["k2"][b]))
        assert math.isclose(sum(rho[t] for t in seeds), best, rel_tol=1e-9, abs_tol=1e-12)
        for t in pool:
            assert math.isclose(float(plan.rho[b, t]), rho[t], abs_tol=1e-6)


@given(case=requests(max_M=30), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_kmeans_objective_never_decreases(device, case, dtype):
    req = build_request(case, dtype, device)
    plan = ClaspCompletion(iterations=25, early_stop=False).plan(req, trace=True)
    obj = plan.kmeans.objective.cpu().double()  # (B, T)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert (obj[:, 1:] >= obj[:, :-1] - tol * case["M"]).all()


@given(case=requests(max_M=30), dtype=st.sampled_from(DTYPES))
def test_medoids_are_members_and_result_is_exact(device, case, dtype):
    req = build_request(case, dtype, device)
    plan = ClaspCompletion().plan(req)
    B, M = plan.pool.shape
    for b in range(B):
        for k, t in enumerate(plan.medoids[b].tolist()):
            if t < M:
                assert bool(plan.pool[b, t]) and int(plan.kmeans.assign[b, t]) == k
        assert int(plan.chosen[b].sum()) == case["k2"][b]
    mask = ClaspCompletion().complete(req).mask
    assert torch.equal(mask.sum(1).cpu(), torch.tensor(case["k2"]))
    assert not (mask & ~req.pool).any()


def _reference_clasp(u, pivots, pool, k2, iterations=10, medoid_centres="updated", representative="medoid"):
    """CLASP stage 4 for one sample, written directly from eqs. 36-41 with Python loops: T rounds
    of assignment (39) then update (40), stopping early when an assignment repeats, then medoids
    (41) against the centres of the final clusters. ``"assigning"``: the last round skips (40).
    ``representative="novel"``: each cluster keeps its member of lowest rho instead."""
    P = pivots.nonzero().flatten().tolist()
    U = pool.nonzero().flatten().tolist()
    rho = {t: max(float(u[t] @ u[j]) for j in P) for t in U}
    seeds = sorted(U, key=lambda t: (rho[t], t))[:k2]
    mu = [u[s].clone() for s in seeds]
    assign = None
    for step in range(iterations):
        new = {t: max(range(k2), key=lambda k: (float(u[t] @ mu[k]), -k)) for t in U}
        if new == assign:
            break  # converged: mu are already the normalised sums of these clusters
        assign = new
        if step == iterations - 1 and medoid_centres == "assigning":
            break
        for k in range(k2):
            members = [t for t in U if assign[t] == k]
            if members:
                s = sum(u[t] for t in members)
                mu[k] = s / s.norm()
    chosen = set()
    for k in range(k2):
        members = [t for t in U if assign[t] == k]
        if members and representative == "novel":
            low = min(rho[t] for t in members)
            tied = [t for t in members if rho[t] <= low + 8 * 2.3e-16 * max(1, abs(low))]
            chosen.add(min(tied, key=lambda t: (-float(u[t] @ mu[k]), t)))
        elif members:
            top = max(float(u[t] @ mu[k]) for t in members)
            tied = [t for t in members if float(u[t] @ mu[k]) >= top - 8 * 2.3e-16 * max(1, abs(top))]
            chosen.add(min(tied, key=lambda t: (rho[t], t)))
    for t in sorted(U, key=lambda t: (rho[t], t)):
        if len(chosen) >= k2:
            break
        chosen.add(t)
    return chosen


@given(case=requests(max_M=24, min_k1=1), iterations=st.sampled_from([1, 2, 10]),
       medoid_centres=st.sampled_from(["updated", "assigning"]), representative=st.sampled_from(["medoid", "novel"]))
def test_clasp_completion_equals_hand_written_reference(device, case, iterations, medoid_centres, representative):
    req = build_request(case, torch.float64, device)
    stage = ClaspCompletion(iterations=iterations, medoid_centres=medoid_centres, representative=representative)
    mask = stage.complete(req).mask.cpu()
    for b in range(case["B"]):
        ref = _reference_clasp(req.unit[b].cpu(), req.pivots[b].cpu(), req.pool[b].cpu(), case["k2"][b],
                               iterations, medoid_centres, representative)
        assert set(mask[b].nonzero().flatten().tolist()) == ref


def test_medoids_use_the_updated_centres_unless_asked_otherwise():
    """One round (T = 1) on a cluster seeded at its edge: eq. 41 against the updated centre picks
    the member nearest the cluster's mean; against the seed centre it would pick the seed."""
    a = math.radians
    u = torch.tensor([[math.cos(a(d)), math.sin(a(d)), 0.0] for d in (0, 30, 40, 50)] + [[0, 0, 1.0]])
    u = u.unsqueeze(0).double()  # (1, 5, 3); token 4 is the pivot, orthogonal to all
    valid = torch.ones(1, 5, dtype=torch.bool)
    pivots = torch.tensor([[False, False, False, False, True]])
    tokens = tp.VisualTokens(layers={1: u}, num_layers=1)
    req = CompletionRequest(torch.zeros(1, 5), pivots, torch.tensor([1]), valid, tokens, tp.Fused(u, u))
    def chosen(medoid_centres):
        return ClaspCompletion(iterations=1, medoid_centres=medoid_centres).complete(req).mask[0].nonzero().flatten()

    assert chosen("updated").tolist() == [1]  # the cluster's mean direction is at 30.2 deg
    assert chosen("assigning").tolist() == [0]  # the seed (lowest rho, lowest index) matches itself best


def test_without_pivots_seeds_are_spread_evenly():
    case = dict(B=1, M=12, seed=3, counts=[12], k1=[0], k2=[3])
    plan = ClaspCompletion().plan(build_request(case))
    assert plan.seeds[0].nonzero().flatten().tolist() == [0, 4, 8]  # every floor(12/3)-th token
    plan = ClaspCompletion(spread_without_pivots=False).plan(build_request(case))
    assert plan.seeds[0].nonzero().flatten().tolist() == [0, 1, 2]


def test_empty_cluster_keeps_its_centre_and_fill_keeps_budget():
    # Three identical tokens and one distinct: with K2 = 3 two seeds coincide in direction, so
    # one cluster empties; the fill must still return exactly K2 distinct tokens.
    u = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).unsqueeze(0)
    valid = torch.ones(1, 5, dtype=torch.bool)
    pivots = torch.tensor([[False, False, False, False, True]])
    tokens = tp.VisualTokens(layers={1: u}, num_layers=1)
    req = CompletionRequest(torch.zeros(1, 5), pivots, torch.tensor([3]), valid, tokens, tp.Fused(u, u))
    res = ClaspCompletion().complete(req)
    assert int(res.mask.sum()) == 3 and not res.mask[0, 4]


# -- kernels -----------------------------------------------------------------------------------
@given(B=st.integers(1, 4), M=st.integers(1, 30), seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_topk_mask_matches_sorted_reference(device, B, M, seed, ties):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 3, (B, M), generator=g).float() if ties else torch.randn(B, M, generator=g)
    valid = torch.rand(B, M, generator=g) < 0.7
    k = torch.tensor([int(torch.randint(0, int(v.sum()) + 1, (1,), generator=g)) for v in valid])
    for largest in (True, False):
        got = ops.topk_mask(score.to(device), k.to(device), valid.to(device), largest).cpu()
        for b in range(B):
            cand = [i for i in range(M) if valid[b, i]]
            key = (lambda i: (-float(score[b, i]), i)) if largest else (lambda i: (float(score[b, i]), i))
            assert set(got[b].nonzero().flatten().tolist()) == set(sorted(cand, key=key)[: int(k[b])])


@given(B=st.integers(1, 3), M=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_mask_to_indices(device, B, M, seed):
    mask = torch.rand(B, M, generator=torch.Generator().manual_seed(seed)) < 0.5
    idx, counts = ops.mask_to_indices(mask.to(device))
    for b in range(B):
        assert idx[b, : int(counts[b])].tolist() == mask[b].nonzero().flatten().tolist()
        assert (idx[b, int(counts[b]):] == -1).all()


@given(seed=st.integers(0, 2**40), keys=st.lists(st.integers(0, 2**40), min_size=1, max_size=4),
       M=st.integers(1, 50))
def test_hash_uniform_is_per_sample_and_in_range(device, seed, keys, M):
    k = torch.tensor(keys, device=device)
    u = ops.hash_uniform(seed, k, M)
    assert u.shape == (len(keys), M) and (u >= 0).all() and (u < 1).all()
    for b in range(len(keys)):
        assert torch.equal(u[b], ops.hash_uniform(seed, k[b : b + 1], M)[0])
    assert torch.equal(u.cpu(), ops.hash_uniform(seed, k.cpu(), M))


def test_hash_uniform_is_roughly_uniform():
    u = ops.hash_uniform(7, torch.arange(64), 4096).flatten()
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.01


@given(B=st.integers(1, 3), M=st.integers(2, 16), seed=st.integers(0, 2**31 - 1), k=st.integers(1, 6))
def test_greedy_max_min_matches_reference(device, B, M, seed, k):
    g = torch.Generator().manual_seed(seed)
    u = ops.unit(torch.randn(B, M, 5, generator=g, dtype=torch.float64))
    selected = torch.rand(B, M, generator=g) < 0.2
    cand = ~selected
    kk = torch.minimum(torch.full((B,), k), cand.sum(1))
    got = greedy.greedy_max_min(u.to(device), cand.to(device), selected.to(device), kk.to(device)).cpu()
    for b in range(B):
        S = selected[b].nonzero().flatten().tolist()
        C = cand[b].nonzero().flatten().tolist()
        picked = []
        d = lambda i, j: 1 - float(u[b, i] @ u[b, j])  # noqa: E731

        def best(items, value):  # max value; rounding-level ties to the lowest index
            top = max(value(i) for i in items)
            return min(i for i in items if value(i) >= top - 8 * 2.3e-16 * max(1, abs(top)))

        for _ in range(int(kk[b])):
            rest = [i for i in C if i not in picked]
            if not S and not picked:
                picked.append(best(rest, lambda i: min((d(i, j) for j in C if j != i), default=0.0)))
            else:
                picked.append(best(rest, lambda i: min(d(i, j) for j in S + picked)))
        assert set(got[b].nonzero().flatten().tolist()) == set(picked)


def test_novel_representative_keeps_a_small_distinct_region_that_a_medoid_misses():
    """K2 = 2 clusters: one far token, and a large background (20 tokens near one direction) that
    absorbs the two tokens of a small region, seeded there because the region is unlike the pivot.
    The centre moves to the background, so the medoid is a background token; the novel
    representative is a token of the small region."""
    pivot = torch.tensor([1.0, 0.0, 0.0])
    far = torch.tensor([-0.9, -0.44, 0.0])                        # rho -0.9: the first seed
    region = torch.tensor([0.0, 0.8, 0.6])                        # rho 0: the second seed
    background = [torch.tensor([0.6, 0.8, 0.01 * i]) for i in range(20)]  # rho about 0.6
    u = torch.nn.functional.normalize(torch.stack([pivot, far, region, region + 0.001, *background]), dim=-1).double()
    M = u.shape[0]
    pivots = torch.zeros(M, dtype=torch.bool)
    pivots[0] = True
    medoid = _reference_clasp(u, pivots, ~pivots, 2)
    novel = _reference_clasp(u, pivots, ~pivots, 2, representative="novel")
    assert 1 in medoid and not medoid & {2, 3}
    assert novel == {1, 2}
    tokens = make_tokens(1, M, D=3, seed=0)
    req = CompletionRequest(torch.zeros(1, M), pivots[None], torch.tensor([2]), torch.ones(1, M, dtype=torch.bool),
                            tokens, tp.Fused(u[None], u[None]), u[None])
    for representative, want in (("medoid", medoid), ("novel", novel)):
        got = ClaspCompletion(representative=representative).complete(req).mask[0].nonzero().flatten().tolist()
        assert set(got) == want, representative
