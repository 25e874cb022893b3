"""Expert-cache policies compared (counting: docs/conventions.md §Hit-rate conventions): hit rate at 1x, 2x and 4x
top-k per layer for lru, lfu, lfru, score, predictive and belady, in three parts, each one command:

    .venv/bin/python benchmarks/cache_policies.py                      # demo + synthetic + offload
    .venv/bin/python benchmarks/cache_policies.py --parts demo --predictor demo/predictor.safetensors

demo: the demo model on held-out text, the first --eval-tokens of each domain (256-token windows, float32), replayed
  per domain and layer as one continuous token stream, one step per token, cold misses counted (the simulator's
  convention, moekit/runtime/simulate.py); the routing predictor fitted in this run on --predictor-tokens per domain of
  other text (the training split, or the held-out files' second half) or read from --predictor; its forecasts computed
  from the same forward as the routing, as `moekit trace --predictor` records them. Also: `predictive` fed a perfect
  forecast of the next token only (oracle-1) and of the next 4 (oracle-4), to show how much of Belady's lead is
  next-token knowledge, and the predictor's next-token recall.
synthetic: routing traces with the demo's statistics at 64 and 128 experts (top-8), from a generative process (see
  `SyntheticRouting`) fitted per layer so that the next-token reuse rate and the within-window expert entropy match
  the demo's measured ones; the predictor trained on the process's own hidden states (a training stream) and evaluated
  on a fresh one.
offload: decode on benchmarks/offload.py's synthetic Qwen3-MoE (64 experts, top-8, 18.9 MB per expert, random
  weights, float32) with 25% of the expert bytes in memory (16 experts per layer = 2x top-8), reads from disk
  (O_DIRECT), lru and score against predictive, interleaved, --repeats times: bytes read per token and decode tokens/s.
  Random weights loop under greedy decoding, so the workload is teacher-forced: every decode step feeds the next
  token of held-out demo text (one token, KV cache), not the argmax; the run prints how many distinct tokens and
  experts the workload touched, and what greedy decoding would have produced. The predictor for this model is fitted
  on its own routing over other demo text (in memory, float32).
Prints markdown tables and ends with one JSON line. Record `uptime` next to the numbers: the machine is shared.
Dimension legend: T tokens, K selected, E experts, L MoE layers, D synthetic hidden size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _demo import DOMAINS, calib_windows, default_calib_split, eval_windows, fit_predictor, load_demo

import moekit.models
from moekit.runtime import predictor_train as pt
from moekit.runtime.predictor import PredictorSpec
from moekit.runtime.simulate import oracle_forecasts, replay_layer

POLICIES = ["lru", "lfu", "lfru", "score", "predictive", "belady"]
MULTIPLES = [1, 2, 4]


# replay ----------------------------------------------------------------------------------------------------------------
def hit_rates(streams, top_k: int, num_experts: int, extra: dict | None = None) -> dict:
    """streams: list of per-layer (ids [T, K], weights [T, K], forecasts [T, E]) continuous streams; returns
    {policy: {multiple: hit rate}} pooled over the streams. extra: name -> function(ids) -> forecasts (oracles)."""
    out = {}
    for name in POLICIES + list(extra or {}):
        out[name] = {}
        for mult in MULTIPLES:
            cap = min(mult * top_k, num_experts)
            hits = total = 0
            for ids, w, fc in streams:
                policy = "predictive" if name in (extra or {}) else name
                forecasts = extra[name](ids) if name in (extra or {}) else fc if name == "predictive" else None
                c = replay_layer(ids, policy, cap, w, forecasts=forecasts)
                hits, total = hits + c.hits, total + c.hits + c.misses
            out[name][mult] = hits / total
    return out


def oracles(num_experts: int) -> dict:
    return {f"oracle-{h}": (lambda ids, h=h: oracle_forecasts(ids, num_experts, horizon=h)) for h in (1, 4)}


def table(title: str, rates: dict) -> None:
    print(f"\n{title}\n")
    print("| policy | " + " | ".join(f"{m}x" for m in MULTIPLES) + " | of Belady at 2x |")
    print("|---|" + "---|" * (len(MULTIPLES) + 1))
    for name, row in rates.items():
        print(f"| {name} | " + " | ".join(f"{row[m]:.3f}" for m in MULTIPLES) + f" | {row[2] / rates['belady'][2]:.3f} |")


def verdict(rates: dict) -> dict:
    """The issue's goals: >= 90% of Belady at 2x, above every other online policy at every capacity."""
    online = ["lru", "lfu", "lfru", "score"]
    return {"of_belady_2x": rates["predictive"][2] / rates["belady"][2],
            "above_all_online": {m: all(rates["predictive"][m] > rates[o][m] for o in online) for m in MULTIPLES},
            "at_least_all_online": {m: all(rates["predictive"][m] >= rates[o][m] for o in online) for m in MULTIPLES}}


