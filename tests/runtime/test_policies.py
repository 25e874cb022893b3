"""Cache policies: one behaviour per test, Belady optimal on random streams, budget errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.errors import UserError
from moekit.runtime import policies
from moekit.runtime.simulate import replay_layer


def steps(policy, seq, weights=None):
    """Feed steps (lists of experts) to a policy; returns (hits, evicted) per step."""
    out = []
    for i, experts in enumerate(seq):
        policy.begin_step(np.array([experts]), None if weights is None else np.array([weights[i]]))
        out.append(policy.access(sorted(experts)))
    return out


def test_cold_miss_counts_as_miss():
    p = policies.make("lru", 2)
    assert steps(p, [[3]]) == [([False], [])]
    assert p.counters() == {"hits": 0, "misses": 1, "evictions": 0}


def test_warm_hit():
    p = policies.make("lru", 2)
    steps(p, [[3], [3]])
    assert p.counters() == {"hits": 1, "misses": 1, "evictions": 0}


def test_lru_evicts_least_recent():
    p = policies.make("lru", 2)
    assert steps(p, [[1], [2], [1], [3]])[-1] == ([False], [2])


def test_lfu_evicts_least_frequent_counts_survive_eviction():
    p = policies.make("lfu", 2)
    # 1 used 3x, 2 once; 3 evicts 2; 2 comes back and evicts 3 (count 1, older) not 1 (count 3)
    res = steps(p, [[1], [1], [1], [2], [3], [2]])
    assert res[4] == ([False], [2]) and res[5] == ([False], [3])


def test_lfru_frequency_over_age():
    p = policies.make("lfru", 2)
    steps(p, [[1], [1], [1], [1], [2]])  # 1: 4 uses, last at step 4 ; 2: 1 use at step 5
    p.begin_step(np.array([[3]]))  # step 6: 1 -> 4/(6-4+1) = 1.33, 2 -> 1/(6-5+1) = 0.5
    assert p.access([3]) == ([False], [2])


def test_score_evicts_lowest_decayed_weight():
    p = policies.make("score", 2)
    # S <- 0.5 * w + 0.5 * S, updated for every expert at each step start (the third step decays both):
    # S1 = 0.45 -> 0.275 -> 0.1375 ; S2 = 0.1 -> 0.05 ; so 3 evicts 2
    res = steps(p, [[1], [1, 2], [3]], weights=[[0.9], [0.1, 0.2], [1.0]])
    assert p.score[1] == pytest.approx(0.5 * (0.5 * 0.1 + 0.5 * (0.5 * 0.9))) and p.score[2] == pytest.approx(0.05)
    assert res[-1] == ([False], [2])


def test_step_does_not_evict_its_own_experts():
    p = policies.make("lru", 2)
    steps(p, [[1], [2]])
    assert steps(p, [[1, 3]]) == [([True, False], [2])]  # 1 is older than 2 but needed now


def test_belady_evicts_farthest_next_use():
    seq = [[1], [2], [3], [1], [2]]
    p = policies.make("belady", 2, steps=seq)
    assert steps(p, seq)[2] == ([False], [2])  # 1 is needed at step 4, 2 at step 5


def test_belady_needs_the_future():
    with pytest.raises(UserError, match="offline"):
        policies.make("belady", 2)


def test_unknown_policy_lists_the_known():
    with pytest.raises(UserError, match="lfru"):
        policies.make("fifo", 2)


def test_register_adds_a_policy():
    @policies.register("mru_test")
    class MRU(policies.LRU):
        def priority(self, e):
            return -self.last[e]

    p = policies.make("mru_test", 2)
    assert steps(p, [[1], [2], [3]])[-1] == ([False], [2])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), cap=st.integers(2, 8), k=st.integers(1, 2), e=st.integers(4, 12))
def test_belady_is_optimal_on_random_streams(seed, cap, k, e):
    rng = np.random.default_rng(seed)
    zipf = rng.zipf(1.3, size=(200, k)) % e  # skewed, as real routing is
    ids = np.stack([rng.permutation(e)[:k] if len(set(r)) < k else r for r in zipf])
    w = rng.random(ids.shape)
    best = replay_layer(ids, "belady", cap).hits
    for name in ("lru", "lfu", "lfru", "score"):
        assert replay_layer(ids, name, cap, w).hits <= best, name
