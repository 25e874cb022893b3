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
from concurrent.futures import Future

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

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, fut, fn, args = heapq.heappop(self._heap)
            if not fut.set_running_or_notify_cancel():  # cancelled while queued
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(err)

    def shutdown(self, wait: bool = True) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if wait:
            for t in self._threads:
                t.join()