# part 1: the demo model -----------------------------------------------------------------------------------------------
def demo_part(args) -> dict:
    model, tok, desc = load_demo(args.model)
    view = moekit.models.load(model)
    if args.predictor:
        from moekit.runtime.predictor import load

        predictor, fit = load(args.predictor), {"file": args.predictor}
    else:
        predictor, n, secs = fit_predictor(view, tok, args.predictor_tokens, args.calib_split)
        fit = {"calib_tokens": n, "calib_split": args.calib_split, "seconds": round(secs, 1)}
    predictor.check(view)
    per_domain, streams, recall = {}, [], []
    for d, windows in eval_windows(tok, args.eval_tokens).items():
        data = pt.collect(view, windows)
        recall.append(pt.evaluate(predictor, data)["next_token"]["recall"])
        layer_streams = [(data.ids[l], data.weights[l], predictor.forecast(l, data.x[l], data.ids[l], data.weights[l]))
                         for l in range(len(view.layers))]
        per_domain[d] = hit_rates(layer_streams, view.top_k, view.num_experts, oracles(view.num_experts))
        streams += layer_streams
        print(f"  {d}: 2x predictive {per_domain[d]['predictive'][2]:.3f}, belady {per_domain[d]['belady'][2]:.3f}",
              flush=True)
    overall = hit_rates(streams, view.top_k, view.num_experts, oracles(view.num_experts))
    table(f"{desc}: held-out text, {args.eval_tokens} tokens x {len(DOMAINS)} domains, one stream per domain and "
          f"layer; hit rate (cold misses count)", overall)
    print("\nper domain, 2x top-k\n")
    print("| domain | " + " | ".join(POLICIES) + " | of Belady |")
    print("|---|" + "---|" * (len(POLICIES) + 1))
    for d, r in per_domain.items():
        print(f"| {d} | " + " | ".join(f"{r[p][2]:.3f}" for p in POLICIES) +
              f" | {r['predictive'][2] / r['belady'][2]:.3f} |")
    stats = demo_statistics([s[0] for s in streams], len(view.layers), view.num_experts, view.top_k)
    return {"model": desc, "predictor": fit, "eval_tokens_per_domain": args.eval_tokens, "overall": overall,
            "domains": per_domain, "next_token_recall_per_domain": dict(zip(DOMAINS, recall)),
            "verdict": verdict(overall), "verdict_per_domain": {d: verdict(r) for d, r in per_domain.items()},
            "statistics": stats}


def demo_statistics(ids_streams, L: int, E: int, K: int, window: int = 256) -> dict:
    """Per layer: next-token reuse rate |K_t & K_t+1| / K and the mean normalised entropy of expert frequency within
    256-token windows, over the streams (ids [T, K], layer = stream index mod L)."""
    reuse, entropy = [[] for _ in range(L)], [[] for _ in range(L)]
    for i, ids in enumerate(ids_streams):
        l = i % L
        reuse[l].append(reuse_rate(ids))
        entropy[l].append(window_entropy(ids, E, window))
    return {"reuse": [float(np.mean(r)) for r in reuse], "window_entropy": [float(np.mean(h)) for h in entropy]}


def reuse_rate(ids: np.ndarray) -> float:
    """Mean |K_t & K_t+1| / K over consecutive tokens of ids [T, K]."""
    hot = np.zeros((ids.shape[0], int(ids.max()) + 1), bool)
    np.put_along_axis(hot, ids, True, axis=1)
    return float((hot[:-1] & hot[1:]).sum(1).mean() / ids.shape[1])


def window_entropy(ids: np.ndarray, E: int, window: int) -> float:
    hs = []
    for s in range(0, len(ids) - window + 1, window):
        f = np.bincount(ids[s:s + window].ravel(), minlength=E) / ids[s:s + window].size
        hs.append(-(f[f > 0] * np.log(f[f > 0])).sum() / np.log(E))
    return float(np.mean(hs))


