"""What-if simulator: replay a routing trace through the runtime's own cache-policy objects (policies.py), per MoE
layer, as one continuous token stream, counting cold misses as misses (a running system's view, docs/conventions.md
§Hit-rate conventions; the analysis report's SCH-convention curves differ on purpose). One step = one token (decode)
unless `step_sizes` groups tokens the way the runtime's calls did (prefill), which makes the simulator's counters equal
the runtime's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekit.errors import UserError
from moekit.runtime import policies
from moekit.runtime.hardware import Hardware


def _steps(ids: np.ndarray, step_sizes) -> list[tuple[int, int]]:
    T = ids.shape[0]
    sizes = [1] * T if step_sizes is None else [int(s) for s in step_sizes]
    if sum(sizes) != T:
        raise ValueError(f"step sizes sum to {sum(sizes)}, the trace has {T} tokens")
    bounds = np.cumsum([0] + sizes)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def replay_layer(ids, policy: str, capacity: int, weights=None, step_sizes=None,
                 num_experts: int | None = None, forecasts=None) -> policies.CachePolicy:
    """Feed one layer's routing ids [T, K] (and weights [T, K] for `score`, forecasts [T, E] for `predictive`: a step
    uses its last token's row, as the runtime does) to a fresh policy; returns it (counters).
    Ids >= num_experts are slots a routing policy dropped (variable K, weight 0): looked up by nobody, as in the
    runtime."""
    ids = np.asarray(ids, dtype=np.int64)
    spans = _steps(ids, step_sizes)
    real = ids < num_experts if num_experts is not None else np.ones(ids.shape, bool)
    uniq = [sorted(set(ids[a:b][real[a:b]].tolist())) for a, b in spans]  # the runtime's ascending lookup order
    if weights is not None and not real.all():
        weights = np.where(real, weights, 0.0)
        ids = np.where(real, ids, ids[:, :1])  # as the runtime hands them to a weight-aware policy
    kwargs = {"steps": uniq} if policy == "belady" else {}
    cache = policies.make(policy, capacity, **kwargs)
    for (a, b), experts in zip(spans, uniq):
        cache.begin_step(ids[a:b], None if weights is None else weights[a:b])
        if forecasts is not None:
            cache.forecast(forecasts[b - 1])
        cache.access(experts)
    return cache


def oracle_forecasts(ids, num_experts: int, step_sizes=None, horizon: int | None = None) -> np.ndarray:
    """A perfect predictor's forecasts [T, E] float64 for `replay_layer`: for every token, each expert's next lookup
    after the token's step, as a position in the flattened lookup sequence (the clock Belady uses, so `predictive`
    with these makes Belady's choices; inf = never used again). horizon: a predictor that sees only the next
    `horizon` steps: later uses are inf too, all equal (the policy's ties go to LFRU)."""
    ids = np.asarray(ids, dtype=np.int64)
    spans = _steps(ids, step_sizes)
    steps = [sorted(set(ids[a:b][ids[a:b] < num_experts].tolist())) for a, b in spans]  # dropped slots: no lookup
    out = np.empty((ids.shape[0], num_experts))
    nxt = np.full(num_experts, np.inf)  # flattened position of each expert's next lookup after the current step
    nxt_step = np.full(num_experts, np.inf)
    pos = sum(len(s) for s in steps)
    for i in range(len(steps) - 1, -1, -1):
        a, b = spans[i]
        out[a:b] = nxt if horizon is None else np.where(nxt_step - i <= horizon, nxt, np.inf)
        pos -= len(steps[i])
        for j, e in enumerate(steps[i]):
            nxt[e], nxt_step[e] = pos + j, i
    return out


@dataclass
class SimResult:
    policy: str
    capacity: int  # experts per layer
    multiple: float  # capacity / top-k
    hits: int
    misses: int
    tokens: int
    expert_bytes: int

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else float("nan")

    @property
    def bytes_per_token(self) -> float:
        return self.misses * self.expert_bytes / self.tokens


def simulate(ids_per_layer, *, num_experts: int, top_k: int, expert_bytes: int, policies_=("lru",),
             capacities=(1,), weights_per_layer=None, step_sizes=None, forecasts_per_layer=None) -> list[SimResult]:
    """Hit/miss counts for every (policy, capacity) over all layers. `capacities` are multiples of top-k;
    forecasts_per_layer ([T, E] each, a trace's `forecasts`) feed `predictive`."""
    if not ids_per_layer:
        raise UserError("the trace has no MoE layers")
    tokens = int(np.asarray(ids_per_layer[0]).shape[0])
    if tokens == 0:
        raise UserError("the trace has no tokens")
    results = []
    for name in policies_:
        for mult in capacities:
            cap = round(float(mult) * top_k)
            if cap < 1:
                raise UserError(f"capacity {mult}x top-{top_k} is below one expert")
            cap = min(cap, num_experts)
            hits = misses = 0
            for li, ids in enumerate(ids_per_layer):
                w = None if weights_per_layer is None else weights_per_layer[li]
                fc = None if forecasts_per_layer is None or name != "predictive" else forecasts_per_layer[li]
                c = replay_layer(ids, name, cap, w, step_sizes, num_experts, forecasts=fc)
                hits, misses = hits + c.hits, misses + c.misses
            results.append(SimResult(name, cap, float(mult), hits, misses, tokens, expert_bytes))
    return results


def with_bounds(results: list[SimResult], hw: Hardware, *, layers: int, top_k: int, expert_params: int) -> list[dict]:
    """Rows for display/JSON: hit rate, bytes per token, tokens/s bounds, and the fraction of Belady's hit rate."""
    best = {r.capacity: r.hit_rate for r in results if r.policy == "belady"}
    active_bytes = layers * top_k * results[0].expert_bytes
    rows = []
    for r in results:
        row = {"policy": r.policy, "capacity": f"{r.multiple:g}x", "experts_per_layer": r.capacity, "hits": r.hits,
               "misses": r.misses, "hit_rate": r.hit_rate, "bytes_per_token": r.bytes_per_token,
               **hw.bound(r.bytes_per_token, active_bytes, layers * top_k * expert_params)}
        if r.capacity in best:
            row["of_belady"] = r.hit_rate / best[r.capacity] if best[r.capacity] else float("nan")
        rows.append(row)
    return rows
