"""IOPool: demand reads are served before queued prefetches, cancelled reads never run, errors reach the caller."""

from __future__ import annotations

import threading

import pytest

from moekit.runtime.io import DEMAND, PREFETCH, IOPool


def test_demand_overtakes_queued_prefetches_and_cancel_skips():
    pool = IOPool(1)
    gate, order = threading.Event(), []
    blocker = pool.submit(gate.wait)  # occupies the only thread while the queue fills
    prefetches = [pool.submit(order.append, f"p{i}", priority=PREFETCH) for i in range(3)]
    prefetches[1].cancel()
    demand = pool.submit(order.append, "d", priority=DEMAND)
    gate.set()
    for f in [blocker, demand, prefetches[0], prefetches[2]]:
        f.result(timeout=5)
    assert order == ["d", "p0", "p2"]  # demand first, then prefetches in submission order, the cancelled one skipped
    assert prefetches[1].cancelled()
    pool.shutdown()


def test_errors_reach_the_waiting_caller_and_the_pool_survives():
    pool = IOPool(2)
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(timeout=5)
    assert pool.submit(lambda: 7).result(timeout=5) == 7
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: 0)


class _Job:
    """A job of n steps recording them in `log`; `gate` holds its first step until released."""

    def __init__(self, name, n, log, gate=None):
        self.name, self.n, self.log, self.gate, self.i = name, n, log, gate, 0
        self.started = threading.Event()

    def step(self):
        self.started.set()
        if self.gate is not None and self.i == 0:
            self.gate.wait()
        self.log.append(f"{self.name}{self.i}")
        self.i += 1
        return self.i == self.n

    def result(self):
        return self.name


def test_demand_reads_overtake_a_chunked_prefetch_between_steps():
    pool, log, gate = IOPool(1), [], threading.Event()
    steps = _Job("p", 3, log, gate)
    job = pool.submit_steps(steps, finish=str.upper)
    assert steps.started.wait(5)  # the only worker is inside step 0, held by the gate
    demand = pool.submit(log.append, "d")
    gate.set()
    assert job.result(timeout=5) == "P" and demand.result(timeout=5) is None
    assert log.index("d") < log.index("p2"), log  # served between two steps, not after the whole prefetch
    pool.shutdown()


def test_cancelling_a_started_chunked_prefetch_stops_it():
    import concurrent.futures

    pool, log, gate = IOPool(1), [], threading.Event()
    steps = _Job("p", 50, log, gate)
    job = pool.submit_steps(steps, finish=str)
    assert steps.started.wait(5)
    blocker = threading.Event()
    held = pool.submit(blocker.wait, priority=DEMAND)  # runs right after the prefetch's first step
    gate.set()
    while not held.running():
        threading.Event().wait(0.001)
    assert not job.cancel()  # running: cannot be cancelled the usual way, but stops at its next step
    blocker.set()
    with pytest.raises(concurrent.futures.CancelledError):
        job.result(timeout=5)
    assert log == ["p0"]
    pool.shutdown()


def test_a_promoted_prefetch_goes_before_other_prefetches_and_speculation_is_limited():
    pool, log, gate = IOPool(2, speculative=1), [], threading.Event()
    first = _Job("a", 2, log, gate)
    fa = pool.submit_steps(first, finish=str)
    assert first.started.wait(5)  # the one speculative slot is taken by a0; b and c wait although a thread is free
    fb = pool.submit_steps(_Job("b", 2, log), finish=str)
    fc = pool.submit_steps(_Job("c", 2, log), finish=str)
    threading.Event().wait(0.05)
    assert log == []  # a0 is still held: nothing else speculative ran on the second thread
    pool.promote(fc)  # c's layer asked for it: it is a demand read now, served by the free thread
    assert fc.result(timeout=5) == "c"
    assert log == ["c0", "c1"]
    gate.set()
    for f in (fa, fb):
        f.result(timeout=5)
    pool.shutdown()
