"""The planners: exact where they claim to be (against brute force), under the load cap they promise, deterministic
for a seed, and refusing what they cannot do."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moekit.errors import UserError
from moekit.placement import evaluate, search
from moekit.placement.inputs import RoutingStats, stats_from_ids
from moekit.placement.methods import PlanOptions, eplb_group_aligned, run_method
from moekit.placement.plan import Plan, Topology, shares_from_rows


def _affine_stats(seed=0, T=400, E=8, L=3, K=2, stay=0.8):
    """Tokens with a latent cluster that mostly persists across layers: real inter-layer affinity."""
    rng = np.random.default_rng(seed)
    pref = [rng.permutation(E) for _ in range(L)]  # cluster c prefers experts pref[l][c], pref[l][c + 1]
    cluster = rng.integers(0, E, T)
    ids = []
    for l in range(L):
        if l:
            move = rng.random(T) > stay
            cluster = np.where(move, rng.integers(0, E, T), cluster)
        first = pref[l][cluster]
        second = pref[l][(cluster + 1 + rng.integers(0, 2, T)) % E]
        second = np.where(second == first, pref[l][(cluster + 3) % E], second)
        ids.append(np.stack([first, second], axis=1))
    return stats_from_ids(ids, E)


def _cost(stats, rows, topo):
    return evaluate.transition_cost(stats.pairs, shares_from_rows(rows, topo), topo.nodes)


def _brute_force(stats, topo):
    """Minimum transition cost over every equal-count placement of every layer (GPU 0 fixed for expert 0's layer-0
    GPU is not assumed: all assignments)."""
    E, G, S = topo.num_experts, topo.gpus, topo.slots_per_gpu
    layer_rows = {tuple(search.canonical(np.array(p), topo)) for p in itertools.permutations(range(E))}
    best = np.inf
    for rows in itertools.product(sorted(layer_rows), repeat=len(stats.layers)):
        best = min(best, _cost(stats, np.array(rows), topo))
    return best


def test_exflow_joint_milp_is_optimal_on_a_small_problem():
    stats = _affine_stats(E=4, L=2, T=200)
    topo = Topology(4, 2)
    res = run_method("exflow", stats, topo, PlanOptions(time_limit=60))
    assert res.info["milp_status"] == "optimal"
    assert _cost(stats, res.phy2log, topo) == pytest.approx(_brute_force(stats, topo))


def test_gap_layer_is_exact():
    rng = np.random.default_rng(3)
    topo = Topology(6, 2, redundant=2)
    value, counts = rng.random((6, 2)), rng.integers(10, 100, 6).astype(float)
    cnt = np.array([2, 2, 1, 1, 1, 1])
    bound = counts.sum() / 2 * 1.15
    row, status = search.gap_layer(value, counts, cnt, bound, topo, 30)
    assert status == "optimal"
    best = -np.inf  # brute force over every split of the 8 replicas into two GPUs of 4
    replicas = np.repeat(np.arange(6), cnt)
    for left in itertools.combinations(range(8), 4):
        cand = np.r_[replicas[list(left)], np.delete(replicas, list(left))]
        loads = np.bincount(topo.gpu_of_slot(), weights=(counts / cnt)[cand], minlength=2)
        if loads.max() <= bound:
            best = max(best, search.row_value(cand, value, topo))
    assert search.row_value(row, value, topo) == pytest.approx(best)


def test_swap_search_never_loses_value_and_keeps_the_cap():
    rng = np.random.default_rng(1)
    topo = Topology(16, 4, redundant=4)
    counts = rng.integers(50, 500, 16).astype(float)
    from moekit.placement.eplb import rebalance_experts

    row = rebalance_experts(counts[None], 20, 1, 1, 4)[0][0]
    loads = np.bincount(topo.gpu_of_slot(), weights=(counts / np.bincount(row, minlength=16))[row])
    bound = loads.max()
    value = rng.random((16, 4)) * 100
    out = search.swap_layer(row, value, counts, bound, topo)
    assert out.swaps > 0 and search.row_value(out.row, value, topo) > search.row_value(row, value, topo)
    cnt = np.bincount(out.row, minlength=16)
    assert np.bincount(topo.gpu_of_slot(), weights=(counts / cnt)[out.row]).max() <= bound + 1e-9
    assert np.array_equal(cnt, np.bincount(row, minlength=16))  # replica counts unchanged


@pytest.mark.parametrize("redundant, gpus, nodes, milp", [(0, 4, 1, True), (4, 4, 2, True), (0, 4, 1, False)])
def test_balanced_affinity_keeps_eplb_cap_and_beats_its_transitions(redundant, gpus, nodes, milp):
    stats = _affine_stats(E=16, L=3, T=600)
    topo = Topology(16, gpus, nodes, redundant)
    opts = PlanOptions(time_limit=30, layer_milp_max_vars=4096 if milp else 0)
    ours = run_method("balanced-affinity", stats, topo, opts)
    base = run_method("eplb", stats, topo, opts)
    assert ("layer-wise MILP" in ours.solver) == milp and ("+ swap search" in ours.solver) == (not milp)
    cap = evaluate.gpu_loads(stats.counts, shares_from_rows(base.phy2log, topo)).max(axis=1) * 1.005
    assert (evaluate.gpu_loads(stats.counts, shares_from_rows(ours.phy2log, topo)).max(axis=1) <= cap + 1e-6).all()
    assert np.array_equal(Plan(topo, ours.phy2log, stats.layers, 3).logcnt, Plan(topo, base.phy2log, stats.layers,
                                                                                  3).logcnt)
    assert _cost(stats, ours.phy2log, topo) < 0.9 * _cost(stats, base.phy2log, topo)


@pytest.mark.parametrize("method", ["exflow", "balanced-affinity", "eplb"])
def test_plans_are_deterministic_for_a_seed(method):
    stats = _affine_stats(E=16, L=3, T=300, seed=5)
    topo = Topology(16, 4)
    a = run_method(method, stats, topo, PlanOptions(seed=7, time_limit=30))
    b = run_method(method, stats, topo, PlanOptions(seed=7, time_limit=30))
    assert np.array_equal(a.phy2log, b.phy2log) and a.solver == b.solver
    assert a.info.get("reproducible", True)  # not cut short by the time limit: deterministic by construction


def test_exflow_beats_the_contiguous_placement_and_keeps_equal_counts():
    stats = _affine_stats(E=16, L=3, T=600)
    topo = Topology(16, 4)
    res = run_method("exflow", stats, topo, PlanOptions(time_limit=30, joint_milp_max_vars=0))
    assert "Hungarian" in res.solver
    for row in res.phy2log:
        assert sorted(row.tolist()) == list(range(16))
    default = np.tile(np.arange(16), (3, 1))
    assert _cost(stats, res.phy2log, topo) < 0.8 * _cost(stats, default, topo)


def test_refusals():
    stats = _affine_stats()
    with pytest.raises(UserError, match="exflow places every expert exactly once"):
        run_method("exflow", stats, Topology(8, 2, redundant=2))
    counts_only = RoutingStats(stats.counts, stats.layers)
    for method in ("exflow", "balanced-affinity"):
        with pytest.raises(UserError, match="counts only"):
            run_method(method, counts_only, Topology(8, 2))
    with pytest.raises(UserError, match="unknown --method 'ilp'"):
        run_method("ilp", stats, Topology(8, 2))
    with pytest.raises(UserError, match="--time-limit must be > 0"):
        PlanOptions(time_limit=0)


@pytest.mark.parametrize("gpus", [2, 8])
def test_group_aligned_eplb_keeps_groups_whole(gpus):
    counts = np.random.default_rng(0).integers(1, 100, (2, 16)).astype(float)
    topo = Topology(16, gpus, num_groups=4, topk_group=2, top_k=2)  # groups of 4; 8 or 2 experts per GPU
    rows = eplb_group_aligned(counts, topo)
    for row in rows:
        assert sorted(row.tolist()) == list(range(16))
        per_gpu = row.reshape(gpus, -1) // 4  # group of each expert, per GPU
        if gpus == 2:
            assert all(np.all(np.bincount(g, minlength=4)[np.unique(g)] == 4) for g in per_gpu)  # whole groups
        else:
            assert all(len(set(b.tolist())) == 1 for b in per_gpu.reshape(4, -1))  # one group per 2-GPU block
