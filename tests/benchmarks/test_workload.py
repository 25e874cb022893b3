"""The loop check the offload benchmark applies to generated tokens (benchmarks/_workload.py)."""

from __future__ import annotations

import numpy as np

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
