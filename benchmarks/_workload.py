"""What the offload, serve and cache benchmarks check about a decoding workload before they quote a number from it.

A random-weight model under greedy decoding falls into a cycle of 2-3 tokens within a few steps. Its routing then
repeats too, a cache of experts hits far more often than on a trained model's text (0.69 vs about 0.23 at top-8 in the
offload benchmark), and a speed-up measured on it says nothing about real use. `repetition` measures how much of a
generated sequence is a loop; `looping` is the stated criterion the benchmarks flag a workload with:

* distinct-2 = distinct bigrams / bigrams below MIN_DISTINCT_2 (0.5): a 2-token cycle has 2 distinct bigrams however
  long it runs; trained-model text of 24 tokens has nearly all bigrams distinct; or
* the longest periodic suffix (a suffix s with s[i] = s[i - p] for some period p, repeated at least twice) covers at
  least MAX_CYCLE_FRACTION (half) of the tokens: the output ended in a loop, whatever came before it.

Tokens that do not loop are not enough. A random-weight model's routing barely depends on the token: in the offload
benchmark's synthetic model, with sampled (non-looping) tokens, a decode token keeps 61-87% of the previous token's
experts in layers 1-3 (chance: K/E = 12.5%), and an LRU cache of a quarter of the experts hits 0.74. The trained demo
model keeps 12-41% per layer (mean 0.29 sampled, 0.30 greedy, over its 4 layers and 2 prompts; chance 12.5%).
`routing_reuse` measures this directly; its verdict `static` flags a workload whose mean consecutive reuse exceeds
MAX_REUSE = 0.5, above every trained model measured here. It is a floor, not a proof of realism: a workload passing it can still
differ from a trained model's locality (a replayed trace's SRP/SCH is the real reference).

A replayed workload (benchmarks/_replay.py) is checked against the trace it replays: `locality_kept` compares the
routing the run executed with the trace rows it replayed, row by row (each row's expert set must be the mapped trace
row's) and by the locality statistics of "Not All Models Suit Expert Offloading" (arXiv 2505.16056; moekit/analysis/
locality.py): SRP at m = 4 and 16 and SCH at capacities 2 and 4 x top-k (each side's own top-k), each prompt one
sequence; both within MAX_LOCALITY_DIFF.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_DISTINCT_2 = 0.5
MAX_CYCLE_FRACTION = 0.5
MAX_REUSE = 0.5
MAX_LOCALITY_DIFF = 0.05  # SRP / SCH of a replayed run vs the trace rows it replayed (tests/routing/test_steering.py)
LOCALITY_SEGMENTS = (4, 16)  # segment lengths m that a prompt's ~40 rows hold windows of


def periodic_suffix(tokens: Sequence[int]) -> tuple[int, int]:
    """(period p, length) of the longest suffix that repeats with period p at least twice over (length >= 2p);
    (0, 0) when there is none. Ties: the smallest period."""
    t, n = [int(x) for x in tokens], len(tokens)
    best = (0, 0)
    for p in range(1, n // 2 + 1):
        k = 0  # trailing positions i with t[i] == t[i - p]
        while k < n - p and t[n - 1 - k] == t[n - 1 - k - p]:
            k += 1
        if k >= p and k + p > best[1]:
            best = (p, k + p)
    return best


def repetition(tokens: Sequence[int]) -> dict:
    """Loop statistics of one generated sequence: distinct-2, the longest periodic suffix, and the verdict."""
    t = [int(x) for x in tokens]
    bigrams = list(zip(t, t[1:]))
    distinct2 = len(set(bigrams)) / len(bigrams) if bigrams else 1.0
    period, length = periodic_suffix(t)
    fraction = length / len(t) if t else 0.0
    return {"tokens": len(t), "distinct_2": distinct2, "cycle_period": period, "cycle_tokens": length,
            "cycle_fraction": fraction, "looping": distinct2 < MIN_DISTINCT_2 or fraction >= MAX_CYCLE_FRACTION}


def looping(tokens: Sequence[int]) -> bool:
    return repetition(tokens)["looping"]


def consecutive_reuse(steps: Sequence) -> float:
    """Mean over consecutive decode steps of |S_t & S_{t-1}| / K: the share of a token's experts (at one layer) that the
    previous token selected too. steps: one [K] (or [1, K]) array of expert ids per decode step; nan with < 2 steps."""
    sets = [set(int(e) for e in sorted(_flat(s))) for s in steps]
    if len(sets) < 2:
        return float("nan")
    return sum(len(a & b) / len(b) for a, b in zip(sets, sets[1:])) / (len(sets) - 1)


def routing_reuse(per_layer: Sequence[Sequence], num_experts: int) -> dict:
    """consecutive_reuse per MoE layer (per_layer[l] = that layer's decode steps), their mean, chance (K / E), and the
    verdict `static` (mean > MAX_REUSE)."""
    reuse = [consecutive_reuse(steps) for steps in per_layer]
    k = len(_flat(per_layer[0][0]))
    mean = sum(reuse) / len(reuse)
    return {"per_layer": reuse, "mean": mean, "chance": k / num_experts, "static": mean > MAX_REUSE}


def _flat(ids) -> list[int]:
    return [int(e) for e in (ids.reshape(-1).tolist() if hasattr(ids, "reshape") else ids)]


def locality(ids, seq_id, num_experts: int, capacities, segment_lengths=LOCALITY_SEGMENTS) -> dict:
    """SRP [M] and SCH [M, C] of one layer's routing ids [T, K] over the sequences of seq_id [T] (NaN where no
    sequence holds a window of m)."""
    import numpy as np

    from moekit.analysis.locality import segment_cache_hit_rate, segment_routing_performance

    ids = np.asarray(ids, dtype=np.int64)
    return {"srp": segment_routing_performance(ids, seq_id, num_experts, segment_lengths).f1.tolist(),
            "sch": np.asarray(segment_cache_hit_rate(ids, seq_id, num_experts, capacities, segment_lengths)).tolist()}


def locality_kept(trace_rows: Sequence[Sequence], run_rows: Sequence[Sequence], trace_experts: int,
                  model_experts: int) -> dict:
    """Did a replayed run keep the trace's routing? trace_rows[l][p]: ids [T_p, K_t] of the trace rows prompt p replayed
    at model layer l (the trace layer it follows); run_rows[l][p]: ids [T_p, K_m] its routers returned. Per layer: the
    share of rows whose expert set is the mapped trace row's (moekit.routing.replay.map_ids), SRP and SCH of both
    (capacities 2 and 4 x top-k: K_t in the trace, K_m in the run; the benchmark's 25% of 64 experts is 2 x 8); `kept`
    when every row follows and the statistics differ by at most MAX_LOCALITY_DIFF."""
    import numpy as np

    from moekit.routing.replay import map_ids

    layers = []
    for want, got in zip(trace_rows, run_rows, strict=True):
        seq = np.concatenate([np.full(len(w), p) for p, w in enumerate(want)])  # [T] prompt p = sequence p
        want_all, got_all = np.concatenate(want).astype(np.int64), np.concatenate(got).astype(np.int64)
        k_t, k_m = want_all.shape[1], got_all.shape[1]
        mapped = map_ids(want_all, trace_experts, model_experts, k_m)
        follows = float(np.mean([set(a) == set(b) for a, b in zip(mapped.tolist(), got_all.tolist())]))
        caps_t, caps_m = [2 * k_t, 4 * k_t], [2 * k_m, 4 * k_m]
        t, r = locality(want_all, seq, trace_experts, caps_t), locality(got_all, seq, model_experts, caps_m)
        layers.append({"follows": follows, "capacities_trace": caps_t, "capacities_model": caps_m,
                       "srp_trace": t["srp"], "srp_run": r["srp"], "sch_trace": t["sch"], "sch_run": r["sch"],
                       "srp_diff": _max_diff(t["srp"], r["srp"]), "sch_diff": _max_diff(t["sch"], r["sch"])})
    srp = max(x["srp_diff"] for x in layers)
    sch = max(x["sch_diff"] for x in layers)
    follows = min(x["follows"] for x in layers)
    return {"per_layer": layers, "follows": follows, "max_srp_diff": srp, "max_sch_diff": sch,
            "segment_lengths": list(LOCALITY_SEGMENTS),
            "kept": follows == 1.0 and srp <= MAX_LOCALITY_DIFF and sch <= MAX_LOCALITY_DIFF}


def _max_diff(a, b) -> float:
    """max |a - b| over the entries both define (a NaN on one side only is a difference of 1: a lost window)."""
    import numpy as np

    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    both, one = ~np.isnan(a) & ~np.isnan(b), np.isnan(a) ^ np.isnan(b)
    return float(max(np.abs(a[both] - b[both]).max(initial=0.0), 1.0 if one.any() else 0.0))
