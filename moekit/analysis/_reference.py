"""Slow, literal per-capacity cache simulations: the references the fast stack kernel (_stack.py) is tested against.

One sequence at a time, one capacity at a time, plain Python sets, following the definitions word for word. Conventions
are those of SCH in the moe-lrc released code (arXiv 2505.16056, github ljcleo/moe-lrc): a token's K experts are judged
hit or miss against the cache as it was before the token, then inserted in order (each insertion may evict, even
another expert of the same token); the first C distinct experts of a sequence fill free space and count as hits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Priority = Callable[[int, int, int], tuple]  # (expert, token index, flat reference index) -> comparable; lowest evicted


def simulate_hits(rows: Sequence[Sequence[int]], capacity: int, priority: Priority, state: dict,
                  bypass: bool = False) -> int:
    """Hits of one sequence (rows = the K expert ids of each token) in a cache of `capacity` experts.

    bypass: when the cache is full, the newcomer competes too (its priority taken at its own reference) and is not
    kept if it has the lowest priority (Belady MIN with bypass).

    `state` is shared with `priority` and updated here: state["last"][e] = flat index of e's latest insertion,
    state["count"][e] = e's uses so far, state["done"] = experts of the current token already inserted.
    """
    cache: set[int] = set()
    seen: set[int] = set()
    state.update(last={}, count={}, done=set())
    hits = 0
    top_k = len(rows[0]) if len(rows) else 0
    for i, row in enumerate(rows):
        before = set(cache)
        for x in row:
            if x in before or (x not in seen and len(seen) < capacity):
                hits += 1
            seen.add(x)
        state["done"] = set()
        for k, x in enumerate(row):
            s = i * top_k + k
            if x not in cache:
                if len(cache) >= capacity:
                    victim = min(cache | {x} if bypass else cache, key=lambda y: priority(y, i, s))
                    cache.discard(victim)
                    if victim != x:
                        cache.add(x)
                else:
                    cache.add(x)
            state["last"][x] = s
            state["count"][x] = state["count"].get(x, 0) + 1
            state["done"].add(x)
    return hits


def lru_priority(state: dict) -> Priority:
    return lambda y, i, s: (state["last"][y],)


def lfu_priority(state: dict) -> Priority:
    """Perfect LFU within the sequence (counts survive eviction), ties broken by recency."""
    return lambda y, i, s: (state["count"][y], state["last"][y])


def belady_priority(rows: Sequence[Sequence[int]], state: dict) -> Priority:
    """Belady MIN: the resident whose next use (flat reference index after s) is farthest is evicted."""
    flat = [x for row in rows for x in row]

    def next_use(y: int, s: int) -> int:
        for j in range(s + 1, len(flat)):
            if flat[j] == y:
                return j
        return len(flat) + y  # never used again: any order among these gives the same hits

    return lambda y, i, s: (-next_use(y, s),)


def opt_priority(rows: Sequence[Sequence[int]], state: dict) -> Priority:
    """Offline optimum under the SCH conventions: every expert, those of the current token included, is ranked by its
    first use in a *later* token (a token's hits are judged before it, so its own experts need not stay)."""
    def next_token(y: int, i: int) -> int:
        for j in range(i + 1, len(rows)):
            if y in rows[j]:
                return j * len(rows[j]) + list(rows[j]).index(y)
        return len(rows) * len(rows[0]) + y

    return lambda y, i, s: (-next_token(y, i),)


def sch_priority(rows: Sequence[Sequence[int]], window: int, state: dict) -> Priority:
    """SCH eviction priority (arXiv 2505.16056): uses of y in tokens i..i+m-1 not yet consumed, then last use."""
    def uses(y: int, i: int) -> int:
        n = sum(1 for j in range(i, min(i + window, len(rows))) if y in rows[j])
        return n - (1 if y in state["done"] else 0)

    return lambda y, i, s: (uses(y, i), state["last"][y])
