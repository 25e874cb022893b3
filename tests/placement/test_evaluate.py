"""Placement metrics against slow per-token references that enumerate every replica choice, and the engines' formulas
on hand-computed loads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moekit.placement import evaluate
from moekit.placement.inputs import stats_from_ids
from moekit.placement.plan import Plan, Topology, default_plan


def _ids(rng, T, E, K):
    return np.stack([rng.choice(E, K, replace=False) for _ in range(T)])


def _random_plan(rng, topo, L):
    rows = []
    for _ in range(L):
        row = np.r_[np.arange(topo.num_experts), rng.integers(0, topo.num_experts, topo.redundant)]
        rows.append(rng.permutation(row))
    return Plan(topo, np.stack(rows), list(range(L)), L + 1)


def _slow_metrics(plan, ids, src):
    """Per token: enumerate every combination of replica choices (each 1 / prod cnt)."""
    topo = plan.topology
    gpu, node = topo.gpu_of_slot(), topo.node_of_gpu()
    L, T = len(ids), len(ids[0])
    loads = np.zeros((L, topo.gpus))
    intra = inter = nodes = 0.0
    for l in range(L):
        slots = [np.flatnonzero(plan.phy2log[l] == e) for e in range(topo.num_experts)]
        for t in range(T):
            combos = list(itertools.product(*[slots[e] for e in ids[l][t]]))
            for combo in combos:
                g = {int(gpu[p]) for p in combo}
                for p in combo:
                    loads[l, gpu[p]] += 1 / len(combos)
                intra += sum(1 for h in g if h != src[t] and node[h] == node[src[t]]) / len(combos)
                inter += sum(1 for h in g if node[h] != node[src[t]]) / len(combos)
                nodes += len({int(node[h]) for h in g}) / len(combos)
    hops = total = 0.0
    for l in range(L - 1):
        s1 = [np.flatnonzero(plan.phy2log[l] == e) for e in range(topo.num_experts)]
        s2 = [np.flatnonzero(plan.phy2log[l + 1] == e) for e in range(topo.num_experts)]
        for t in range(T):
            for p in ids[l][t]:
                for q in ids[l + 1][t]:
                    w = 1 / (len(ids[l][t]) * len(ids[l + 1][t]))
                    for a in s1[p]:
                        for b in s2[q]:
                            h = 0 if gpu[a] == gpu[b] else (1 if node[gpu[a]] == node[gpu[b]] else 2)
                            hops += w * h / (len(s1[p]) * len(s2[q]))
                    total += w
    return loads, intra / (T * L), inter / (T * L), nodes / (T * L), hops / total


@pytest.mark.parametrize("experts, gpus, nodes, redundant", [(6, 2, 1, 0), (8, 4, 2, 0), (6, 4, 2, 2), (6, 2, 1, 2)])
def test_metrics_equal_the_slow_reference(experts, gpus, nodes, redundant):
    rng = np.random.default_rng(gpus + redundant)
    topo = Topology(num_experts=experts, gpus=gpus, nodes=nodes, redundant=redundant)
    L, T, K = 3, 40, 2
    ids = [_ids(rng, T, experts, K) for _ in range(L)]
    plan = _random_plan(rng, topo, L)
    src = rng.integers(0, topo.gpus, T)
    res = evaluate.score(plan, stats_from_ids(ids, experts), ids, src, value_bytes=10)
    loads, intra, inter, n_nodes, hops = _slow_metrics(plan, ids, src)
    assert np.allclose([r["gpu_load"] for r in res["layers"]], loads)
    assert res["dispatch_gpus_per_token_layer"] == pytest.approx(intra + inter)
    assert res["dispatch_inter_node_gpus_per_token_layer"] == pytest.approx(inter)
    assert res["dispatch_bytes_per_token"] == pytest.approx((intra + inter) * L * 10)
    assert res["nodes_per_token"] == pytest.approx(n_nodes)
    assert res["cross_gpu_transitions"] == pytest.approx(hops)


def test_balancedness_formulas_by_hand():
    loads = np.array([[4.0, 2.0], [3.0, 3.0]])  # layer 0: mean 3, max 4; layer 1: even
    assert evaluate.sglang_balancedness(loads) == pytest.approx([(3 + 1e-5) / (4 + 1e-5), 1.0])
    assert evaluate.vllm_balancedness(loads) == pytest.approx((3 + 3) / (4 + 3))
    # SGLang's log line averages over every decoder layer, a dense one counting 1.0
    topo = Topology(2, 2)
    plan = Plan(topo, np.array([[0, 1], [0, 1]]), [1, 2], 3)
    stats = stats_from_ids([np.array([[0]] * 4 + [[1]] * 2), np.array([[0]] * 3 + [[1]] * 3)], 2, [1, 2])
    res = evaluate.score(plan, stats)
    assert res["sglang_balancedness"] == pytest.approx(((3 + 1e-5) / (4 + 1e-5) + 1) / 2)
    assert res["sglang_balancedness_logged"] == pytest.approx(((3 + 1e-5) / (4 + 1e-5) + 2) / 3)


def test_transitions_without_affinity_gain_are_one_minus_one_over_g():
    # every (p, q) pair equally likely: any equal-count placement crosses GPUs with probability 1 - 1/G
    E, G = 8, 4
    pairs = np.ones((2, E, E))
    topo = Topology(E, G)
    for rows in (default_plan(topo, [0, 1, 2], 3).phy2log, np.stack([np.random.default_rng(i).permutation(E)
                                                                     for i in range(3)])):
        r = evaluate.transitions(pairs, Plan(topo, rows, [0, 1, 2], 3).shares(), 1)
        assert r["cross_gpu_transitions"] == pytest.approx(1 - 1 / G)


def test_cost_model_scales_with_batch():
    rng = np.random.default_rng(0)
    topo = Topology(8, 2)
    ids = [_ids(rng, 64, 8, 2) for _ in range(2)]
    plan = default_plan(topo, [0, 1], 2)
    times = []
    for b in (64, 6400):
        cost = evaluate.CostModel(100.0, 1000.0, 100.0, 10.0, hidden_size=64, expert_params=3 * 64 * 32,
                                  dtype_bytes=2, batch_tokens=b)
        times.append(evaluate.score(plan, stats_from_ids(ids, 8), ids, None, cost=cost))
    assert times[1]["moe_network_ms"] == pytest.approx(100 * times[0]["moe_network_ms"])
    assert times[1]["moe_step_ms"] > times[0]["moe_step_ms"] > 0
