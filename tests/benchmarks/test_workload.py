"""The workload checks the offload benchmark applies (benchmarks/_workload.py): looping tokens, static routing, a replayed
run against its trace."""

from __future__ import annotations

import numpy as np
import pytest

from tests.benchmarks.helpers import bench_module

workload = bench_module("_workload")


def test_two_token_cycle_of_a_random_model_is_looping():
    r = workload.repetition([6405, 5885] * 12)  # what the synthetic model generated under greedy decoding
    assert r["looping"] and r["cycle_period"] == 2 and r["cycle_tokens"] == 24
    assert r["distinct_2"] == 2 / 23


def test_a_loop_after_a_varied_start_is_looping():
    tokens = list(range(100, 110)) + [7, 8, 9] * 5  # 10 distinct tokens, then a 3-cycle for 15 of 25
    r = workload.repetition(tokens)
    assert (r["cycle_period"], r["cycle_tokens"]) == (3, 15) and r["looping"]
    assert r["distinct_2"] >= workload.MIN_DISTINCT_2  # only the periodic-suffix criterion catches this one


def test_varied_tokens_and_one_repeated_phrase_are_not_looping():
    assert not workload.looping(list(range(24)))
    phrase = [5, 6, 7, 8]
    tokens = [1, 2, 3] + phrase + [9, 10, 11, 12, 13] + phrase + [14, 15, 16, 17, 18, 19, 20, 21]
    r = workload.repetition(tokens)
    assert not r["looping"] and r["cycle_tokens"] == 0  # the phrase recurs, but not back to back at the end


def test_periodic_suffix_needs_two_full_periods_and_prefers_the_shortest():
    assert workload.periodic_suffix([1, 2, 3, 1, 2]) == (0, 0)  # 1 2 3 | 1 2: not two full periods
    assert workload.periodic_suffix([9, 4, 4, 4, 4]) == (1, 4)
    assert workload.periodic_suffix([1, 2, 1, 2, 1, 2, 1, 2]) == (2, 8)  # also 4-periodic: the shortest period wins


def test_low_distinct_bigrams_alone_is_looping():
    tokens = [1, 2, 1, 2, 3, 1, 2, 1, 2, 3, 1, 2, 1, 2, 3, 4]  # ends on a fresh token: no periodic suffix
    r = workload.repetition(tokens)
    assert r["cycle_tokens"] < len(tokens) / 2 and r["distinct_2"] < workload.MIN_DISTINCT_2 and r["looping"]


def test_consecutive_reuse_by_hand():
    steps = [np.array([[0, 1, 2, 3]]), np.array([[2, 3, 4, 5]]), np.array([[2, 3, 4, 5]]), np.array([[6, 7, 8, 9]])]
    assert workload.consecutive_reuse(steps) == (2 / 4 + 4 / 4 + 0 / 4) / 3


def test_static_routing_is_flagged_and_random_routing_is_not():
    rng = np.random.default_rng(0)
    e, k, steps = 64, 8, 48
    random_steps = [[rng.choice(e, k, replace=False) for _ in range(steps)] for _ in range(4)]  # [L][steps] -> [K]
    r = workload.routing_reuse(random_steps, e)
    assert abs(r["mean"] - k / e) < 0.05 and r["chance"] == k / e and not r["static"]
    # a collapsed router: the same 8 experts but one for every token
    collapsed = [[np.r_[np.arange(7), 7 + s % 2] for s in range(steps)] for _ in range(4)]
    r = workload.routing_reuse(collapsed, e)
    assert r["mean"] == 7 / 8 and r["static"]


def sticky_routing(rng, tokens: int, experts: int, k: int, keep: float = 0.6) -> np.ndarray:
    """[tokens, k] ids where each expert stays for the next token with probability `keep` (a routing with locality)."""
    rows, cur = [], list(rng.choice(experts, k, replace=False))
    for _ in range(tokens):
        nxt = [e for e in cur if rng.random() < keep]
        while len(nxt) < k:
            e = int(rng.integers(experts))
            if e not in nxt:
                nxt.append(e)
        rows.append(nxt)
        cur = nxt
    return np.array(rows)


def test_a_faithful_replay_keeps_the_traces_locality():
    """A run whose rows are the mapped trace rows (any slot order) keeps SRP exactly and SCH within the bound, for
    E and K both doubled, and for E x3 / x4 with K doubled (blocks wider than the share of them a token uses)."""
    from moekit.routing.replay import map_ids

    rng = np.random.default_rng(0)
    trace = [[sticky_routing(rng, 40, 16, 4) for _ in range(2)] for _ in range(2)]  # [L][prompt] -> [T_p, 4]
    for experts in (32, 48, 64):
        run = [[rng.permuted(map_ids(p, 16, experts, 8), axis=1) for p in layer] for layer in trace]
        r = workload.locality_kept(trace, run, 16, experts)
        assert r["kept"] and r["follows"] == 1.0 and r["max_srp_diff"] == 0.0, experts
        assert 0 < r["max_sch_diff"] <= workload.MAX_LOCALITY_DIFF
        assert r["per_layer"][0]["capacities_trace"] == [8, 16] and r["per_layer"][0]["capacities_model"] == [16, 32]


def test_a_replay_off_its_trace_or_a_lossy_mapping_is_not_kept():
    from moekit.routing.replay import map_ids

    rng = np.random.default_rng(1)
    trace = [[sticky_routing(rng, 40, 16, 4) for _ in range(2)]]
    # one row late (a cursor not reset between prompts): same locality, but the rows are not the trace's
    late = [[map_ids(np.roll(p, 1, axis=0), 16, 32, 8) for p in trace[0]]]
    r = workload.locality_kept(trace, late, 16, 32)
    assert r["follows"] < 0.5 and not r["kept"]
    # the model's own random routing: no locality left
    own = [[np.array([rng.choice(32, 8, replace=False) for _ in range(40)]) for _ in range(2)]]
    assert workload.locality_kept(trace, own, 16, 32)["max_srp_diff"] > 0.1
    # fewer experts than the trace: blocks collapse and fill-ups dilute the windows, so locality is visibly lost
    collapsed = [[map_ids(p, 16, 4, 3) for p in trace[0]]]
    r = workload.locality_kept(trace, collapsed, 16, 4)
    assert r["follows"] == 1.0 and not r["kept"] and r["max_srp_diff"] > workload.MAX_LOCALITY_DIFF


def test_max_diff_counts_a_window_lost_on_one_side():
    assert workload._max_diff([0.5, float("nan")], [0.4, float("nan")]) == pytest.approx(0.1)
    assert workload._max_diff([0.5, 0.3], [0.5, float("nan")]) == 1.0
