"""Expert-cache policies: one small object per MoE layer, shared by the runtime and the simulator (same classes, same
calls, so their counters agree by construction; tests/runtime/test_agreement.py checks it).

Protocol, once per step (a forward call of the layer: one token in decode):
  policy.begin_step(ids, weights)          # the step's selected experts [T, K] and routing weights
  hits, evicted = policy.access(experts)   # experts = sorted(set(ids)), the order the runtime computes in
`access` judges every expert against the cache as it was before the step, then admits the misses in order; a victim is
never one of the step's own experts unless the step needs more experts than the capacity (prefill).
Counting follows a running system (docs/conventions.md §Hit-rate conventions, the simulator's too): cold misses are
misses, no free fill. Belady needs the future and exists for the simulator only. `predictive` also takes, between the
two calls,
  policy.forecast(next_use)                # [E] predicted next use per expert (predictor.py), or None
"""

from __future__ import annotations

import numpy as np

from moekit.errors import UserError
from moekit.registry import Registry

_POLICIES: Registry = Registry("cache policy")


def register(name: str):
    """Class decorator: make a policy available by name (`make("lru", capacity)`, `--policy lru`)."""

    def deco(cls):
        cls.name = name
        return _POLICIES.register(name, cls)

    return deco


def available() -> list[str]:
    return _POLICIES.names()


def policy_class(name: str) -> type[CachePolicy]:
    """The policy registered under `name` (a one-line UserError listing the known ones otherwise)."""
    return _POLICIES.lookup(name)


def make(name: str, capacity: int, **kwargs) -> CachePolicy:
    return policy_class(name)(capacity, **kwargs)


class CachePolicy:
    """Resident set of at most `capacity` experts, with hit/miss/eviction counters. Subclasses define `priority(e)`:
    the resident with the lowest priority is evicted (ties: lowest expert id, deterministic)."""

    name = "base"

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 expert, got {capacity}")
        self.capacity = int(capacity)
        self.resident: set[int] = set()
        self.hits = self.misses = self.evictions = 0
        self.clock = 0  # steps seen

    def begin_step(self, ids, weights=None) -> None:
        self.clock += 1

    def lookup(self, e: int) -> bool:
        if e in self.resident:
            self.hits += 1
            self.on_use(e)
            return True
        self.misses += 1
        return False

    def access(self, experts: list[int]) -> tuple[list[bool], list[int]]:
        """One step's distinct experts (ascending) -> (hit per expert, evicted experts)."""
        hits = [self.lookup(e) for e in experts]
        protect = set(experts)
        evicted = [v for e, h in zip(experts, hits) if not h for v in [self.admit(e, protect)] if v is not None]
        return hits, evicted

    def admit(self, e: int, protect: set[int] = frozenset()) -> int | None:
        """Make e resident (after a miss), evicting the lowest-priority resident outside `protect` when full (any
        resident if all are protected); returns the evicted expert, if any."""
        victim = None
        if len(self.resident) >= self.capacity:
            pool = (self.resident - protect) or self.resident
            victim = min(pool, key=lambda r: (self.priority(r), r))
            self.resident.remove(victim)
            self.evictions += 1
            self.on_evict(victim)
        self.resident.add(e)
        self.on_use(e)
        return victim

    def forecast(self, next_use) -> None:
        """The predicted next use of every expert for the coming `access` (only `predictive` reads it)."""

    def discard(self, e: int) -> None:
        """Drop e without counting an eviction (Fiddler: a miss computed on the CPU is not kept on the GPU)."""
        self.resident.discard(e)

    def on_use(self, e: int) -> None: ...

    def on_evict(self, e: int) -> None: ...

    def priority(self, e: int) -> float:
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions}


@register("lru")
class LRU(CachePolicy):
    """Evict the least recently used (mixtral-offloading, arXiv 2312.17238)."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.last: dict[int, int] = {}
        self.tick = 0  # per use, so experts of one step keep their processing order

    def on_use(self, e):
        self.tick += 1
        self.last[e] = self.tick

    def priority(self, e):
        return self.last[e]


@register("lfu")
class LFU(CachePolicy):
    """Evict the least frequently used; counts survive eviction (perfect LFU, as MoE-Infinity's activation counts,
    arXiv 2401.14361); ties by least recent use."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.tick = 0

    def on_use(self, e):
        self.tick += 1
        self.count[e] = self.count.get(e, 0) + 1
        self.last[e] = self.tick

    def priority(self, e):
        return (self.count[e], self.last[e])


