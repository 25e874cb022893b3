"""The `predictive` cache policy: Belady with a perfect forecast, LFRU without one, its eviction and tie rules."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.runtime import policies
from moekit.runtime.simulate import oracle_forecasts, replay_layer


def _stream(seed: int, T: int, k: int, e: int) -> np.ndarray:
    """[T, k] skewed routing ids, distinct within a token (as top-k routing is)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, e + 1) ** 1.2
    return np.stack([rng.choice(e, size=k, replace=False, p=weights / weights.sum()) for _ in range(T)])


def _steps(seed: int, T: int) -> list[int]:
    """A prefill of several tokens then one-token decode steps, as the runtime's calls group them."""
    first = int(np.random.default_rng(seed).integers(1, 12))
    return [first] + [1] * (T - first)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), cap=st.integers(2, 10), k=st.integers(1, 3), e=st.integers(4, 14))
def test_a_perfect_forecast_makes_predictive_belady(seed, cap, k, e):
    ids, sizes = _stream(seed, 150, k, e), _steps(seed, 150)
    oracle = oracle_forecasts(ids, e, sizes)
    got = replay_layer(ids, "predictive", cap, step_sizes=sizes, forecasts=oracle)
    want = replay_layer(ids, "belady", cap, step_sizes=sizes)
    assert got.counters() == want.counters()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), cap=st.integers(2, 10), k=st.integers(1, 3), e=st.integers(4, 14))
def test_without_a_forecast_predictive_is_lfru(seed, cap, k, e):
    ids, sizes = _stream(seed, 150, k, e), _steps(seed, 150)
    got, want = policies.make("predictive", cap), policies.make("lfru", cap)
    bounds = np.cumsum([0] + sizes)
    for a, b in zip(bounds[:-1], bounds[1:]):
        experts = sorted(set(ids[a:b].reshape(-1).tolist()))
        for p in (got, want):
            p.begin_step(ids[a:b])
        got.forecast(None)
        assert got.access(experts) == want.access(experts)  # the same hits and victims, step by step
    assert got.counters() == want.counters()


def _warm(p, seq):
    for experts in seq:
        p.begin_step(np.array([experts]))
        p.access(sorted(experts))


def test_evicts_the_farthest_forecast():
    p = policies.make("predictive", 3)
    _warm(p, [[0], [1], [2]])
    p.begin_step(np.array([[3]]))
    p.forecast(np.array([1.0, 5.0, 2.0, 0.0]))  # expert 1 is predicted farthest
    assert p.access([3]) == ([False], [1])


def test_equal_forecasts_fall_back_to_lfru():
    p, ref = policies.make("predictive", 3), policies.make("lfru", 3)
    seq = [[0], [0], [0], [1], [2], [2]]  # LFRU: 1 has the lowest uses / age
    _warm(p, seq)
    _warm(ref, seq)
    for q in (p, ref):
        q.begin_step(np.array([[3]]))
    p.forecast(np.array([4.0, 4.0, 4.0, 0.0]))
    assert p.access([3]) == ref.access([3]) == ([False], [1])


def test_a_forecast_holds_for_one_step():
    p = policies.make("predictive", 2)
    _warm(p, [[0], [1]])
    p.begin_step(np.array([[2]]))
    p.forecast(np.array([9.0, 0.0, 0.0]))
    p.access([2])  # evicts 0
    assert p.next_use is None
