"""Next-layer expert prediction on the demo model: pre-gating (Pre-gated MoE, arXiv 2308.12066) against
activation-matrix matching (MoE-Infinity, arXiv 2401.14361) and the learned routing predictor
(moekit/runtime/predictor.py; ExpertFlow, arXiv 2410.17954), precision and recall on the same held-out tokens, next to
a calibration-frequency baseline measured in the same run, and each predictor's cost against the layer's own.

    .venv/bin/python benchmarks/prediction.py [--model demo/model] [--max-tokens 1024] [--windows 16]
                                              [--predictor P | --predictor-tokens 42000]

Predictors of the experts of MoE layer position l >= 1 for one token (layer 0 has no earlier layer to predict from):
- pregate: layer l's router on the hidden state that entered layer l-1's MoE block, the k best of its routing order
  (what moekit.runtime.engine's prefetch does at k = top_k; the training-free form of Pre-gated MoE's pre-gate,
  arXiv 2308.12066, which trains its own).
- eam: MoE-Infinity's activation-matrix matching (arXiv 2401.14361; moekit.runtime.eam.ActivationMatrixPredictor),
  reset per window, after observing layers 0..l-1 of this token and every layer of the window's earlier tokens.
- frequency: layer l's k most frequent experts on the calibration text, the same for every token.
- union: pregate | eam at the same k (up to 2k experts): whether combining the two would help.
- learned: the routing predictor's d = 1 head at layer l-1 (its input: the experts' input there and that layer's
  routing), fitted in this run on --predictor-tokens calibration tokens per domain (the training split, or the
  held-out files' second half: never the evaluation text), or read from --predictor.
Each at k = top_k and k = 2 * top_k. The learned predictor also names the next token's first layer from the last
layer (pre-gating and the EAM cannot): reported on its own line, next to the frequency baseline. Precision = |pred & actual| / |pred|, recall = |pred & actual| / |actual|, summed
over tokens and layers 1..L-1 (eam and union may predict fewer than k, so their precision is not their recall).

Data (benchmarks/_demo.py): evaluation on the first --max-tokens held-out tokens of each domain, in 256-token windows;
calibration (the EAM collection, one EAM per window, and the frequency baseline) on --windows windows per domain of the
training split when demo/corpus/train exists, else of the held-out files' second half (--calib-split), disjoint from
the evaluation either way. One full-window forward gives every position's MoE-block inputs and routing: the model is
causal, so position t's hidden states are those of a decode step at t. float32, one thread. Ends with one JSON line.
Cost: microseconds per prediction (one token, one layer, one thread) against one decoder layer's decode step of the
in-memory model (one token with a KV cache, eager experts), timed alternately in the same decode loop (time_decode);
plus multiply-adds.
Dimension legend: T tokens, K selected, E experts, L MoE layers, H hidden, P predictors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch
from _demo import (DOMAINS, SEQ, calib_windows, default_calib_split, eval_windows, fit_predictor,  # benchmarks/_demo.py
                   load_demo)

import moekit.models
from moekit.ops.routing import route
from moekit.runtime.eam import ActivationMatrixPredictor, collection_from_sequences
from moekit.trace.capture import RouterCapture

PREDICTORS = ["frequency", "eam", "pregate", "union", "learned"]


# one forward per window ----------------------------------------------------------------------------------------------
def run_window(view, window: np.ndarray) -> tuple[list[torch.Tensor], list[np.ndarray], list[np.ndarray]]:
    """MoE-block inputs (L x [T, H]), the ids each MoE layer selected (L x [T, K], by weight) and their weights for one
    window."""
    xs: dict[int, torch.Tensor] = {}
    hooks = [layer.block.register_forward_pre_hook(lambda m, args, i=layer.index: xs.__setitem__(i, args[0].detach()))
             for layer in view.layers]
    try:
        with RouterCapture(view) as cap, torch.inference_mode():
            ids = torch.as_tensor(window, dtype=torch.long)[None]  # [1, T]
            view.forward(ids, head=False, use_cache=False)
            routed = cap.take(torch.ones(ids.numel(), dtype=torch.bool))
    finally:
        for h in hooks:
            h.remove()
    H = view.config.hidden_size
    return ([xs[layer.index].reshape(-1, H) for layer in view.layers],
            [routed[layer.index][0].astype(np.int64) for layer in view.layers],
            [routed[layer.index][1] for layer in view.layers])


def router_top(layer, x: torch.Tensor, k: int) -> torch.Tensor:
    """The k best experts [T, k] of layer's routing order on inputs x [T, H]: its own rule with top_k = k (renormalising
    and scaling do not reorder; group-limited rules stay group-limited)."""
    with torch.inference_mode():
        _, ids = route(layer.router_logits(x), dataclasses.replace(layer.rule, top_k=k), layer.correction_bias)
    return ids


# predictions as masks [T, L, E] (layer 0 all False: nothing predicts it) ------------------------------------------------
def ids_mask(ids: np.ndarray, E: int) -> np.ndarray:
    """[T, k] ids -> [T, E] bool."""
    mask = np.zeros((ids.shape[0], E), bool)
    np.put_along_axis(mask, ids, True, axis=1)
    return mask


def pregate_masks(view, xs: list[torch.Tensor], k: int) -> np.ndarray:
    """Layer l's router on layer l-1's MoE-block input xs[l-1] [T, H], its k best per token."""
    T, L, E = xs[0].shape[0], len(view.layers), view.num_experts
    out = np.zeros((T, L, E), bool)
    for l in range(1, L):
        out[:, l] = ids_mask(router_top(view.layers[l], xs[l - 1], k).numpy(), E)
    return out


def learned_masks(predictor, xs: list[torch.Tensor], ids: list[np.ndarray], ws: list[np.ndarray], k: int):
    """Routing head d = 1 at layer l-1 for layer l [T, L, E]; and from the last layer, the next token's layer 0 [T, E]
    (its last row has no next token)."""
    T, L, E = xs[0].shape[0], len(xs), predictor.spec.num_experts
    out = np.zeros((T, L, E), bool)
    heads = [predictor.predict(l, xs[l], ids[l], ws[l], d=1, k=k) for l in range(L)]
    for l in range(1, L):
        out[:, l] = ids_mask(heads[l - 1], E)
    return out, ids_mask(heads[-1], E)


def eam_masks(pred: ActivationMatrixPredictor, ids: list[np.ndarray]) -> np.ndarray:
    """Decode order, token by token: predict layer l after observing layers < l of this token (and all earlier ones)."""
    T, L = ids[0].shape[0], len(ids)
    out = np.zeros((T, L, pred.num_experts), bool)
    pred.reset()  # one window = one request
    for t in range(T):
        for l in range(L):
            row = ids[l][t:t + 1]  # [1, K]
            if l > 0:
                out[t, l, list(pred.predict(l))] = True
                pred.score(l, row)  # its own counters, checked against ours in main
            pred.observe(l, row)
    return out


def frequency_masks(counts: np.ndarray, k: int, T: int) -> np.ndarray:
    """Each layer's k most used experts on calibration (counts [L, E]; ties: lowest id), for all T tokens."""
    top = np.argsort(-counts, axis=1, kind="stable")[:, :k]  # [L, k]
    per_layer = ids_mask(top, counts.shape[1])  # [L, E]
    per_layer[0] = False
    return np.broadcast_to(per_layer, (T, *counts.shape))


