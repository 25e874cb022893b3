"""A reasonable per-capacity cache simulation: the baseline benchmarks/analysis_speed.py measures the batched
priority-stack pass (moekit/analysis/_stack.py) against.

What an engineer writes without the stack trick: one pass over each sequence per (policy, capacity), with the
per-sequence lookups precomputed so each access costs O(1) plus an O(C) eviction scan (C <= 4K is small: 16 here):
LRU with an OrderedDict; LFU with counts that survive eviction (ties by recency); Belady MIN from a next-use array built
backwards; the offline optimum ("opt", with bypass) from each expert's next later token; SCH (arXiv 2505.16056) with a
sliding window of per-expert token counts updated once per token. Conventions are SCH's, exactly as the reference
(moekit/analysis/_reference.py, which recomputes next uses and window counts from scratch at every eviction: correct
by construction, slow by design): a token is judged against the cache before it, then its experts are inserted in
order, each insertion may evict; the first C distinct experts of a sequence fill free space and count as hits.
tests/benchmarks/test_percapacity.py checks every policy against that reference.
"""

from __future__ import annotations

from collections import OrderedDict


def hits(rows: list[list[int]], capacity: int, policy: str, window: int = 0) -> int:
    """Hits of one sequence (rows = the K expert ids of each token) for one policy ("lru", "lfu", "belady", "opt",
    "sch" with `window` = m) and one capacity."""
    if policy == "lru":
        return _lru(rows, capacity)
    k = len(rows[0]) if rows else 0
    n = len(rows) * k
    last: dict[int, int] = {}
    count: dict[int, int] = {}
    if policy == "belady":
        nxt = _next_use(rows, k)

        def prio(y, i, s):  # evict the farthest next use
            return -nxt[last[y]]
    elif policy == "opt":
        after = _next_later_token(rows, k)

        def prio(y, i, s):  # every expert, the newcomer included (bypass), by its first use in a later token
            return -after[i].get(y, n + y)
    elif policy == "lfu":
        def prio(y, i, s):
            return count[y], last[y]
    elif policy == "sch":
        in_window = [0] * (1 + max(max(r) for r in rows))  # tokens i..i+m-1 using each expert

        def prio(y, i, s):
            return in_window[y] - (y in done), last[y]
    else:
        raise ValueError(f"unknown policy {policy!r}")
    cache: set[int] = set()
    seen: set[int] = set()
    total = 0
    if policy == "sch":
        for row in rows[:window]:
            for x in set(row):
                in_window[x] += 1
    for i, row in enumerate(rows):
        for x in row:
            if x in cache or (x not in seen and len(seen) < capacity):
                total += 1
            seen.add(x)
        done: set[int] = set()
        for j, x in enumerate(row):
            s = i * k + j
            if x not in cache:
                if len(cache) < capacity:
                    cache.add(x)
                elif policy == "opt":
                    victim = min(cache | {x}, key=lambda y: prio(y, i, s))
                    if victim != x:
                        cache.discard(victim)
                        cache.add(x)
                else:
                    cache.discard(min(cache, key=lambda y: prio(y, i, s)))
                    cache.add(x)
            last[x] = s
            count[x] = count.get(x, 0) + 1
            done.add(x)
        if policy == "sch":  # slide the window: drop token i, add token i + m
            for x in set(row):
                in_window[x] -= 1
            if i + window < len(rows):
                for x in set(rows[i + window]):
                    in_window[x] += 1
    return total


def _lru(rows, capacity: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    seen: set[int] = set()
    total = 0
    for row in rows:
        for x in row:
            if x in cache or (x not in seen and len(seen) < capacity):
                total += 1
            seen.add(x)
        for x in row:
            if x in cache:
                cache.move_to_end(x)
            else:
                if len(cache) >= capacity:
                    cache.popitem(last=False)
                cache[x] = None
    return total


def _next_use(rows, k: int) -> list[int]:
    """nxt[s] = the next flat index using the expert of flat index s (len + id when none: any order among those)."""
    flat = [x for row in rows for x in row]
    nxt, upcoming = [0] * len(flat), {}
    for s in range(len(flat) - 1, -1, -1):
        nxt[s] = upcoming.get(flat[s], len(flat) + flat[s])
        upcoming[flat[s]] = s
    return nxt


def _next_later_token(rows, k: int) -> list[dict[int, int]]:
    """after[i][y] = flat index of y's first use in a token after i (absent: none)."""
    after, upcoming = [None] * len(rows), {}
    for i in range(len(rows) - 1, -1, -1):
        after[i] = dict(upcoming)
        for j in range(k - 1, -1, -1):  # backwards, so the first position of the token wins
            upcoming[rows[i][j]] = i * k + j
    return after
