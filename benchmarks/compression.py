"""Expert pruning on the demo model: per-domain held-out perplexity after removing 25% and 50% of the experts, for every
pruning method, against the unpruned model measured in the same run.

    .venv/bin/python benchmarks/compression.py [--model demo/model] [--eval-tokens 2048] [--calib-tokens 4096]

Model: --model, else demo/model. Same protocol as benchmarks/compression_merge_quantize.py (benchmarks/_demo.py):
float32 on CPU; evaluation on the first --eval-tokens held-out tokens per domain in non-overlapping 256-token windows,
calibration on windows from the second half of the held-out files (disjoint from the evaluation).

Rows: base, then {random, frequency, tcess, easy-ep, naee} x {25%, 50% of experts removed} x {general calibration
(--calib-tokens spread over all 8 domains), single-domain calibration (--calib-tokens of --single only)}, each evaluated
on every domain. Calibration statistics are collected once per calibration set on the unpruned model and shared by the
methods. Columns: experts kept per layer, model bytes in bf16 (as the demo ships), perplexity per domain, macro
perplexity (exp of the mean per-domain NLL) and its ratio to base, mean |logit difference| to the base model on one full
window per domain (its longest, all cut to the shortest), and the mean relative MoE-layer output error ||Z - Z_pruned|| / ||Z|| on the calibration tokens
(what NAEE minimises; informative even on an untrained model). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from _demo import (  # noqa: E402  (benchmarks/_demo.py)
    DOMAINS, SEQ, calib_windows, default_calib_split, eval_windows, load_demo)

import moekit.models  # noqa: E402
from moekit.compress import prune as pruning  # noqa: E402
from moekit.compress.evaluate import batches, evaluate  # noqa: E402
from moekit.ops.reference import reference_moe_forward  # noqa: E402

METHODS = ["random", "frequency", "tcess", "easy-ep", "naee"]


def calibrate(model, tok, domains: list[str], tokens: int, split: str) -> pruning.Stats:
    """X, Z and the residual h of every MoE layer on `tokens` calibration tokens spread evenly over `domains`."""
    ws = calib_windows(tok, -(-tokens // len(domains)), domains, split)
    view = moekit.models.load(model)
    return pruning.collect_stats(view, batches([w for d in ws for w in ws[d]], 8), tokens, residual=True,
                                 sample_len=SEQ)


def score(model, eval_ws) -> dict:
    result = evaluate(model, eval_ws, batch_size=8).to_dict()
    return {**{d: r["perplexity"] for d, r in result["domains"].items()}, "macro": result["macro_perplexity"],
            "tokens": result["overall"]["tokens"]}


def bf16_bytes(model) -> int:
    return sum(p.numel() * 2 for p in model.parameters())


def probe_logits(model, probe: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(probe).logits.float()  # [D, S, V]


def layer_error(view, stats: pruning.Stats) -> float:
    """Mean over MoE layers of ||Z - Z_pruned||_F / ||Z||_F on the calibration tokens (the quantity NAEE minimises)."""
    errs = []
    with torch.inference_mode():
        for layer in view.layers:
            x, z = stats.cal.x[layer.index], stats.cal.z[layer.index]
            errs.append(((reference_moe_forward(layer, x) - z).norm() / z.norm()).item())
    return float(np.mean(errs))


def run_one(base, stats, method: str, n: int, eval_ws, probe, base_logits) -> tuple[dict, dict]:
    model = copy.deepcopy(base)
    view = moekit.models.load(model)
    t0 = time.time()
    plan = pruning.prune_view(view, stats, n, method)
    plan_s = time.time() - t0
    dlogit = (probe_logits(model, probe) - base_logits).abs().mean().item()
    return score(model, eval_ws), {"bytes": bf16_bytes(model), "search": plan.search, "plan_s": plan_s,
                                   "dlogit": dlogit, "layer_err": layer_error(view, stats)}


def markdown(rows: list[dict], base_macro: float) -> str:
    head = ["calibration", "method", "removed", "experts", "bf16 MiB", *DOMAINS, "macro", "x base", "|dlogit|",
            "layer err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["calib"], r["method"], r["removed"], str(r["experts"]), f"{r['bytes'] / 2**20:.1f}",
                 *[f"{r['ppl'][d]:.2f}" for d in DOMAINS], f"{r['ppl']['macro']:.2f}",
                 f"{r['ppl']['macro'] / base_macro:.3f}", f"{r['dlogit']:.3f}", f"{r['layer_err']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per domain")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens per calibration set")
    ap.add_argument("--calib-split", choices=["train", "heldout"], default=default_calib_split(),
                    help="calibration text: the training split, or the held-out files' second half")
    ap.add_argument("--single", default="code", help="the single calibration domain")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the shared 2-core machine: two threads under contention run ~10x slower (measured)
    t_start = time.time()
    base, tok, what = load_demo(args.model)
    print(f"model: {what}", flush=True)
    eval_ws = eval_windows(tok, args.eval_tokens)
    E = moekit.models.load(base).num_experts
    t0 = time.time()
    base_ppl = score(base, eval_ws)
    eval_s = time.time() - t0
    print(f"base: macro perplexity {base_ppl['macro']:.3f} on {base_ppl['tokens']} held-out tokens "
          f"({base_ppl['tokens'] / eval_s:.0f} tokens/s)", flush=True)
    longest = [max(eval_ws[d], key=len) for d in DOMAINS]  # some domains have no full window (short documents)
    cut = min(len(w) for w in longest)
    probe = torch.as_tensor(np.stack([w[:cut] for w in longest]), dtype=torch.long)  # [D, S] one window per domain
    base_logits = probe_logits(base, probe)
    rows = [{"calib": "-", "method": "base", "removed": "0%", "experts": E, "bytes": bf16_bytes(base),
             "ppl": base_ppl, "search": "-", "plan_s": 0.0, "dlogit": 0.0, "layer_err": 0.0}]
    calib_sets = {"general": DOMAINS, f"single ({args.single})": [args.single]}
    for calib_name, domains in calib_sets.items():
        stats = calibrate(base, tok, domains, args.calib_tokens, args.calib_split)
        for method in args.methods.split(","):
            for frac in (0.25, 0.5):
                n = E - round(frac * E)
                ppl, extra = run_one(base, stats, method, n, eval_ws, probe, base_logits)
                rows.append({"calib": calib_name, "method": method, "removed": f"{frac:.0%}", "experts": n,
                             "ppl": ppl, **extra})
                print(f"{calib_name:>15} {method:>9} -{frac:.0%}: macro {ppl['macro']:.3f}, |dlogit| "
                      f"{extra['dlogit']:.3f}, layer err {extra['layer_err']:.3f} (plan {extra['plan_s']:.1f}s, "
                      f"{extra['search']})", flush=True)
    print()
    print(f"Model: {what}. Eval: {args.eval_tokens} held-out tokens per domain (256-token windows); calibration: "
          f"{args.calib_tokens} calibration tokens per set ({args.calib_split} split). "
          f"Total {time.time() - t_start:.0f} s.\n")
    print(markdown(rows, base_ppl["macro"]))
    print(json.dumps({"benchmark": "prune", "model": what, "eval_tokens_per_domain": args.eval_tokens,
                      "calib_tokens": args.calib_tokens, "rows": rows}, default=str))


if __name__ == "__main__":
    main()
