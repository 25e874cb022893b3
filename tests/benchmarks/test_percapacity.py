"""The per-capacity baseline of benchmarks/analysis_speed.py gives the reference simulations' hits exactly."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.analysis import _reference as ref
from tests.benchmarks.helpers import bench_module

percapacity = bench_module("_percapacity")


def _reference_hits(rows, capacity, policy, window):
    state: dict = {}
    prio = {"lru": lambda: ref.lru_priority(state), "lfu": lambda: ref.lfu_priority(state),
            "belady": lambda: ref.belady_priority(rows, state), "opt": lambda: ref.opt_priority(rows, state),
            "sch": lambda: ref.sch_priority(rows, window, state)}[policy]()
    return ref.simulate_hits(rows, capacity, prio, state, bypass=policy == "opt")


@pytest.mark.parametrize("policy, window", [("lru", 0), ("lfu", 0), ("belady", 0), ("opt", 0), ("sch", 4),
                                            ("sch", 16)])
def test_baseline_equals_the_reference(policy, window):
    rng = np.random.default_rng(0)
    for trial in range(12):
        e, k, t = 12, 3, int(rng.integers(16, 48))
        local = rng.random() < 0.5  # half the sequences reuse the previous token's experts often
        rows, prev = [], rng.choice(e, k, replace=False)
        for _ in range(t):
            row = prev if local and rng.random() < 0.6 else rng.choice(e, k, replace=False)
            rows.append([int(x) for x in rng.permutation(row)])
            prev = np.array(rows[-1])
        for capacity in (k, 2 * k, 3 * k):
            want = _reference_hits(rows, capacity, policy, window)
            assert percapacity.hits(rows, capacity, policy, window) == want, (policy, window, trial, capacity)