def tally(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """[L, 3] predicted, actual, correct per layer, summed over tokens (pred, actual [T, L, E] bool); row 0 stays zero:
    no predictor has a target there."""
    out = np.stack([pred.sum(axis=(0, 2)), actual.sum(axis=(0, 2)), (pred & actual).sum(axis=(0, 2))], 1)  # [L, 3]
    out[0] = 0
    return out


def rates(c: np.ndarray) -> dict:
    """Precision/recall of counters [..., 3] (predicted, actual, correct) summed over the leading axes."""
    p, a, ok = (int(v) for v in c.reshape(-1, 3).sum(0))
    return {"precision": ok / p if p else float("nan"), "recall": ok / a if a else float("nan"),
            "predicted": p, "actual": a, "correct": ok}


# calibration ---------------------------------------------------------------------------------------------------------
def calibrate(view, tok, windows: int, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(EAM collection [N, L, E], expert counts [L, E], calibration tokens) from `windows` windows per domain."""
    seqs = [run_window(view, w)[1] for ws in calib_windows(tok, windows * SEQ, DOMAINS, split).values() for w in ws]
    counts = np.stack([np.bincount(np.concatenate([s[l] for s in seqs]).ravel(), minlength=view.num_experts)
                       for l in range(len(view.layers))])  # [L, E]
    return collection_from_sequences(seqs, view.num_experts), counts, sum(len(s[0]) for s in seqs)


# timing (cost of one prediction, as a decode step pays it) -----------------------------------------------------------
def time_pregate(view, x: torch.Tensor, k: int) -> float:
    """Seconds per prediction: layer 1's router on one token's hidden state [1, H] at a time."""
    t0 = time.perf_counter()
    for t in range(x.shape[0]):
        router_top(view.layers[1], x[t:t + 1], k)
    return (time.perf_counter() - t0) / x.shape[0]


def time_decode(view, predictor, window: np.ndarray, steps: int = 48) -> tuple[float, float, float]:
    """(seconds per decoder layer and decode step of the in-memory model, seconds per predictor call on that layer's
    inputs: the cache forecast alone (what `--policy predictive` pays), forecast + next-layer experts (with
    prefetch)), medians over layers and steps: one token with a KV cache, eager experts; after each step the predictor
    runs on what each MoE layer saw, so both are timed under the same load and cache state."""
    marks, spent = [], []
    layers = view.model.model.layers
    hooks = [m.register_forward_pre_hook(lambda *a: marks.append(time.perf_counter())) for m in layers]
    hooks += [m.register_forward_hook(lambda *a: marks.append(time.perf_counter())) for m in layers]
    try:
        with RouterCapture(view, inputs=True) as cap, torch.inference_mode():
            out = _base_forward(view, window[:16], None)
            cap.take(torch.ones(16, dtype=torch.bool)), cap.take_inputs(torch.ones(16, dtype=torch.bool))
            past, marks[:] = out.past_key_values, []
            for t in window[16:16 + steps]:
                past = _base_forward(view, [t], past).past_key_values
                one = torch.ones(1, dtype=torch.bool)
                routed, inputs = cap.take(one), cap.take_inputs(one)
                for pos, layer in enumerate(view.layers):
                    args = pos, inputs[layer.index], *routed[layer.index][:2]
                    t0 = time.perf_counter()
                    predictor.forecast(*args)
                    t1 = time.perf_counter()
                    predictor.predict(*args)
                    spent.append((t1 - t0, time.perf_counter() - t0))
    finally:
        for h in hooks:
            h.remove()
    forecast, both = np.median(spent, axis=0)
    return float(np.median(np.diff(marks)[::2])), float(forecast), float(both)


def _base_forward(view, tokens, past):
    return view.model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None], past_key_values=past, use_cache=True)


def score_window(view, window: np.ndarray, eams: dict, freq: np.ndarray, ks: list[int], learned):
    """One evaluation window -> (counters [P, len(ks), L, 3], |pregate & eam| summed per k [len(ks)], eam seconds,
    next-token first-layer counters [2 (frequency, learned), len(ks), 3], MoE-block inputs L x [T, H])."""
    L, E, K = len(view.layers), view.num_experts, view.top_k
    xs, ids, ws = run_window(view, window)  # L x [T, H], L x [T, K], L x [T, K]
    actual = np.stack([ids_mask(i, E) for i in ids], 1)  # [T, L, E]
    # invariant: the router applied outside the model reproduces what the model routed (pre-gating's basis)
    assert all((ids_mask(router_top(layer, x, K).numpy(), E) == actual[:, l]).all()
               for l, (layer, x) in enumerate(zip(view.layers, xs))), "router_top disagrees with the model"
    counts, overlap, eam_s = np.zeros((len(PREDICTORS), len(ks), L, 3), np.int64), np.zeros(len(ks)), 0.0
    first = np.zeros((2, len(ks), 3), np.int64)  # next token's layer 0 from the last layer: frequency, learned
    for j, k in enumerate(ks):
        pg = pregate_masks(view, xs, k)  # [T, L, E]
        t0 = time.perf_counter()
        em = eam_masks(eams[k], ids)  # [T, L, E]
        eam_s += time.perf_counter() - t0
        lm, lm_first = learned_masks(learned, xs, ids, ws, k)
        for p, mask in enumerate([frequency_masks(freq, k, len(window)), em, pg, pg | em, lm]):  # PREDICTORS order
            counts[p, j] = tally(mask, actual)
        overlap[j] = (pg & em).sum()
        nxt = actual[1:, 0]  # [T-1, E] the next token's layer 0
        for p, mask in enumerate([np.broadcast_to(ids_mask(np.argsort(-freq[0], kind="stable")[None, :k], E),
                                                  nxt.shape), lm_first[:-1]]):
            first[p, j] = mask.sum(), nxt.sum(), (mask & nxt).sum()
    return counts, overlap, eam_s, first, xs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=1024, help="held-out evaluation tokens per domain")
    ap.add_argument("--windows", type=int, default=16,
                    help=f"calibration text per domain, in {SEQ}-token windows (one EAM per window; windows end at "
                         "document ends, so there can be more EAMs)")
    ap.add_argument("--calib-split", choices=["train", "heldout"], default=default_calib_split(),
                    help="calibration text: the training split, or the held-out files' second half")
    ap.add_argument("--predictor", default=None, help="a routing predictor file (default: fit one in this run)")
    ap.add_argument("--predictor-tokens", type=int, default=42000,
                    help="calibration tokens per domain the predictor is fitted on (the held-out second half has "
                         "35-49 K per domain)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the shared 2-core machine; also keeps the run deterministic
    t0 = time.perf_counter()

    model, tok, desc = load_demo(args.model)
    view = moekit.models.load(model)
    L, E, K = len(view.layers), view.num_experts, view.top_k
    if L < 2:
        raise SystemExit(f"{desc} has {L} MoE layer: next-layer prediction needs at least 2")
    ks = [K, 2 * K]
    collection, freq, calib_tokens = calibrate(view, tok, args.windows, args.calib_split)
    eams = {k: ActivationMatrixPredictor(collection, k) for k in ks}
    if args.predictor:
        from moekit.runtime.predictor import load

        learned, fit = load(args.predictor), {"file": args.predictor}
    else:
        learned, n, secs = fit_predictor(view, tok, args.predictor_tokens, args.calib_split)
        fit = {"calib_tokens": n, "fit_seconds": round(secs, 1)}
    learned.check(view)

    counts = {d: np.zeros((len(PREDICTORS), len(ks), L, 3), np.int64) for d in DOMAINS}  # [P, k, L, 3] per domain
    overlap, eam_s, n_tokens, first = np.zeros(len(ks)), 0.0, 0, np.zeros((2, len(ks), 3), np.int64)
    pregate_s, forecast_s, learned_s, layer_s = [], [], [], []
    for d, ws in eval_windows(tok, args.max_tokens).items():
        for i, w in enumerate(ws):
            c, o, s, f, xs = score_window(view, w, eams, freq, ks, learned)
            counts[d] += c
            overlap, eam_s, n_tokens, first = overlap + o, eam_s + s, n_tokens + len(w), first + f
            if i == 0:  # one window per domain is enough for a per-call cost; interleaved, so load hits all alike
                pregate_s.append(time_pregate(view, xs[0], K))
                layer, forecast, both = time_decode(view, learned, w)
                layer_s.append(layer)
                forecast_s.append(forecast)
                learned_s.append(both)

    total = sum(counts.values())  # [P, k, L, 3]
    for j, k in enumerate(ks):  # our masks and the predictor's own counters must agree
        c = eams[k].counters()
        assert (c["predicted"], c["actual"], c["correct"]) == tuple(total[1, j].sum(0)), (c, total[1, j].sum(0))
    n_pred = n_tokens * (L - 1)  # token-layers with a prediction
    result = {
        "benchmark": "prediction", "model": desc, "threads": torch.get_num_threads(), "top_k": K, "experts": E,
        "moe_layers": L, "eval_tokens_per_domain": args.max_tokens, "eval_tokens": n_tokens,
        "calib_split": args.calib_split, "calib_windows_per_domain": args.windows, "calib_tokens": calib_tokens,
        "eams": int(collection.shape[0]), "seconds": round(time.perf_counter() - t0, 1),
        "us_per_prediction": {"eam": round(eam_s / (n_pred * len(ks)) * 1e6, 1),
                              "pregate": round(float(np.median(pregate_s)) * 1e6, 1),
                              "learned_forecast": round(float(np.median(forecast_s)) * 1e6, 1),
                              "learned_forecast_and_next_layer": round(float(np.median(learned_s)) * 1e6, 1)},
        "us_per_decoder_layer": round(float(np.median(layer_s)) * 1e6, 1),
        "learned_cost_of_layer": {
            "forecast": {"time": float(np.median(forecast_s) / np.median(layer_s)),
                         "macs": learned.spec.macs("reuse") / layer_macs(view)},
            "forecast_and_next_layer": {"time": float(np.median(learned_s) / np.median(layer_s)),
                                        "macs": (learned.spec.macs("reuse") + learned.spec.macs("route")) /
                                        layer_macs(view)}},
        "learned_fit": fit,
        "next_token_first_layer": {f"{name}@{k}": rates(first[p, j]) for j, k in enumerate(ks)
                                   for p, name in enumerate(["frequency", "learned"])},
        "overall": {f"{name}@{k}": {**rates(total[p, j]), "layers": {str(l): rates(total[p, j, l]) for l in range(1, L)}}
                    for j, k in enumerate(ks) for p, name in enumerate(PREDICTORS)},
        "pregate_eam_overlap": {str(k): overlap[j] / n_pred for j, k in enumerate(ks)},
        "domains": {d: {f"{name}@{k}": rates(c[p, j]) for j, k in enumerate(ks) for p, name in enumerate(PREDICTORS)}
                    for d, c in counts.items()},
    }
    print_tables(result, ks, L)
    print(json.dumps(result, default=float))


def layer_macs(view) -> int:
    """Multiply-adds of one decoder layer for one token, attention projections + router + top-k experts (attention
    scores over the context excluded, which only adds to it)."""
    c = view.config
    heads, kv, hd = c.num_attention_heads, c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // \
        c.num_attention_heads
    attention = c.hidden_size * hd * (2 * heads + 2 * kv)  # q, o and k, v projections
    return attention + c.hidden_size * view.num_experts + view.top_k * view.layers[0].expert_numel()


def print_tables(r: dict, ks: list[int], L: int) -> None:
    print(f"\nmodel: {r['model']}; eval {r['eval_tokens']} held-out tokens ({r['eval_tokens_per_domain']}/domain x "
          f"{len(DOMAINS)}, windows of {SEQ}); calibration {r['calib_tokens']} tokens ({r['calib_split']} split, "
          f"{r['eams']} EAMs); top-{r['top_k']} of {r['experts']}; {r['seconds']:.0f} s\n")
    head = ["predictor@k", *[f"layer {l} P / R" for l in range(1, L)], "all P", "all R"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for k in ks:
        for name in PREDICTORS:
            row = r["overall"][f"{name}@{k}"]
            cells = [f"{name}@{k}", *[f"{row['layers'][str(l)]['precision']:.3f} / {row['layers'][str(l)]['recall']:.3f}"
                                      for l in range(1, L)], f"{row['precision']:.3f}", f"{row['recall']:.3f}"]
            print("| " + " | ".join(cells) + " |")
    print("\nrecall per domain (layers 1..L-1)\n")
    head = ["domain", *[f"{name}@{k}" for k in ks for name in PREDICTORS]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for d in DOMAINS:
        print("| " + " | ".join([d, *[f"{r['domains'][d][f'{name}@{k}']['recall']:.3f}" for k in ks
                                      for name in PREDICTORS]]) + " |")
    ov, us = r["pregate_eam_overlap"], r["us_per_prediction"]
    print("\n|pregate & eam| per token-layer: " + ", ".join(f"{ov[str(k)]:.2f} of {k} at k={k}" for k in ks) +
          f"; cost per prediction (one token, one layer): eam {us['eam']} us, pregate {us['pregate']} us, "
          f"learned {us['learned_forecast_and_next_layer']} us (its cache forecast alone {us['learned_forecast']} us)")
    for name, cost in r["learned_cost_of_layer"].items():
        print(f"learned predictor, {name.replace('_', ' ')}: {cost['time']:.1%} of a decoder layer's decode step "
              f"({r['us_per_decoder_layer']} us, in-memory, one token), {cost['macs']:.1%} of its multiply-adds")
    nf = r["next_token_first_layer"]
    print("next token's first layer, from the last layer: " + ", ".join(
        f"{name}@{k} recall {nf[f'{name}@{k}']['recall']:.3f}" for k in ks for name in ("frequency", "learned")) + "\n")


if __name__ == "__main__":
    main()
