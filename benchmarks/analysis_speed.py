"""Speed of the full routing analysis on a synthetic 1M-token trace with the demo model's shape.

L = 4 MoE layers, E = 32 experts, K = 4, sequences of 256 tokens, 4 domains. Routing has realistic structure: each
sequence draws a domain whose expert preference it perturbs, tokens favour their predecessor's experts (locality), each
token id leans towards one expert (for nPMI), and each layer leans on the previous layer's choice (affinity).

Runs every metric of moekit.analysis on all layers (SRP/SCH for m in 4, 16, 64, 256; LRU/LFU/Belady/opt and SCH at
1x..4x top-k), prints wall and CPU seconds per metric, and ends with one JSON line ("seconds" = wall time of the whole
analysis, excluding trace generation). Baselines in the same run, for the SCH + cache curves (the part the batched
priority-stack pass computes for every capacity at once):
- a reasonable per-capacity simulation (benchmarks/_percapacity.py: one pass per policy and capacity, O(1) lookups
  precomputed per sequence, O(C) eviction), timed on --baseline-sequences sequences of every layer and extrapolated
  linearly to all of them (every simulation restarts per sequence, so the cost is a sum over sequences); its hit rates
  on those sequences are checked equal to the fast path's;
- the tests' literal oracle (moekit.analysis._reference: next uses and window counts rescanned at every eviction,
  quadratic in the sequence length), timed on 4 sequences of layer 0 and extrapolated the same way.

    .venv/bin/python benchmarks/analysis_speed.py [--tokens 1000000] [--baseline-sequences 16]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from _percapacity import hits as per_capacity_hits  # noqa: E402  (benchmarks/_percapacity.py)
from moekit.analysis import POLICIES, SEGMENT_LENGTHS, cache_hit_rate_reference, sch_reference
from moekit.analysis import run as analysis_run
from moekit.analysis.cache import cache_hit_rates
from moekit.analysis.locality import segment_cache_hit_rate

L, E, K, SEQ_LEN, DOMAINS, VOCAB = 4, 32, 4, 256, 4, 8000


def synthetic_trace(n_tokens: int, seed: int = 0) -> dict:
    """Per-layer ids [T, K], weights [T, K], logits [T, E] and token metadata of a structured random trace."""
    rng = np.random.default_rng(seed)
    n_seq = -(-n_tokens // SEQ_LEN)
    dom = rng.integers(0, DOMAINS, n_seq)  # [S]
    tok = (rng.zipf(1.3, (n_seq, SEQ_LEN)) - 1) % VOCAB  # [S, Ts] heavy-tailed token ids
    tok_expert = rng.integers(0, E, (L, VOCAB))  # [L, V] each token's favourite expert per layer
    dom_pref = np.log(rng.dirichlet(np.full(E, 0.5), (L, DOMAINS)))  # [L, D, E]
    perm = np.stack([rng.permutation(E) for _ in range(L)])  # [L, E] layer l's expert e nudges perm[l, e] in l+1
    logits = np.empty((L, n_seq, SEQ_LEN, E), dtype=np.float32)
    ids = np.empty((L, n_seq, SEQ_LEN, K), dtype=np.int64)
    rows = np.arange(n_seq)[:, None]
    for layer in range(L):
        seq_pref = dom_pref[layer, dom] + rng.normal(0, 0.7, (n_seq, E))  # [S, E]
        prev = np.zeros((n_seq, E), dtype=np.float32)
        for t in range(SEQ_LEN):
            z = seq_pref + rng.gumbel(size=(n_seq, E))  # [S, E]
            z[rows[:, 0], tok_expert[layer, tok[:, t]]] += 1.5
            z += 1.8 * prev * (rng.random((n_seq, 1)) < 0.7)  # reuse the previous token's experts most of the time
            if layer:
                z[rows, perm[layer - 1, ids[layer - 1, :, t]]] += 1.0
            top = np.argsort(-z, axis=1)[:, :K]  # [S, K] weight-descending
            logits[layer, :, t] = z
            ids[layer, :, t] = top
            prev[:] = 0
            prev[rows, top] = 1
    flat_logits = logits.reshape(L, -1, E)[:, :n_tokens]  # [L, T, E]
    flat_ids = ids.reshape(L, -1, K)[:, :n_tokens]  # [L, T, K]
    top_logits = np.take_along_axis(flat_logits, flat_ids, axis=2)
    w = np.exp(top_logits - top_logits.max(axis=2, keepdims=True))
    seq_id = np.repeat(np.arange(n_seq), SEQ_LEN)[:n_tokens]
    return {
        "layers": [{"ids": flat_ids[i], "weights": (w[i] / w[i].sum(axis=1, keepdims=True)).astype(np.float32),
                    "logits": flat_logits[i]} for i in range(L)],
        "seq_id": seq_id.astype(np.int64),
        "position": np.tile(np.arange(SEQ_LEN), n_seq)[:n_tokens],
        "token_id": tok.reshape(-1)[:n_tokens],
        "domain": np.repeat(dom, SEQ_LEN)[:n_tokens],
        "domain_names": [f"domain{d}" for d in range(DOMAINS)],
        "output_max": rng.lognormal(0, 1, (L, E)),
    }


def per_capacity_seconds(trace: dict, n_seqs: int) -> float:
    """The per-capacity baseline on the first n_seqs sequences of every layer, every policy and SCH segment length at
    1x..4x top-k, extrapolated to all sequences; checks its hit rates equal the fast path's on the same sequences."""
    n = n_seqs * SEQ_LEN
    caps = [c * K for c in (1, 2, 3, 4)]
    runs = [(p, 0) for p in POLICIES] + [("sch", m) for m in SEGMENT_LENGTHS]
    elapsed = 0.0
    for layer in trace["layers"]:
        ids, seq_id = layer["ids"][:n], trace["seq_id"][:n]
        seqs = [ids[i * SEQ_LEN:(i + 1) * SEQ_LEN].tolist() for i in range(n_seqs)]
        start = time.process_time()
        got = {(p, m, c): np.mean([per_capacity_hits(r, c, p, m) / (SEQ_LEN * K) for r in seqs])
               for p, m in runs for c in caps}
        elapsed += time.process_time() - start
        for p in POLICIES:  # the fast path on the same sequences gives the same numbers
            assert np.allclose([got[(p, 0, c)] for c in caps], cache_hit_rates(ids, seq_id, E, caps, p)), p
        sch = segment_cache_hit_rate(ids, seq_id, E, caps, SEGMENT_LENGTHS)  # [M, C]
        assert np.allclose([[got[("sch", m, c)] for c in caps] for m in SEGMENT_LENGTHS], sch), "sch"
    return elapsed / n_seqs * len(np.unique(trace["seq_id"]))


