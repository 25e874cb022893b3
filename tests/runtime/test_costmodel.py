"""Fiddler's placement of missed experts: pure cost-model decisions (CPU-testable)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.runtime.costmodel import Costs, latency, place_misses


def test_expensive_transfer_keeps_misses_on_cpu():
    assert place_misses([1, 1, 1], Costs(cpu_s_per_token=1e-3, gpu_s_per_token=1e-5, transfer_s=1.0)) == [True] * 3


def test_slow_cpu_copies_misses_to_gpu():
    assert place_misses([4, 4], Costs(cpu_s_per_token=1.0, gpu_s_per_token=1e-5, transfer_s=1e-3)) == [False, False]


def test_balanced_costs_split_the_work():
    on_cpu = place_misses([1, 1], Costs(cpu_s_per_token=1.0, gpu_s_per_token=0.0, transfer_s=1.0))
    assert sorted(on_cpu) == [False, True]  # one each side: latency 1 instead of 2


@settings(max_examples=30, deadline=None)
@given(tokens=st.lists(st.integers(1, 64), min_size=13, max_size=15),
       cpu=st.floats(1e-5, 1e-2), gpu=st.floats(1e-6, 1e-3), xfer=st.floats(1e-4, 1e-1))
def test_heuristic_beyond_12_misses_is_near_exhaustive(tokens, cpu, gpu, xfer):
    costs = Costs(cpu, gpu, xfer)
    got = latency(tokens, place_misses(tokens, costs), costs)
    best = min(latency(tokens, list(p), costs) for p in itertools.product((False, True), repeat=len(tokens)))
    assert got <= 1.5 * best + 1e-12
