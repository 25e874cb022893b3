"""Expert placement: EPLB vs ExFlow vs balanced-affinity, fitted on one trace and scored on another (held out).

(a) the demo model: a trace of held-out text of all eight demo-corpus domains (recorded once with moekit.trace, cached
    under out/bench-placement/), each domain's first half of sequences to fit, second half to score; G = 2, 4, 8.
(b) a synthetic DeepSeek-V3-shaped trace (generator below, `deepseek_like`): 61 decoder layers of which 58 MoE, 256
    experts in 8 groups, top-8 with group-limited routing (top-4 groups), G = 32 GPUs on 4 nodes, R = 32 redundant
    experts (DeepSeek-V3's prefill deployment unit); fit and held-out traces are independent draws.

Per method: held-out vLLM / SGLang balancedness, cross-GPU transitions (ExFlow's metric, inter-node x 2), dispatch
bytes per token, planning time (median and range over --repeats runs, interleaved across methods). Ratios are against
EPLB measured in the same run; the goal is balanced-affinity within 1% of EPLB's balancedness with >= 20% fewer
transitions, and planning (b) under 60 s.

    python benchmarks/placement.py [--part a|b|both] [--repeats 3] [--tokens 32768] [--time-limit 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.placement import evaluate  # noqa: E402
from moekit.placement.inputs import stats_from_ids  # noqa: E402
from moekit.placement.methods import PlanOptions, run_method  # noqa: E402
from moekit.placement.plan import Plan, Topology, default_plan  # noqa: E402

DOMAINS = ["prose", "code", "math", "german", "french", "russian", "japanese", "dialogue"]
METHODS = ("eplb", "exflow", "balanced-affinity")


def demo_trace(tokens: int) -> Path:
    """The demo model over held-out text of every domain (256-token windows), recorded once and reused."""
    import moekit.trace

    out = ROOT / "out" / "bench-placement" / f"demo-heldout-{tokens}"
    if not (out / "manifest.json").is_file() or not moekit.trace.read_manifest(out).get("completed"):
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        print(f"recording {tokens} tokens of demo/corpus/heldout into {out} ...", flush=True)
        moekit.trace.record(ROOT / "demo" / "model", [str(ROOT / f"demo/corpus/heldout/{d}.txt") for d in DOMAINS],
                            out, options=moekit.trace.TraceOptions(seq_len=256, max_tokens=tokens), resume=True)
    return out


def split_halves(trace) -> tuple[np.ndarray, np.ndarray]:
    """Boolean token masks: each domain's first half of sequences (fit) and second half (held out)."""
    seq, dom = trace.seq_id, trace.domain
    fit = np.zeros(len(seq), bool)
    for d in np.unique(dom):
        seqs = np.unique(seq[dom == d])
        fit |= np.isin(seq, seqs[: len(seqs) // 2])
    return fit, ~fit


AFFINITY = {"strong": dict(stay=0.95, pull=4.0, preferred=8), "weak": dict(stay=0.9, pull=2.0, preferred=16)}


def deepseek_like(tokens: int, seed: int, layers: int = 58, experts: int = 256, top_k: int = 8, groups: int = 8,
                  topk_group: int = 4, topics: int = 64, stay: float = 0.95, skew: float = 0.75, pull: float = 4.0,
                  preferred: int = 8, structure_seed: int = 1234) -> list[np.ndarray]:
    """A synthetic DeepSeek-V3-shaped routing trace, [T, K] per MoE layer.

    The model (drawn once from structure_seed, shared by fit and held-out draws): per layer, expert popularity logits
    b[l, e] ~ N(0, skew^2) (skewed load), and per (layer, topic) a set of `preferred` experts drawn uniformly. A token
    (drawn with `seed`) carries a latent topic, uniform over `topics`, kept from one MoE layer to the next with
    probability `stay` and otherwise redrawn uniformly (this is the inter-layer affinity). Its scores in layer l are
    b[l, e] + pull * [e preferred by (l, topic)] + Gumbel noise; routing is DeepSeek-V3's group-limited top-k: group
    score = sum of the group's top-2 scores, the best `topk_group` of `groups` groups eligible, top-`top_k` experts
    among them, ordered by score."""
    s_rng, rng = np.random.default_rng(structure_seed), np.random.default_rng(seed)
    base = s_rng.normal(0, skew, (layers, experts))
    pref = np.zeros((layers, topics, experts))
    for l in range(layers):
        for c in range(topics):
            pref[l, c, s_rng.choice(experts, preferred, replace=False)] = pull
    topic = rng.integers(0, topics, tokens)
    size = experts // groups
    out = []
    for l in range(layers):
        if l:
            topic = np.where(rng.random(tokens) < stay, topic, rng.integers(0, topics, tokens))
        scores = (base[l][None] + pref[l, topic] + rng.gumbel(size=(tokens, experts))).astype(np.float32)  # [T, E]
        g = np.partition(scores.reshape(tokens, groups, size), size - 2, axis=2)[:, :, -2:].sum(axis=2)  # [T, groups]
        drop = np.argpartition(-g, topk_group, axis=1)[:, topk_group:]  # groups outside the best topk_group
        mask = np.ones((tokens, groups), bool)
        np.put_along_axis(mask, drop, False, axis=1)
        scores = np.where(np.repeat(mask, size, axis=1), scores, -np.inf)
        top = np.argpartition(-scores, top_k, axis=1)[:, :top_k]  # [T, K], then ordered by score
        out.append(np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1).astype(np.int64))
    return out


def colocation_bound(stats, slots: int) -> float:
    """Upper bound on the same-GPU share of consecutive-layer pairs: a GPU of `slots` slots can hold at most an
    expert's `slots` heaviest next-layer partners (any placement, any balance)."""
    best = sum(np.sort(a, axis=1)[:, -slots:].sum() for a in stats.pairs)
    return float(best / stats.pairs.sum())


def run_case(name, fit_stats, held_stats, held_ids, src, topo_for, nhl, repeats, opts, value_bytes):
    """Plan with every method `repeats` times (interleaved), score each plan once on the held-out trace."""
    times = {m: [] for m in METHODS}
    plans = {}
    for _ in range(repeats):
        for m in METHODS:
            topo = topo_for(m)
            t0 = time.perf_counter()
            res = run_method(m, fit_stats, topo, opts)
            times[m].append(time.perf_counter() - t0)
            plans[m] = Plan(topo, res.phy2log, fit_stats.layers, nhl, m, res.solver)
    plans["default"] = default_plan(topo_for("eplb"), fit_stats.layers, nhl)
    rows = [(m, evaluate.score(plans[m], held_stats, held_ids, src, value_bytes), times.get(m))
            for m in ("default",) + METHODS]
    fit = {m: evaluate.vllm_balancedness(evaluate.gpu_loads(fit_stats.counts, p.shares())) for m, p in plans.items()}
    _print(name, rows, plans, fit)


def _print(name, rows, plans, fit):
    base = dict((m, s) for m, s, _ in rows)["eplb"]
    print(f"\n{name} (held-out unless marked fit)")
    print(f"{'method':18s} {'R':>3s} {'fit bal':>8s} {'vLLM bal':>9s} {'SGLang bal':>10s} {'vs EPLB':>8s} "
          f"{'transitions':>11s} {'vs EPLB':>8s} {'dispatch B/tok':>14s} {'plan s (median, range)':>24s}")
    for m, s, t in rows:
        r = plans[m].topology.redundant
        bal = s["vllm_balancedness"] / base["vllm_balancedness"] - 1
        tr = s["cross_gpu_transitions"] / base["cross_gpu_transitions"] - 1
        tt = "" if t is None else f"{statistics.median(t):8.2f} ({min(t):.2f}-{max(t):.2f})"
        print(f"{m:18s} {r:3d} {fit[m]:8.4f} {s['vllm_balancedness']:9.4f} {s['sglang_balancedness']:10.4f} "
              f"{bal:+8.2%} {s['cross_gpu_transitions']:11.4f} {tr:+8.1%} {s['dispatch_bytes_per_token']:14,.0f} "
              f"{tt:>24s}")
    for m, p in plans.items():
        print(f"  {m}: {p.solver}")


def part_a(args):
    import moekit.trace
    from moekit.placement.inputs import stats_from_trace

    t = moekit.trace.open(demo_trace(args.tokens))
    fit, held = split_halves(t)
    fit_stats, held_stats = stats_from_trace(t, fit), stats_from_trace(t, held)
    held_ids = [t.ids(l)[held].astype(np.int64) for l in t.layers]
    value_bytes = 256 * 2  # demo model: hidden 256, bfloat16
    print(f"(a) demo model: {fit.sum()} fit tokens, {held.sum()} held-out tokens, 4 MoE layers x 32 experts, top-4")
    for G in (2, 4, 8):
        print(f"\n  headroom at G = {G}: at most {colocation_bound(fit_stats, 32 // G):.1%} of consecutive-layer pairs "
              f"can share a GPU")
        run_case(f"(a) demo, G = {G}, one node, no redundancy", fit_stats, held_stats, held_ids, t.seq_id[held],
                 lambda m, G=G: Topology(32, G, top_k=4), 4, args.repeats,
                 PlanOptions(time_limit=args.time_limit), value_bytes)


def part_b(args):
    T = args.synthetic_tokens
    kw = AFFINITY[args.affinity]
    fit_ids, held_ids = deepseek_like(T, seed=1, **kw), deepseek_like(T, seed=2, **kw)
    fit_stats, held_stats = stats_from_ids(fit_ids, 256, list(range(3, 61))), stats_from_ids(held_ids, 256,
                                                                                            list(range(3, 61)))
    topo = Topology(256, 32, nodes=4, redundant=32, num_groups=8, topk_group=4, top_k=8)
    exflow_topo = Topology(256, 32, nodes=4, redundant=0, num_groups=8, topk_group=4, top_k=8)  # ExFlow: no replicas
    print(f"\n(b) synthetic DeepSeek-V3-shaped ({args.affinity} affinity: {kw}): {T} fit + {T} held-out tokens, 58 MoE "
          f"layers x 256 experts, top-8; G = 32 on 4 nodes, R = 32 (exflow: R = 0, it has no replicas)")
    print(f"  headroom: no placement can put more than {colocation_bound(fit_stats, 9):.1%} of the fit trace's "
          f"consecutive-layer expert pairs on one GPU (each expert's 9 best partners on its GPU of 9 slots)")
    run_case("(b) synthetic DeepSeek-V3, G = 32, N = 4, R = 32", fit_stats, held_stats, held_ids,
             np.arange(T), lambda m: exflow_topo if m == "exflow" else topo, 61, args.repeats,
             PlanOptions(time_limit=args.time_limit), 7168 * 2)  # DeepSeek-V3: hidden 7168, bf16 dispatch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["a", "b", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=65536, help="(a) demo trace tokens (recorded once, cached)")
    ap.add_argument("--affinity", choices=sorted(AFFINITY), default="strong", help="(b) generator setting")
    ap.add_argument("--synthetic-tokens", type=int, default=16384, help="(b) tokens per synthetic trace")
    ap.add_argument("--time-limit", type=float, default=50.0, help="seconds per method and plan (the searches stop "
                    "there and return their best plan so far)")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    if args.part in ("a", "both"):
        part_a(args)
    if args.part in ("b", "both"):
        part_b(args)
    print(f"\nload average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
