"""SRP and SCH (arXiv 2505.16056): hand-computed cases and the fast paths against literal implementations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from moekit.analysis import sch_reference, segment_cache_hit_rate, segment_routing_performance, srp_reference
from moekit.analysis.locality import srp_from_histogram, window_count_histogram
from tests.analysis.strategies import traces

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_srp_hand_case():
    # One sequence 0 0 1 0 (K = 1, E = 3), m = 2: windows (0,0) (0,1) (1,0) give counts c = (2,0,0) (1,1,0) (1,1,0).
    # Histogram over (window, expert): c=0: 4, c=1: 4, c=2: 1. actuals = 4 + 2 = 6.
    # tau=0: matches 6, predictions 2*9 = 18 -> F1 = 12/24; tau=1: 6, 2*5 = 10 -> 12/16 = 0.75; tau=2: 2, 2 -> 4/8.
    ids = np.array([[0], [0], [1], [0]])
    r = segment_routing_performance(ids, np.zeros(4, np.int64), 3, [2])
    assert r.f1[0] == pytest.approx(0.75)
    assert (r.tau[0], r.matches[0], r.predictions[0], r.actuals[0], r.windows[0]) == (1, 6, 10, 6, 3)
    hist, n_win = window_count_histogram(ids, np.zeros(4, np.int64), 3, 2)
    assert hist.tolist() == [4, 4, 1] and n_win == 3


def test_srp_windows_stay_inside_sequences():
    # seq A = 0 0 1, seq B = 2 2, m = 2: windows (0,0) (0,1) (2,2) -> c = (2,0,0) (1,1,0) (0,0,2); hist [5, 2, 2].
    # tau=1: matches 6, predictions 8 -> 12/14 = 6/7 (tau=2: 8/10, tau=0: 12/24). The straddling window (1, 2) is
    # excluded; with it the histogram would be [6, 4, 2]. A third sequence of length 1 < m adds no window.
    ids = np.array([[0], [0], [1], [2], [2], [1]])
    seq = np.array([0, 0, 0, 1, 1, 2])
    r = segment_routing_performance(ids, seq, 3, [2])
    assert r.f1[0] == pytest.approx(6 / 7) and r.tau[0] == 1 and r.windows[0] == 3
    assert window_count_histogram(ids, seq, 3, 2)[0].tolist() == [5, 2, 2]


def test_srp_perfect_and_no_window():
    # Every token routes to the same experts: a segment router with tau = m predicts perfectly.
    ids = np.tile([[1, 3]], (10, 1))
    r = segment_routing_performance(ids, np.zeros(10, np.int64), 4, [4, 16])
    assert r.f1[0] == pytest.approx(1.0)
    assert np.isnan(r.f1[1]) and r.tau[1] == -1 and r.windows[1] == 0  # sequence shorter than m=16


def test_srp_from_histogram_formula():
    # hist over c = 0..3 for m = 3: [10, 3, 2, 1] -> actuals 3 + 4 + 3 = 10. tau=2: matches 7, predictions 3*3 = 9,
    # F1 = 14/19; tau=3: 3, 3 -> 6/13; tau=1: 10, 18 -> 20/28. Best: tau = 2.
    f1, tau, matches, predictions, actuals = srp_from_histogram(np.array([10, 3, 2, 1]), 3)
    assert (tau, matches, predictions, actuals) == (2, 7, 9, 10)
    assert f1 == pytest.approx(14 / 19)


@SETTINGS
@given(traces(max_len=20))
def test_srp_fast_equals_literal(trace):
    ids, seq, n_experts = trace
    ms = [1, 2, 3, 5, 8]
    fast = segment_routing_performance(ids, seq, n_experts, ms).f1
    slow = [srp_reference(ids, seq, n_experts, m) for m in ms]
    np.testing.assert_allclose(fast, slow, atol=1e-12)


def test_sch_hand_case():
    # 0 1 2 0, C = 2, K = 1. Tokens 0, 1 fill free space (hits). Token 2 misses and evicts by (uses in window, recency):
    # m = 2: window = tokens 2..3 holds one use of 0 and none of 1 -> evict 1; token 3 hits -> 3/4.
    # m = 1: window = token 2 only -> both 0 uses, tie broken by recency -> evict 0; token 3 misses -> 2/4.
    ids = np.array([[0], [1], [2], [0]])
    sch = segment_cache_hit_rate(ids, np.zeros(4, np.int64), 3, [2], [1, 2])
    np.testing.assert_allclose(sch[:, 0], [0.5, 0.75])


def test_sch_consumes_current_use_and_counts_pending_ones():
    # K = 2, C = 2, m = 2, tokens [0 1] [2 1] [0 3]. Token 1: 1 hit, 2 misses. Inserting 2 evicts among {0, 1}:
    # window tokens 1..2; 0 has one use (token 2); 1 has one use (token 1, not yet consumed since 1 comes after 2 in the
    # token): tie on count, recency: 0 (last use 0) older than 1 (last use 1) -> evict 0. Token 2: 0 misses, 3 misses.
    # Hits: 2 + 1 + 0 = 3 of 6. (Had 1's pending use been ignored, 1 would be evicted instead and 0 would hit: 4/6.)
    ids = np.array([[0, 1], [2, 1], [0, 3]])
    seq = np.zeros(3, np.int64)
    assert segment_cache_hit_rate(ids, seq, 4, [2], [2])[0, 0] == pytest.approx(3 / 6)
    assert sch_reference(ids, seq, 4, 2, 2) == pytest.approx(3 / 6)


@SETTINGS
@given(traces(max_len=20))
def test_sch_fast_equals_literal(trace):
    ids, seq, n_experts = trace
    ms, caps = [1, 2, 3, 5, 8], np.arange(1, n_experts + 2)
    fast = segment_cache_hit_rate(ids, seq, n_experts, caps, ms)  # [M, C]
    slow = [[sch_reference(ids, seq, n_experts, m, int(c)) for c in caps] for m in ms]
    np.testing.assert_allclose(fast, slow, atol=1e-12)


@SETTINGS
@given(traces(max_len=30))
def test_sch_monotone_and_cold_fill(trace):
    ids, seq, n_experts = trace
    sch = segment_cache_hit_rate(ids, seq, n_experts, np.arange(1, n_experts + 1), [1, 4, 16])
    for row in sch:
        if not np.isnan(row).any():
            assert (np.diff(row) >= -1e-12).all()
            assert row[-1] == pytest.approx(1.0)  # capacity E: nothing is ever evicted, free fill counts as hits


def test_sch_skips_sequences_shorter_than_m():
    rng = np.random.default_rng(1)
    long_ids = np.argsort(rng.random((12, 5)), axis=1)[:, :2]
    short_ids = np.argsort(rng.random((3, 5)), axis=1)[:, :2]
    ids = np.vstack([long_ids, short_ids])
    seq = np.repeat([0, 1], [12, 3])
    both = segment_cache_hit_rate(ids, seq, 5, [2, 4], [4])
    alone = segment_cache_hit_rate(long_ids, np.zeros(12, np.int64), 5, [2, 4], [4])
    np.testing.assert_allclose(both, alone)
    assert np.isnan(segment_cache_hit_rate(short_ids, np.zeros(3, np.int64), 5, [2], [4])).all()


def test_sch_layers_batched_equal_separate():
    rng = np.random.default_rng(2)
    ids = np.stack([np.argsort(rng.random((50, 8)), axis=1)[:, :3] for _ in range(2)])  # [L, T, K]
    seq = np.repeat([0, 1], [30, 20])
    both = segment_cache_hit_rate(ids, seq, 8, [3, 6], [4, 16])
    assert both.shape == (2, 2, 2)
    for layer in range(2):
        np.testing.assert_allclose(both[layer], segment_cache_hit_rate(ids[layer], seq, 8, [3, 6], [4, 16]))


@pytest.mark.parametrize("kwargs", [{"segment_lengths": [0]}, {"segment_lengths": []}, {"n_experts": 2}])
def test_bad_input_raises(kwargs):
    args = {"ids": np.array([[0, 1], [1, 2]]), "seq_id": np.array([0, 0]), "n_experts": 3, "segment_lengths": [2]}
    args.update(kwargs)
    with pytest.raises(ValueError):
        segment_routing_performance(**args)
    with pytest.raises(ValueError):
        segment_cache_hit_rate(args["ids"], args["seq_id"], args["n_experts"], [2], args["segment_lengths"])


@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("n_experts", [1, 6, 32])
def test_packed_count_histogram_equals_bincount(m, n_experts):
    from moekit.analysis.locality import _count_histogram

    counts = np.random.default_rng(m * 100 + n_experts).integers(0, m + 1, (n_experts, 500)).astype(np.uint16)
    assert _count_histogram(counts, m).tolist() == np.bincount(counts.ravel(), minlength=m + 1).tolist()