# part 2: synthetic traces with the demo's statistics ---------------------------------------------------------------
@dataclass
class SyntheticRouting:
    """A routing process with a hidden state, so a predictor can be trained on it as on a model: per window of 256
    tokens a topic vector mu ~ N(0, I_D); per layer l an AR(1) state h_t = rho_l h_{t-1} + sqrt(1 - rho_l^2) eps_t;
    the layer's state u_t = a_l mu + h_t; routing = top-K of u_t R_l (R_l ~ N(0, 1/D) [D, E], fixed), weights =
    softmax over the selected logits. rho_l sets the next-token reuse (temporal locality), a_l the concentration
    within a window (topic locality); both are fitted per layer to the demo's measurements (`fit`). What a predictor
    sees, the "hidden state" [2D], is u_t and the mean of the window's u so far: a model's hidden state carries its
    context (attention), a lone u_t would not."""

    num_experts: int
    top_k: int
    rho: list[float]
    topic: list[float]
    dim: int = 64
    window: int = 256
    seed: int = 0

    def routers(self) -> list[np.ndarray]:
        rng = np.random.default_rng(10_000 + self.num_experts)
        return [rng.normal(size=(self.dim, self.num_experts)) / np.sqrt(self.dim) for _ in self.rho]

    def sample(self, windows: int, seed: int) -> pt.Collected:
        """`windows` windows of routing: per layer hidden states [T, D] (float16), ids / weights [T, K]."""
        from scipy.signal import lfilter

        rng, R = np.random.default_rng(seed), self.routers()
        T, xs, ids, ws = windows * self.window, [], [], []
        mu = np.repeat(rng.normal(size=(windows, 1, self.dim)), self.window, axis=1)  # [W, S, D]
        for l, (rho, a) in enumerate(zip(self.rho, self.topic)):
            eps = rng.normal(size=(windows, self.window, self.dim))
            eps[:, 0] /= np.sqrt(1 - rho * rho)  # each window starts in the stationary distribution
            h = lfilter([np.sqrt(1 - rho * rho)], [1.0, -rho], eps, axis=1)  # AR(1) along each window
            u = (a * mu + h).reshape(T, self.dim)  # [T, D]
            logits = u @ R[l]  # [T, E]
            top = np.argsort(-logits, axis=1, kind="stable")[:, :self.top_k]  # [T, K]
            sel = np.take_along_axis(logits, top, 1)
            w = np.exp(sel - sel.max(1, keepdims=True))
            context = np.cumsum(u.reshape(windows, self.window, self.dim), axis=1) / \
                np.arange(1, self.window + 1)[None, :, None]  # running mean within each window
            xs.append(np.concatenate([u, context.reshape(T, self.dim)], 1).astype(np.float16))
            ids.append(top)
            ws.append((w / w.sum(1, keepdims=True)).astype(np.float32))
        return pt.Collected(xs, ids, ws, np.arange(T) // self.window)

    @classmethod
    def fit(cls, num_experts: int, top_k: int, target: dict) -> SyntheticRouting:
        """Per layer, the (rho, a) on a grid (rho 0-0.95 by 0.05, a 0-2 by 0.125) whose sample (32 windows) comes
        closest to the target reuse rate and window entropy (squared error)."""
        grid = [(r, a) for r in np.arange(0, 0.96, 0.05).round(2) for a in np.arange(0, 2.01, 0.125)]
        measured = {}
        for rho, a in grid:
            s = cls(num_experts, top_k, [float(rho)], [float(a)]).sample(32, seed=3).ids[0]
            measured[(float(rho), float(a))] = (reuse_rate(s), window_entropy(s, num_experts, 256))
        chosen = [min(measured, key=lambda k: (measured[k][0] - r) ** 2 + (measured[k][1] - h) ** 2)
                  for r, h in zip(target["reuse"], target["window_entropy"])]
        return cls(num_experts, top_k, [c[0] for c in chosen], [c[1] for c in chosen])


def synthetic_part(args, target: dict) -> dict:
    out = {}
    for E in (64, 128):
        K = 8
        proc = SyntheticRouting.fit(E, K, target)
        train, test = proc.sample(args.synthetic_windows, seed=1), proc.sample(args.synthetic_windows // 2, seed=2)
        L = len(proc.rho)
        spec = PredictorSpec("synthetic", "-", tuple(range(L)), E, K, 2 * proc.dim)
        predictor = pt.train_spec(spec, train, np.zeros(train.tokens, bool), pt.TrainOptions(steps=args.steps))
        streams = [(test.ids[l], test.weights[l], predictor.forecast(l, test.x[l], test.ids[l], test.weights[l]))
                   for l in range(L)]
        rates = hit_rates(streams, K, E, oracles(E))
        stats = demo_statistics(test.ids, L, E, K)
        table(f"synthetic routing, {E} experts, top-{K}, {L} layers, {test.tokens} test tokens (rho {proc.rho}, "
              f"topic {proc.topic}); measured reuse {[round(r, 3) for r in stats['reuse']]}, window entropy "
              f"{[round(h, 3) for h in stats['window_entropy']]}", rates)
        out[str(E)] = {"top_k": K, "rho": proc.rho, "topic": proc.topic, "train_tokens": train.tokens,
                       "test_tokens": test.tokens, "statistics": stats, "rates": rates, "verdict": verdict(rates),
                       "next_token_recall": pt.evaluate(predictor, test)["next_token"]["recall"]}
    return out


# part 3: decode on the synthetic offloaded model -------------------------------------------------------------------
def offload_part(args) -> dict:
    from offload import synthetic_checkpoint  # benchmarks/offload.py

    import moekit.runtime as rt
    from moekit.runtime.checkpoint import build_store_from_checkpoint, load_from_store

    args.work.mkdir(parents=True, exist_ok=True)
    path = synthetic_checkpoint(args.work / "synthetic-qwen3moe-4l", 4)
    _, tok, _ = load_demo(None)
    calib = [w for ws in calib_windows(tok, args.offload_calib_tokens, DOMAINS, default_calib_split()).values()
             for w in ws]
    view = moekit.models.load(path, dtype=torch.float32)  # in memory once, to fit its predictor
    view.model.eval()
    t0 = time.perf_counter()
    predictor = pt.train(view, pt.collect(view, calib), pt.TrainOptions(steps=args.offload_steps))
    fit_s = time.perf_counter() - t0
    del view
    gc.collect()
    store = args.work / "store-cache-policies"
    build_store_from_checkpoint(path, store)
    expert_bytes = rt.ExpertStore(store).expert_bytes
    prompts = _prompts(tok, args.prompts, args.new_tokens + 8)
    runs = {p: [] for p in ("lru", "score", "lfru", "predictive")}  # lfru: the predictive policy without forecasts
    for rep in range(args.repeats):
        for policy in runs:  # interleaved: the shared disk and CPUs drift between runs
            gc.collect()
            view = load_from_store(path, store)
            budget = int(0.25 * expert_bytes * view.num_experts * len(view.layers))
            om = rt.offload(view, store, budget, policy=policy, prefetch=False, drop_cache=True, record=True,
                            predictor=predictor if policy == "predictive" else None)
            runs[policy].append(teacher_forced(om, prompts, 8))
            om.close()
            print(f"  rep {rep} {policy}: {runs[policy][-1]['tok_s']:.2f} tok/s, "
                  f"{runs[policy][-1]['bytes_per_token'] / 1e6:.1f} MB/token, hit rate "
                  f"{runs[policy][-1]['hit_rate']:.3f}", flush=True)
    greedy = greedy_check(path, store, prompts[0][:8], args.new_tokens)
    summary = {p: {k: {"median": float(np.median([r[k] for r in rs])), "min": float(min(r[k] for r in rs)),
                       "max": float(max(r[k] for r in rs))} for k in ("tok_s", "bytes_per_token", "hit_rate")}
               for p, rs in runs.items()}
    workload = {"distinct_tokens_fed": len({int(t) for p in prompts for t in p[8:]}),
                "tokens_fed": sum(len(p) - 8 for p in prompts),
                "distinct_experts_per_layer": runs["lru"][0]["distinct_experts"], "greedy": greedy}
    print(f"\nsynthetic offloaded model ({expert_bytes / 1e6:.1f} MB per expert, 16 of 64 experts per layer in "
          f"memory), teacher-forced decode of {workload['tokens_fed']} held-out tokens ({workload['distinct_tokens_fed']}"
          f" distinct), {args.repeats} interleaved repeats: median (min-max)\n")
    print("| policy | decode tok/s | MB read per token | hit rate |")
    print("|---|---|---|---|")
    for p, s in summary.items():
        print(f"| {p} | {s['tok_s']['median']:.2f} ({s['tok_s']['min']:.2f}-{s['tok_s']['max']:.2f}) | "
              f"{s['bytes_per_token']['median'] / 1e6:.1f} ({s['bytes_per_token']['min'] / 1e6:.1f}-"
              f"{s['bytes_per_token']['max'] / 1e6:.1f}) | {s['hit_rate']['median']:.3f} |")
    print(f"\nworkload: {workload['distinct_experts_per_layer']} distinct experts per layer used; greedy decoding of "
          f"the same prompt would give {greedy['distinct']} distinct tokens in {greedy['tokens']} ({greedy['text']})")
    held = predictor.training["held_out"]
    cache = predictor.training["held_out_cache"]
    print(f"its predictor, fitted on {sum(map(len, calib))} tokens in {fit_s:.0f} s: held-out recall next layer "
          f"{held['next_layer']['recall']:.3f}, next token (reuse) {held['next_token']['recall']:.3f}; held-out hit "
          f"rate at {cache['capacity']}: predictive {cache['predictive']:.3f}, lfru {cache['lfru']:.3f}")
    return {"expert_bytes": expert_bytes, "predictor_fit_seconds": round(fit_s, 1), "calib_tokens": sum(map(len, calib)),
            "predictor_held_out": held, "predictor_held_out_cache": cache,
            "runs": runs, "summary": summary, "workload": workload,
            "ratio_tok_s": {o: summary["predictive"]["tok_s"]["median"] / summary[o]["tok_s"]["median"]
                            for o in ("lru", "score")},
            "ratio_bytes": {o: summary["predictive"]["bytes_per_token"]["median"] /
                            summary[o]["bytes_per_token"]["median"] for o in ("lru", "score")}}


def _prompts(tok, n: int, length: int) -> list[np.ndarray]:
    """n held-out windows of `length` tokens, from different domains (not the predictor's calibration text)."""
    ws = eval_windows(tok, length)
    return [ws[d][0][:length] for d in DOMAINS[:n]]


def teacher_forced(om, prompts, prefill: int) -> dict:
    """Prefill each prompt's first tokens, then one decode step per remaining token, fed the text's next token (not
    the model's argmax); tokens/s and bytes read over the decode steps only."""
    model, steps, secs, read, looked, hits = om.model, 0, 0.0, 0, 0, 0
    with torch.no_grad():
        for p in prompts:
            ids = torch.as_tensor(p, dtype=torch.long)[None]
            out = model(ids[:, :prefill], use_cache=True)
            past, before = out.past_key_values, om.totals()
            t0 = time.perf_counter()
            for t in range(prefill, ids.shape[1]):
                out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
                past = out.past_key_values
            secs += time.perf_counter() - t0
            after = om.totals()
            steps += ids.shape[1] - prefill
            read += after["bytes_read"] - before["bytes_read"]
            looked += after["hits"] + after["misses"] - before["hits"] - before["misses"]
            hits += after["hits"] - before["hits"]
    return {"tok_s": steps / secs, "bytes_per_token": read / steps, "hit_rate": hits / looked, "steps": steps,
            "distinct_experts": [int(np.unique(ids).size) for ids in om.routing()]}


def greedy_check(path, store, prompt, new_tokens: int) -> dict:
    """What greedy decoding of the random-weight model produces from a real prompt (it loops)."""
    import moekit.runtime as rt
    from moekit.runtime.checkpoint import load_from_store

    view = load_from_store(path, store)
    om = rt.offload(view, store, "2GB", prefetch=False)
    with torch.no_grad():
        out = view.model.generate(torch.as_tensor(prompt, dtype=torch.long)[None], max_new_tokens=new_tokens,
                                  do_sample=False)[0, len(prompt):].tolist()
    om.close()
    return {"tokens": len(out), "distinct": len(set(out)), "text": " ".join(map(str, out[:12])) + " ..."}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="demo,synthetic,offload")
    ap.add_argument("--model", default=None, help="demo part: checkpoint (default demo/model)")
    ap.add_argument("--predictor", default=None, help="demo part: a predictor file (default: fit one in this run)")
    ap.add_argument("--predictor-tokens", type=int, default=42000, help="calibration tokens per domain for the fit")
    ap.add_argument("--calib-split", choices=["train", "heldout"], default=default_calib_split())
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per domain")
    ap.add_argument("--steps", type=int, default=4000, help="predictor training steps per layer and head group")
    ap.add_argument("--synthetic-windows", type=int, default=128, help="256-token windows of synthetic training")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48, help="decode steps per prompt (offload part)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--offload-calib-tokens", type=int, default=1024, help="per domain, for the synthetic model's "
                                                                           "predictor")
    ap.add_argument("--offload-steps", type=int, default=500, help="its training steps (8 K tokens: ~30 passes)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moekit-bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    t0 = time.perf_counter()
    result = {"benchmark": "cache_policies", "load_average": os.getloadavg()}
    if "demo" in parts or "synthetic" in parts:
        result["demo"] = demo_part(args)
    if "synthetic" in parts:
        result["synthetic"] = synthetic_part(args, result["demo"]["statistics"])
    if "offload" in parts:
        result["offload"] = offload_part(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["load_average_end"] = os.getloadavg()
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