@register("lfru")
class LFRU(CachePolicy):
    """Frequency over age (vLLM expert weight provider's LFRU): priority = uses / (steps since last use + 1); counts
    survive eviction. Frequent experts stay, but an expert not seen for long loses to a recent one."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.count: dict[int, int] = {}
        self.last_step: dict[int, int] = {}

    def on_use(self, e):
        self.count[e] = self.count.get(e, 0) + 1
        self.last_step[e] = self.clock

    def priority(self, e):
        return self.count[e] / (self.clock - self.last_step[e] + 1)


@register("score")
class Score(CachePolicy):
    """HybriMoE's score-aware cache (arXiv 2504.05897): S <- 0.5 * topP(s) + 0.5 * S every step for every expert, where
    topP(s) is the routing weight an expert received this step (summed over the step's tokens; 0 when not selected, so
    the routing weights of the top-k play the role of the top-P scores). Evict the lowest S."""

    def __init__(self, capacity: int, num_experts: int | None = None):
        super().__init__(capacity)
        self.score: dict[int, float] = {}

    def begin_step(self, ids, weights=None):
        super().begin_step(ids, weights)
        ids = np.asarray(ids).reshape(-1)
        w = np.ones(ids.shape, dtype=np.float64) if weights is None else np.asarray(weights, np.float64).reshape(-1)
        top = {}
        for e, x in zip(ids.tolist(), w.tolist()):
            top[e] = top.get(e, 0.0) + x
        for e in set(self.score) | set(top):
            self.score[e] = 0.5 * top.get(e, 0.0) + 0.5 * self.score.get(e, 0.0)

    def priority(self, e):
        return self.score.get(e, 0.0)


@register("belady")
class Belady(CachePolicy):
    """Belady's MIN (1966): evict the resident whose next use is farthest in the future; the offline ceiling of any
    demand-fetch policy at this capacity. Needs the whole future: `steps` = the list of each step's sorted unique
    experts, exactly as they will be looked up."""

    def __init__(self, capacity: int, steps=None):
        super().__init__(capacity)
        if steps is None:
            raise UserError("belady is an offline oracle: it needs the future trace (simulate only, not run)")
        self.next_use = _next_use_table(steps)
        self.pos = 0  # index into the flattened lookup sequence
        self.upcoming: dict[int, int] = {}

    def lookup(self, e):
        self.upcoming[e] = self.next_use[self.pos]
        self.pos += 1
        return super().lookup(e)

    def priority(self, e):
        return -self.upcoming[e]  # farthest next use = lowest priority


@register("predictive")
class Predictive(LFRU):
    """Belady's rule on a predicted future (ExpertFlow's predictive expert cache, arXiv 2410.17954; Lykouris &
    Vassilvitskii, "Competitive caching with machine learned advice", ICML 2018): evict the resident whose predicted
    next use is farthest away. `forecast(next_use)` gives, before a step's `access`, one value per expert of the
    layer ([E], larger = used later; inf = never); moekit.runtime.predictor's forecast is the expected
    ceil(log2(tokens until the next use)), float16. A forecast holds for that one step. Tie rule: equal forecasts,
    and every step without one (no predictor), fall back to LFRU's priority (uses / (steps since last use + 1)),
    then the lowest expert id; with no forecast at all the policy is LFRU exactly."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.next_use = None  # [E] for the current step, or None

    def forecast(self, next_use) -> None:
        self.next_use = None if next_use is None else np.asarray(next_use)

    def access(self, experts):
        try:
            return super().access(experts)
        finally:
            self.next_use = None  # a forecast is for its own step: never reused stale

    def priority(self, e):
        far = 0.0 if self.next_use is None else float(self.next_use[e])
        return (-far, super().priority(e))


def _next_use_table(steps) -> list[int]:
    """For each lookup in the flattened sequence, the position of the next lookup of the same expert (inf if none).
    A use inside the same step counts as later than the current one: experts of one step are distinct, so no tie."""
    flat = [e for step in steps for e in step]
    nxt, seen = [0] * len(flat), {}
    for i in range(len(flat) - 1, -1, -1):
        nxt[i] = seen.get(flat[i], float("inf"))
        seen[flat[i]] = i
    return nxt
