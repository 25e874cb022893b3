"""Expert reads on a few threads, demand before speculation.

A thread pool serves its queue first come, first served: a prefetch issued for layer l+1 while layer l computes would
then delay layer l+1's demand reads queued after it. `IOPool` orders its queue by priority (demand reads first) and
caps the speculative work in flight (`speculative`, default 1), so prefetching only uses what the demand reads leave.
A prefetch is a job of steps (`submit_steps`: an expert read in 4 MiB chunks, store.ExpertRead) re-queued after each
step, so a demand read waits for at most one chunk; `promote` turns a prefetch its layer now needs into a demand read
(its remaining chunks go first), and `cancel()` stops a mispredicted one, queued or between two chunks.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import CancelledError, Future

DEMAND, PREFETCH = 0, 1


class IOPool:
    def __init__(self, threads: int, speculative: int = 1):
        self.speculative = speculative  # prefetch steps in flight at most: speculation takes what demand leaves
        self._running_speculative = 0
        self._heap: list = []  # (priority, sequence, future, fn, args)
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"moekit-io-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args, priority: int = DEMAND) -> Future:
        fut = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("IOPool is shut down")
            heapq.heappush(self._heap, (priority, next(self._seq), fut, fn, args))
            self._cv.notify()
        return fut

    def submit_steps(self, job, finish, priority: int = PREFETCH) -> Future:
        """A job of steps (`job.step()` -> done?, then `finish(job.result())` is the future's value), re-queued after
        each step: a demand read submitted meanwhile is served before the next step. cancel() also stops a job that
        has started, between two steps (its future then holds a CancelledError)."""
        fut = _StepsFuture()
        with self._cv:
            if self._closed:
                raise RuntimeError("IOPool is shut down")
            heapq.heappush(self._heap, (priority, next(self._seq), fut, _Steps(job, finish, priority), ()))
            self._cv.notify()
        return fut

    def promote(self, fut: Future) -> None:
        """A prefetch became a demand read (its layer asked for it): its remaining steps go at demand priority."""
        with self._cv:
            for i, (_, seq, f, fn, args) in enumerate(self._heap):
                if f is fut:
                    fn.priority = DEMAND
                    self._heap[i] = (DEMAND, seq, f, fn, args)
                    heapq.heapify(self._heap)
                    self._cv.notify()
                    return
            if isinstance(fut, _StepsFuture):  # being read now: the next step is queued as a demand read
                fut.promoted = True

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._ready() and not (self._closed and not self._heap):
                    self._cv.wait()
                if not self._heap:
                    return
                priority, _, fut, fn, args = heapq.heappop(self._heap)
                speculative = priority != DEMAND
                self._running_speculative += speculative
            try:
                if isinstance(fn, _Steps):
                    self._step(priority, fut, fn)
                elif fut.set_running_or_notify_cancel():  # else cancelled while queued
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
                        fut.set_exception(err)
            finally:
                if speculative:
                    with self._cv:
                        self._running_speculative -= 1
                        self._cv.notify_all()

    def _ready(self) -> bool:
        return bool(self._heap) and (self._heap[0][0] == DEMAND or self._running_speculative < self.speculative)

    def _step(self, priority: int, fut: _StepsFuture, steps: _Steps) -> None:
        if not steps.started:
            if not fut.set_running_or_notify_cancel():
                return
            steps.started = True
        if fut.stopped:
            fut.set_exception(CancelledError())
            return
        try:
            if not steps.job.step():
                if fut.promoted:
                    steps.priority = DEMAND
                with self._cv:  # behind what is queued at this priority, after any demand read
                    heapq.heappush(self._heap, (steps.priority, next(self._seq), fut, steps, ()))
                    self._cv.notify()
                return
            fut.set_result(steps.finish(steps.job.result()))
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            fut.set_exception(err)

    def shutdown(self, wait: bool = True) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if wait:
            for t in self._threads:
                t.join()


class _Steps:
    def __init__(self, job, finish, priority):
        self.job, self.finish, self.priority, self.started = job, finish, priority, False


class _StepsFuture(Future):
    stopped = promoted = False

    def cancel(self) -> bool:
        self.stopped = True  # a running job stops at its next step
        return super().cancel()