def reference_seconds(trace: dict, n_seqs: int = 4) -> float:
    """Literal per-capacity simulations on n_seqs sequences of layer 0, extrapolated to all SCH + cache-curve runs."""
    n = n_seqs * SEQ_LEN
    ids, seq_id = trace["layers"][0]["ids"][:n], trace["seq_id"][:n]
    start = time.process_time()
    for cap in (K, 4 * K):  # cost grows little with capacity; two capacities, averaged
        sch_reference(ids, seq_id, E, 16, cap)
        for policy in POLICIES:
            cache_hit_rate_reference(ids, seq_id, E, cap, policy)
    per_run = (time.process_time() - start) / (2 * n_seqs * (1 + len(POLICIES)))  # one sequence, capacity, policy
    n_runs = len(np.unique(trace["seq_id"])) * L * 4 * (len(SEGMENT_LENGTHS) + len(POLICIES))  # 4 capacities
    return per_run * n_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--baseline-sequences", type=int, default=16,
                        help="sequences per layer the per-capacity baseline is timed on")
    args = parser.parse_args()
    t0 = time.perf_counter()
    trace = synthetic_trace(args.tokens)
    gen_s = time.perf_counter() - t0
    timings: dict[str, dict] = {}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    results = analysis_run.analyze_arrays(
        trace["layers"], trace["seq_id"], n_experts=E, position=trace["position"], token_id=trace["token_id"],
        domain=trace["domain"], domain_names=trace["domain_names"], output_max=trace["output_max"], timings=timings)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    baseline = per_capacity_seconds(trace, args.baseline_sequences)
    oracle = reference_seconds(trace)
    print(f"synthetic trace: {args.tokens} tokens, L={L} E={E} K={K}, generated in {gen_s:.1f} s")
    print(f"{'metric':<30}{'wall s':>9}{'cpu s':>9}")
    for name, t in timings.items():
        print(f"{name:<30}{t['wall']:>9.2f}{t['cpu']:>9.2f}")
    print(f"{'total (analyze_arrays)':<30}{wall:>9.2f}{cpu:>9.2f}")
    sim_cpu = max(sum(t["cpu"] for k, t in timings.items() if k.startswith(("sch", "cache", "layout"))), 1e-9)
    print(f"SCH + cache curves, fast path (one priority-stack pass for all capacities): {sim_cpu:.1f} cpu s")
    print(f"  vs a reasonable per-capacity simulation (_percapacity.py, timed on {args.baseline_sequences} sequences "
          f"per layer, extrapolated): {baseline:.0f} cpu s ({baseline / sim_cpu:.0f}x)")
    print(f"  vs the tests' literal oracle (_reference.py, quadratic in sequence length, extrapolated): {oracle:.0f} "
          f"cpu s ({oracle / sim_cpu:.0f}x)")
    print(f"machine load average (1 min) during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          f"(wall time > cpu time when other processes compete)")
    assert results["n_tokens"] == args.tokens
    print(json.dumps({"benchmark": "analysis_speed", "tokens": args.tokens, "layers": L, "experts": E, "top_k": K,
                      "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "goal_seconds": 30,
                      "meets_goal": wall < 30,
                      "per_metric_seconds": {k: round(t["wall"], 3) for k, t in timings.items()},
                      "per_metric_cpu_seconds": {k: round(t["cpu"], 3) for k, t in timings.items()},
                      "fast_path_cpu_seconds": round(sim_cpu, 2),
                      "per_capacity_cpu_seconds_extrapolated": round(baseline, 1),
                      "speedup_vs_per_capacity": round(baseline / sim_cpu, 1),
                      "baseline_sequences_per_layer": args.baseline_sequences,
                      "oracle_cpu_seconds_extrapolated": round(oracle, 1),
                      "speedup_vs_oracle": round(oracle / sim_cpu, 1),
                      "load_average_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
