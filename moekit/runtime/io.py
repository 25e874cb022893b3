"""Expert reads on a few threads, demand before speculation.

A thread pool serves its queue first come, first served: a prefetch issued for layer l+1 while layer l computes would
then delay layer l+1's demand reads queued after it. `IOPool` keeps two queues; a worker always takes a demand read
before a prefetch, so speculation only uses the disk when no demand read waits (a prefetch already being read cannot
be interrupted: at most one expert read of delay per thread). Futures are `concurrent.futures.Future`s: `cancel()`
drops a queued read.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import CancelledError, Future

DEMAND, PREFETCH = 0, 1


class IOPool:
    def __init__(self, threads: int):
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
            heapq.heappush(self._heap, (priority, next(self._seq), fut, _Steps(job, finish), ()))
            self._cv.notify()
        return fut

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                priority, _, fut, fn, args = heapq.heappop(self._heap)
            if isinstance(fn, _Steps):
                self._step(priority, fut, fn)
                continue
            if not fut.set_running_or_notify_cancel():  # cancelled while queued
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(err)

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
                with self._cv:  # behind what is queued at this priority, after any demand read
                    heapq.heappush(self._heap, (priority, next(self._seq), fut, steps, ()))
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
    def __init__(self, job, finish):
        self.job, self.finish, self.started = job, finish, False


class _StepsFuture(Future):
    stopped = False

    def cancel(self) -> bool:
        self.stopped = True  # a running job stops at its next step
        return super().cancel()
