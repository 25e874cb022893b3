"""LRU / LFU / Belady / opt hit-rate curves: hand-computed cases, the fast stack kernel against the literal per-capacity
simulations, and the invariants (ceilings, monotonicity, cold fill)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from moekit.analysis import cache_hit_rate_reference, cache_hit_rates, capacities_for, segment_cache_hit_rate
from tests.analysis.strategies import traces

POLICIES = ("lru", "lfu", "belady", "opt")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one_seq(rows):
    ids = np.array(rows, dtype=np.int64).reshape(len(rows), -1)
    return ids, np.zeros(len(rows), dtype=np.int64)


def test_hand_case_recency_vs_future():
    # K = 1, C = 2, trace 0 1 2 0. Tokens 0 and 1 fill free space (hits). Token 2 (expert 2) misses and must evict:
    # LRU evicts 0 (used longest ago), LFU ties on count 1 and evicts the older, 0; Belady evicts 1 (never used again).
    # Token 3 (expert 0): miss for LRU/LFU, hit for Belady/opt.
    ids, seq = one_seq([0, 1, 2, 0])
    expect = {"lru": 2 / 4, "lfu": 2 / 4, "belady": 3 / 4, "opt": 3 / 4}
    for policy, rate in expect.items():
        assert cache_hit_rates(ids, seq, 3, [2], policy)[0] == pytest.approx(rate), policy


def test_hand_case_frequency():
    # 0 0 1 2 0, C = 2: at token 3 LRU evicts 0 (last used at 1 < 2) and misses it at token 4 -> 3/5;
    # LFU keeps 0 (2 uses vs 1) -> 4/5; Belady keeps 0 (used again) -> 4/5.
    ids, seq = one_seq([0, 0, 1, 2, 0])
    assert cache_hit_rates(ids, seq, 3, [2], "lru")[0] == pytest.approx(3 / 5)
    assert cache_hit_rates(ids, seq, 3, [2], "lfu")[0] == pytest.approx(4 / 5)
    assert cache_hit_rates(ids, seq, 3, [2], "belady")[0] == pytest.approx(4 / 5)


def test_token_judged_before_insertion():
    # K = 2, C = 2, tokens [0 1] [2 0] [1 2], LRU. Token 0: both fill free space (2 hits). Token 1: 0 was cached before
    # the token -> hit, although inserting 2 first evicts 0 (LRU) and re-inserting 0 then evicts 1; 2 misses.
    # Cache {2, 0}. Token 2: 1 misses, 2 hits. Hits 2 + 1 + 1 = 4 of 6.
    ids, seq = one_seq([[0, 1], [2, 0], [1, 2]])
    assert cache_hit_rates(ids, seq, 3, [2], "lru")[0] == pytest.approx(4 / 6)
    assert cache_hit_rate_reference(ids, seq, 3, 2, "lru") == pytest.approx(4 / 6)


def test_lfu_can_beat_plain_belady_but_not_opt():
    # Tokens [0 2] [2 1] [3 1] [1 2], C = 2. LFU at token 2 inserts 3 (evicting 1), then re-inserts 1 (evicting 3, the
    # least used): 1 counted a hit, 3 effectively not kept, so token 3 hits twice: 2 + 1 + 1 + 2 = 6/8. Belady MIN at
    # token 2 must keep 3 and evicts 2 (next use farthest): token 3 hits once -> 5/8. opt keeps {1, 2} -> 6/8.
    ids, seq = one_seq([[0, 2], [2, 1], [3, 1], [1, 2]])
    assert cache_hit_rates(ids, seq, 4, [2], "lfu")[0] == pytest.approx(6 / 8)
    assert cache_hit_rates(ids, seq, 4, [2], "belady")[0] == pytest.approx(5 / 8)
    assert cache_hit_rates(ids, seq, 4, [2], "opt")[0] == pytest.approx(6 / 8)


def test_per_sequence_mean_and_fresh_cache():
    # Two sequences: [0 1 0] at C = 1 -> cold hit, miss, miss = 1/3; [2 2] -> 2/2. Mean (1/3 + 1) / 2 = 2/3.
    # A cache carried over from the first sequence would differ (2 would be a cold miss at C = 1).
    ids = np.array([[0], [1], [0], [2], [2]])
    seq = np.array([5, 5, 5, 9, 9])
    assert cache_hit_rates(ids, seq, 3, [1], "lru")[0] == pytest.approx(2 / 3)


@SETTINGS
@given(traces())
def test_fast_equals_literal_simulation(trace):
    ids, seq, n_experts = trace
    caps = np.arange(1, n_experts + 2)
    for policy in POLICIES:
        fast = cache_hit_rates(ids, seq, n_experts, caps, policy)
        slow = [cache_hit_rate_reference(ids, seq, n_experts, int(c), policy) for c in caps]
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12, err_msg=policy)


def _exhaustive_optimum(rows, capacity):
    """Best hit count over all cache trajectories S_t subset of S_{t-1} + R_t, |S_t| <= C (hits = |R_t & S_{t-1}|),
    plus the convention's free-fill hits (first C distinct experts), by dynamic programming over cache contents."""
    seen, cold = set(), 0
    for row in rows:
        for x in row:
            cold += x not in seen and len(seen) < capacity
            seen.add(x)
    best = {frozenset(): 0}
    for row in rows:
        nxt = {}
        for cached, value in best.items():
            pool = sorted(cached | set(row))
            for r in range(min(capacity, len(pool)) + 1):
                for keep in itertools.combinations(pool, r):
                    key = frozenset(keep)
                    nxt[key] = max(nxt.get(key, -1), value + len(cached & set(row)))
        best = nxt
    return (max(best.values()) + cold) / (len(rows) * len(rows[0]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(max_experts=5, max_k=3, max_len=6, max_seqs=1))
def test_opt_is_the_exhaustive_optimum_and_bounds_every_policy(trace):
    ids, seq, n_experts = trace
    caps = np.arange(ids.shape[1], n_experts + 1)
    optimum = np.array([_exhaustive_optimum(ids.tolist(), int(c)) for c in caps])
    np.testing.assert_allclose(cache_hit_rates(ids, seq, n_experts, caps, "opt"), optimum, atol=1e-12)
    for policy in ("lru", "lfu", "belady"):
        assert (cache_hit_rates(ids, seq, n_experts, caps, policy) <= optimum + 1e-12).all(), policy
    sch = segment_cache_hit_rate(ids, seq, n_experts, caps, [1, 2, 4])  # NaN where the sequence is shorter than m
    assert (np.isnan(sch) | (sch <= optimum + 1e-12)).all()


@SETTINGS
@given(traces(max_experts=9, max_k=3, max_len=30))
def test_ceilings_and_monotonicity(trace):
    ids, seq, n_experts = trace
    top_k = ids.shape[1]
    caps = np.arange(1, n_experts + 1)
    rates = {p: cache_hit_rates(ids, seq, n_experts, caps, p) for p in POLICIES}
    for policy, r in rates.items():
        assert (np.diff(r) >= -1e-12).all(), f"{policy} not monotone in capacity"  # stack algorithms: nested caches
        assert (rates["opt"] >= r - 1e-12).all(), policy
    at_least_k = caps >= top_k
    assert (rates["belady"][at_least_k] >= rates["lru"][at_least_k] - 1e-12).all()  # LRU keeps whole tokens
    if top_k == 1:  # no within-token effects: every policy keeps what it inserts, and MIN is optimal among those
        assert (rates["belady"] >= rates["lfu"] - 1e-12).all()
        shortest = np.unique(seq, return_counts=True)[1].min()
        sch = segment_cache_hit_rate(ids, seq, n_experts, caps, [m for m in (1, 3, 8) if m <= shortest])
        assert (sch <= rates["belady"] + 1e-12).all()  # same sequences averaged (none shorter than m)


@SETTINGS
@given(traces())
def test_capacity_covering_all_experts_is_cold_fill_only(trace):
    ids, seq, n_experts = trace
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    distinct = max(len(np.unique(part)) for part in np.split(ids, starts[1:]))
    for policy in POLICIES:
        # With capacity >= distinct experts per sequence nothing is evicted; free fill counts as hits -> 1.0.
        assert cache_hit_rates(ids, seq, n_experts, [distinct, n_experts, n_experts + 3], policy) == pytest.approx(1.0)


def test_layers_batched_equal_separate():
    rng = np.random.default_rng(0)
    ids = np.stack([np.argsort(rng.random((40, 6)), axis=1)[:, :2] for _ in range(3)])  # [L, T, K]
    seq = np.repeat([0, 1, 2], [10, 25, 5])
    caps = capacities_for(2)
    for policy in POLICIES:
        both = cache_hit_rates(ids, seq, 6, caps, policy)
        assert both.shape == (3, 4)
        for layer in range(3):
            np.testing.assert_allclose(both[layer], cache_hit_rates(ids[layer], seq, 6, caps, policy))


def test_capacities_for():
    assert capacities_for(4).tolist() == [4, 8, 12, 16]
    assert capacities_for(2, (1, 3)).tolist() == [2, 6]


@pytest.mark.parametrize("bad", [
    {"policy": "fifo"}, {"capacities": [0]}, {"capacities": []}, {"ids": np.array([[0, 0]])},
    {"ids": np.array([[0, 5]])}, {"ids": np.array([0, 1])}, {"seq_id": np.array([0, 1, 0])},
    {"ids": np.array([[0.0, 1.0]])}, {"ids": np.zeros((0, 2), dtype=np.int64)},
])
def test_bad_input_raises(bad):
    args = {"ids": np.array([[0, 1], [1, 2], [2, 0]]), "seq_id": np.array([0, 0, 1]), "capacities": [2],
            "policy": "lru"}
    args.update(bad)
    if args["ids"].ndim == 2 and args["ids"].shape[0] != args["seq_id"].shape[0]:
        args["seq_id"] = np.zeros(args["ids"].shape[0], dtype=np.int64)
    with pytest.raises(ValueError):
        cache_hit_rates(args["ids"], args["seq_id"], 3, args["capacities"], args["policy"])
