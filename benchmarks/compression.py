"""Expert pruning on the demo model: per-domain held-out perplexity after removing 25% and 50% of the experts, for every
pruning method, against the unpruned model measured in the same run.

    .venv/bin/python benchmarks/compression.py [--model demo/model] [--eval-tokens 2048] [--calib-tokens 4096]

Model: --model, else demo/model. Same protocol as benchmarks/compression_merge_quantize.py (benchmarks/_demo.py):
float32 on CPU; evaluation on the first --eval-tokens held-out tokens per domain in non-overlapping 256-token windows,
calibration on windows from the second half of the held-out files (disjoint from the evaluation).

Rows: base; random over --seeds seeds (0, 1, ...; it uses no calibration), as mean and sample sd per column; then
{frequency, tcess, easy-ep, naee} x {25%, 50% of experts removed} x {general calibration (--calib-tokens spread over all
8 domains), single-domain calibration (--calib-tokens of --single only)}, each evaluated on every domain. Calibration
statistics are collected once per calibration set on the unpruned model and shared by the methods. Columns: experts kept
per layer, model bytes in bf16 (as the demo ships), perplexity per domain, macro perplexity (exp of the mean per-domain
NLL) and its ratio to base, mean |logit difference| to the base model on one full window per domain (its longest, all
cut to the shortest), and the mean relative MoE-layer output error ||Z - Z_pruned|| / ||Z||, on the held-out evaluation
windows ("layer err") and on the calibration tokens NAEE minimises it on ("calib err": an in-sample figure, shown to
make the gap visible). Then the orderings the numbers support: a method beats (or loses to) random only when its macro
perplexity lies outside random's mean +- 2 sd over the seeds, and two methods are ordered only when they differ by more
than 2 sd of random at that ratio (the only spread measured; calibration-sample noise is not, so this is a floor).
Ends with one JSON line.
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
from moekit.compress.calib import Calibration, collect  # noqa: E402
from moekit.compress.evaluate import batches, evaluate  # noqa: E402
from moekit.ops.reference import reference_moe_forward  # noqa: E402

METHODS = ["random", "frequency", "tcess", "easy-ep", "naee"]
SPREAD_SDS = 2.0  # an ordering is stated only when the gap exceeds this many sd of random over seeds


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


def layer_error(view, cal: Calibration) -> float:
    """Mean over MoE layers of ||Z - Z_pruned||_F / ||Z||_F, X and Z recorded on the unpruned model."""
    errs = []
    with torch.inference_mode():
        for layer in view.layers:
            x, z = cal.x[layer.index], cal.z[layer.index]
            errs.append(((reference_moe_forward(layer, x) - z).norm() / z.norm()).item())
    return float(np.mean(errs))


def heldout_blocks(model, eval_ws) -> Calibration:
    """X and Z of every MoE block on the held-out evaluation windows: layer error out of sample (NAEE's own search
    minimises it on the calibration tokens, so the in-sample figure flatters it)."""
    return collect(moekit.models.load(model), batches([w for d in DOMAINS for w in eval_ws[d]], 8))


def run_one(base, stats, method: str, n: int, eval_ws, probe, base_logits, heldout: Calibration,
            opts: pruning.PruneOptions | None = None) -> tuple[dict, dict]:
    model = copy.deepcopy(base)
    view = moekit.models.load(model)
    t0 = time.time()
    plan = pruning.prune_view(view, stats, n, method, opts)
    plan_s = time.time() - t0
    dlogit = (probe_logits(model, probe) - base_logits).abs().mean().item()
    return score(model, eval_ws), {"bytes": bf16_bytes(model), "search": plan.search, "plan_s": plan_s,
                                   "dlogit": dlogit, "layer_err": layer_error(view, heldout),
                                   "calib_err": layer_error(view, stats.cal)}


def mean_sd(runs: list[dict]) -> tuple[dict, dict]:
    """Per-key mean and sample sd (ddof 1) over runs of the same row: nested {"ppl": {...}} dicts included."""
    def agg(values, fn):
        if isinstance(values[0], dict):
            return {k: agg([v[k] for v in values], fn) for k in values[0]}
        return float(fn(values)) if isinstance(values[0], (int, float)) else values[0]

    return agg(runs, np.mean), agg(runs, lambda v: np.std(v, ddof=1))


def orderings(rows: list[dict], k: float = SPREAD_SDS) -> list[str]:
    """Plain-language orderings of macro perplexity that exceed random's seed spread (k sd), per calibration set and
    ratio; everything closer is reported as a tie."""
    lines = []
    rand = {r["removed"]: r for r in rows if r["method"] == "random"}
    for (calib, removed) in dict.fromkeys((r["calib"], r["removed"]) for r in rows if r["method"] not in
                                          ("base", "random")):
        mu, sd = rand[removed]["ppl"]["macro"], rand[removed]["sd"]["ppl"]["macro"]
        group = sorted((r for r in rows if (r["calib"], r["removed"]) == (calib, removed)),
                       key=lambda r: r["ppl"]["macro"])
        vs = []
        for r in group:
            m = r["ppl"]["macro"]
            verdict = "better" if m < mu - k * sd else "worse" if m > mu + k * sd else "tie"
            vs.append(f"{r['method']} {m:.1f} ({verdict})")
        lines.append(f"{calib}, -{removed}: vs random {mu:.1f} +- {sd:.1f} (sd over {rand[removed]['seeds']} seeds, "
                     f"tie = within +-{k:g} sd): " + ", ".join(vs))
        ties = [f"{a['method']} < {b['method']}" if b["ppl"]["macro"] - a["ppl"]["macro"] > k * sd
                else f"{a['method']} ~ {b['method']}" for a, b in zip(group, group[1:])]
        lines.append(f"  ordered only beyond {k:g} sd ({k * sd:.1f}): " + ", ".join(ties))
    return lines


def markdown(rows: list[dict], base_macro: float) -> str:
    head = ["calibration", "method", "removed", "experts", "bf16 MiB", *DOMAINS, "macro", "x base", "|dlogit|",
            "layer err", "calib err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sd = r.get("sd")  # random: mean +- sd over seeds

        def cell(get, fmt):
            return f"{get(r):{fmt}}" + (f" ± {get(sd):{fmt}}" if sd else "")

        method = f"random ({r['seeds']} seeds)" if sd else r["method"]
        cells = [r["calib"], method, r["removed"], str(r["experts"]), f"{r['bytes'] / 2**20:.1f}",
                 *[cell(lambda x, d=d: x["ppl"][d], ".1f" if sd else ".2f") for d in DOMAINS],
                 cell(lambda x: x["ppl"]["macro"], ".2f"), cell(lambda x: x["ppl"]["macro"] / base_macro, ".3f"),
                 cell(lambda x: x["dlogit"], ".3f"), cell(lambda x: x["layer_err"], ".3f"),
                 cell(lambda x: x["calib_err"], ".3f") if "calib_err" in r else "-"]
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
    ap.add_argument("--seeds", type=int, default=6, help="random pruning seeds (0..N-1), reported as mean and sd")
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
    heldout = heldout_blocks(base, eval_ws)
    rows = [{"calib": "-", "method": "base", "removed": "0%", "experts": E, "bytes": bf16_bytes(base),
             "ppl": base_ppl, "search": "-", "plan_s": 0.0, "dlogit": 0.0, "layer_err": 0.0}]
    methods = args.methods.split(",")
    calib_sets = {"general": DOMAINS, f"single ({args.single})": [args.single]}
    stats = {name: calibrate(base, tok, domains, args.calib_tokens, args.calib_split)
             for name, domains in calib_sets.items()}
    if "random" in methods:  # uses no calibration: one set of seeds serves every calibration set
        for frac in (0.25, 0.5):
            n = E - round(frac * E)
            runs = []
            for seed in range(args.seeds):
                ppl, extra = run_one(base, stats["general"], "random", n, eval_ws, probe, base_logits, heldout,
                                     pruning.PruneOptions(seed=seed))
                del extra["calib_err"]  # random reads no calibration: an in-sample error means nothing
                runs.append({"ppl": ppl, **extra})
                print(f"{'-':>15} {'random':>9} -{frac:.0%} seed {seed}: macro {ppl['macro']:.3f}", flush=True)
            mean, sd = mean_sd(runs)
            rows.append({"calib": "-", "method": "random", "removed": f"{frac:.0%}", "experts": n, **mean, "sd": sd,
                         "seeds": args.seeds, "runs": [r["ppl"]["macro"] for r in runs]})
    for calib_name in calib_sets:
        for method in (m for m in methods if m != "random"):
            for frac in (0.25, 0.5):
                n = E - round(frac * E)
                ppl, extra = run_one(base, stats[calib_name], method, n, eval_ws, probe, base_logits, heldout)
                rows.append({"calib": calib_name, "method": method, "removed": f"{frac:.0%}", "experts": n,
                             "ppl": ppl, **extra})
                print(f"{calib_name:>15} {method:>9} -{frac:.0%}: macro {ppl['macro']:.3f}, |dlogit| "
                      f"{extra['dlogit']:.3f}, layer err {extra['layer_err']:.3f} held-out / "
                      f"{extra['calib_err']:.3f} calib (plan {extra['plan_s']:.1f}s, {extra['search']})", flush=True)
    print()
    print(f"Model: {what}. Eval: {args.eval_tokens} held-out tokens per domain (256-token windows); calibration: "
          f"{args.calib_tokens} calibration tokens per set ({args.calib_split} split). "
          f"Total {time.time() - t_start:.0f} s.\n")
    print(markdown(rows, base_ppl["macro"]))
    if "random" in methods and args.seeds >= 2:
        print()
        print("\n".join(orderings(rows)))
    print(json.dumps({"benchmark": "prune", "model": what, "eval_tokens_per_domain": args.eval_tokens,
                      "calib_tokens": args.calib_tokens, "calib_split": args.calib_split, "seeds": args.seeds,
                      "rows": rows}, default=str))


if __name__ == "__main__":
    main()
