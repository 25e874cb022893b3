"""The EPLB port equals the worked examples (hand-derived, in docs/placement.md) and DeepSeek's README example."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.placement.eplb import balanced_packing, rebalance_experts, replicate_experts


def _gpu_loads(w, phy2log, logcnt, gpus):
    """Per-GPU load with replicas sharing their expert's load equally (EPLB's model)."""
    per_slot = np.asarray(w, float)[0][phy2log[0]] / logcnt[0][phy2log[0]]
    return per_slot.reshape(gpus, -1).sum(axis=1)


def _balancedness(loads):
    return loads.mean() / loads.max()


def test_example_a_packing_without_replicas():
    phy2log, log2phy, logcnt = rebalance_experts([[1, 8, 2, 5]], 4, 1, 1, 2)
    assert phy2log.tolist() == [[1, 0, 3, 2]] and logcnt.tolist() == [[1, 1, 1, 1]]
    loads = _gpu_loads([[1, 8, 2, 5]], phy2log, logcnt, 2)
    assert loads.tolist() == [9, 7] and round(_balancedness(loads), 3) == 0.889
    assert log2phy.shape == (1, 4, 1) and log2phy[0, :, 0].tolist() == [1, 0, 3, 2]


def test_example_b_replication_and_tie_to_lowest_pack():
    phy2log, log2phy, logcnt = rebalance_experts([[8, 6, 2, 1]], 6, 1, 1, 2)
    assert phy2log.tolist() == [[0, 1, 2, 0, 1, 3]] and logcnt.tolist() == [[2, 2, 1, 1]]
    loads = _gpu_loads([[8, 6, 2, 1]], phy2log, logcnt, 2)
    assert loads.tolist() == [9, 8] and round(_balancedness(loads), 3) == 0.944
    assert sorted(log2phy[0, 0].tolist()) == [0, 3] and log2phy[0, 2].tolist() == [2, -1]  # padded with -1


def test_example_c_hierarchical_and_global():
    w = [[10, 2, 7, 1, 3, 4, 20, 9]]
    phy2log, _, logcnt = rebalance_experts(w, 12, 4, 2, 4)
    assert phy2log.tolist() == [[7, 6, 4, 6, 6, 5, 0, 2, 1, 0, 2, 3]]
    assert logcnt.tolist() == [[2, 1, 2, 1, 1, 1, 3, 1]]
    loads = _gpu_loads(w, phy2log, logcnt, 4)
    assert np.allclose(loads, [56 / 3, 52 / 3, 10.5, 9.5]) and round(_balancedness(loads), 2) == 0.75
    g_phy2log, _, g_logcnt = rebalance_experts(w, 12, 1, 1, 4)  # the global policy: the cost of node locality
    assert round(_balancedness(_gpu_loads(w, g_phy2log, g_logcnt, 4)), 3) == 0.923


def test_deepseek_readme_example():
    w = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log, log2phy, logcnt = rebalance_experts(w, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    for layer, expected in ((0, 0.828), (1, 0.805)):
        loads = _gpu_loads(w[layer:layer + 1], phy2log[layer:layer + 1], logcnt[layer:layer + 1], 8)
        assert round(_balancedness(loads), 3) == expected
    for l in range(2):  # log2phy lists each expert's slots, padded with -1
        for e in range(12):
            slots = log2phy[l, e][log2phy[l, e] >= 0]
            assert sorted(slots.tolist()) == np.flatnonzero(phy2log[l] == e).tolist()


def test_policy_rule_groups_not_divisible_by_nodes_is_global():
    w = np.array([[10, 2, 7, 1, 3, 4, 20, 9]])
    assert np.array_equal(rebalance_experts(w, 12, 2, 4, 4)[0], rebalance_experts(w, 12, 1, 1, 4)[0])


def test_ties_between_experts_sort_by_id():
    # four equal loads: order e0, e1, e2, e3; e2 goes to the lowest-index lightest pack (GPU 0)
    pack, rank = balanced_packing(np.array([[5.0, 5.0, 5.0, 5.0]]), 2)
    assert pack.tolist() == [[0, 1, 0, 1]] and rank.tolist() == [[0, 0, 1, 1]]
    phy2log, rank, logcnt = replicate_experts(np.array([[4.0, 4.0]]), 3)  # argmax tie: the first expert
    assert phy2log.tolist() == [[0, 1, 0]] and logcnt.tolist() == [[2, 1]]
    # many ties (torch.sort and numpy's quicksort both reorder these): equal loads keep ascending ids
    w = np.tile([3.0, 1.0, 3.0, 2.0], 16)[None]
    pack, rank = balanced_packing(w, 32)
    threes = np.flatnonzero(w[0] == 3.0)  # taken first, in id order, one per pack: pack i gets the i-th of them
    assert pack[0, threes].tolist() == list(range(32)) and (rank[0, threes] == 0).all()


@pytest.mark.parametrize("seed", range(5))
def test_invariants_on_random_loads(seed):
    rng = np.random.default_rng(seed)
    w = rng.random((3, 16)) * 100
    phy2log, log2phy, logcnt = rebalance_experts(w, 24, 4, 2, 8)
    for l in range(3):
        assert np.array_equal(np.bincount(phy2log[l], minlength=16), logcnt[l]) and (logcnt[l] >= 1).all()
        # hierarchical: each node's 12 slots hold whole groups of 4 experts, nothing else
        for node in range(2):
            experts = set(phy2log[l, node * 12:(node + 1) * 12].tolist())
            assert all({4 * g, 4 * g + 1, 4 * g + 2, 4 * g + 3} <= experts or not experts & set(range(4 * g, 4 * g + 4))
                       for g in range(4))
    assert log2phy.shape == (3, 16, logcnt.max())
