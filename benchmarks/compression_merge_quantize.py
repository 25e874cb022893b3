"""Expert merging and mixed-precision quantisation on the demo model: per-domain held-out perplexity against the
unmodified model measured in the same run.

    .venv/bin/python benchmarks/compression_merge_quantize.py [--model demo/model] [--eval-tokens 1024] \
        [--calib-tokens 4096]

Model: --model, else demo/model. Everything runs in float32 on CPU (benchmarks/_demo.py): evaluation on the first
--eval-tokens held-out tokens per domain (non-overlapping 256-token windows), calibration on windows from the second
half of the held-out files (disjoint from the evaluation), so runs need only a fresh clone and stay under 15 minutes.

Rows:
- base: the unmodified model.
- merge {msmoe, hcsmoe} x {25%, 50% fewer experts} x {general calibration (all domains), single-domain (code)},
  router row = dominant; plus, at 50%/general: router = average, and alignment switched (msmoe without, hcsmoe with).
- quantize rtn at 8/4/3/2 bits and pmq at 8/4/3/2.5/2 average bits (group 128, general calibration).
Columns: experts per layer, average expert bits, model bytes (packed for quantised models: what a quantised runtime
holds), perplexity per held-out domain, macro perplexity (exp of the mean per-domain NLL), mean |logit difference| to the
base model on one window per domain, and for merges the mean relative MoE-layer output error on the calibration tokens.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import numpy as np
import torch

from _demo import (  # noqa: E402  (benchmarks/_demo.py)
    DOMAINS, SEQ, calib_windows, default_calib_split, eval_windows, load_demo)

import moekit.models  # noqa: E402
from moekit.compress import merge as merging  # noqa: E402
from moekit.compress import quantize as quant  # noqa: E402
from moekit.compress.calib import collect  # noqa: E402



# ---------------------------------------------------------------- model and data


def as_batches(ws: dict[str, list[np.ndarray]]) -> list[torch.Tensor]:
    return [torch.as_tensor(w, dtype=torch.long)[None] for d in ws for w in ws[d]]


# ---------------------------------------------------------------- scoring


def perplexities(model, ws: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Per-domain mean next-token NLL -> perplexity, with the colleague's evaluator when it is importable."""
    try:
        from moekit.compress.evaluate import evaluate

        result = evaluate(model, ws, batch_size=8).to_dict()
        per = {d: r["perplexity"] for d, r in result["domains"].items()}
        return {**per, "macro": result["macro_perplexity"]}
    except ImportError:  # local fallback: same definition
        nll = {}
        with torch.inference_mode():
            for d, wl in ws.items():
                total, n = 0.0, 0
                for w in wl:
                    ids = torch.as_tensor(w, dtype=torch.long)[None]
                    logits = model(ids).logits[0, :-1].float()
                    total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                    n += len(w) - 1
                nll[d] = total / n
        return {**{d: math.exp(v) for d, v in nll.items()}, "macro": math.exp(sum(nll.values()) / len(nll))}


def probe_logits(model, probe: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(probe).logits.float()  # [D, S, V]


# ---------------------------------------------------------------- runs


def run_merge(base, cal, method, groups, router="dominant", align=None):
    model = copy.deepcopy(base)
    report = merging.merge(moekit.models.load(model), cal, groups, method=method, router=router, align=align)
    err = float(np.mean(list(report["layer_relative_error"].values())))
    return model, {"experts": groups, "bits": 32, "bytes": report["after"]["model_bytes"], "layer_err": err,
                   "aligned": report["aligned"], "router": router}


def run_quant(base, cal, method, bits):
    model = copy.deepcopy(base)
    q = quant.quantize(moekit.models.load(model), bits, method=method, group_size=128, cal=cal)
    return model, {"experts": moekit.models.load(model).num_experts, "bits": q.report["avg_bits_achieved"],
                   "bytes": q.report["packed_bytes"], "layer_err": None,
                   "widths": sorted({b for bs in q.report["bits_per_layer"].values() for b in bs})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens per domain")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (general: split over domains)")
    ap.add_argument("--calib-split", choices=["train", "heldout"], default=default_calib_split(),
                    help="calibration text: the training split, or the held-out files' second half")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    base, tok, desc = load_demo(args.model)
    view = moekit.models.load(base)
    e = view.num_experts
    heldout = eval_windows(tok, args.eval_tokens)
    probe = torch.stack([torch.as_tensor(heldout[d][0][:SEQ]) for d in DOMAINS if len(heldout[d][0]) == SEQ]).long()
    cals = {
        "general": collect(view, as_batches(calib_windows(tok, args.calib_tokens // len(DOMAINS), DOMAINS,
                                                          args.calib_split))),
        "code": collect(view, as_batches(calib_windows(tok, args.calib_tokens, ["code"], args.calib_split))),
    }
    base_probe = probe_logits(base, probe)
    print(f"model {desc}; setup {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    from rich.progress import Progress

    jobs = [("base", None)]
    for method in ("msmoe", "hcsmoe"):
        for cut in (0.25, 0.5):
            for calib in ("general", "code"):
                g = round(e * (1 - cut))
                jobs.append((f"{method} -{int(cut * 100)}% calib={calib}",
                             lambda m=method, g=g, c=calib: run_merge(base, cals[c], m, g)))
        g = e // 2
        jobs.append((f"{method} -50% calib=general router=average",
                     lambda m=method, g=g: run_merge(base, cals["general"], m, g, router="average")))
        flip = not merging.ALIGN_DEFAULT[method]
        jobs.append((f"{method} -50% calib=general align={flip}",
                     lambda m=method, g=g, a=flip: run_merge(base, cals["general"], m, g, align=a)))
    for bits in (8, 4, 3, 2):
        jobs.append((f"rtn {bits}-bit", lambda b=bits: run_quant(base, None, "rtn", b)))
    for bits in (8, 4, 3, 2.5, 2):
        jobs.append((f"pmq {bits:g}-bit avg", lambda b=bits: run_quant(base, cals["general"], "pmq", b)))

    rows = []
    with Progress() as progress:
        task = progress.add_task("configurations", total=len(jobs))
        for name, job in jobs:
            t1 = time.time()
            if job is None:
                model, info = base, {"experts": e, "bits": 32, "bytes": merging.model_bytes(view), "layer_err": 0.0}
            else:
                model, info = job()
            ppl = perplexities(model, heldout)
            dlogit = (probe_logits(model, probe) - base_probe).abs().mean().item()
            rows.append({"config": name, **info, "ppl": ppl, "mean_abs_dlogit": dlogit,
                         "seconds": round(time.time() - t1, 1)})
            progress.advance(task)
            print(f"{name}: macro ppl {ppl['macro']:.2f} ({time.time() - t1:.0f} s)", file=sys.stderr, flush=True)

    print_table(rows, desc, args, len(probe), time.time() - t0)
    print(json.dumps({"benchmark": "compression_merge_quantize", "model": desc, "eval_tokens_per_domain":
                      args.eval_tokens, "calib_tokens": args.calib_tokens, "seconds": round(time.time() - t0, 1),
                      "rows": rows}, default=float))


def print_table(rows, desc, args, probe_windows, seconds) -> None:
    base = rows[0]["ppl"]["macro"]
    print(f"\nmodel: {desc}; held-out {args.eval_tokens} tokens/domain x {len(DOMAINS)} domains (windows of {SEQ}); "
          f"calibration {args.calib_tokens} tokens ({args.calib_split} split); |dlogit| on {probe_windows} windows; {seconds:.0f} s\n")
    head = ["config", "experts", "avg bits", "MB", *DOMAINS, "macro ppl", "vs base", "|dlogit|", "layer err"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["config"], str(r["experts"]), f"{r['bits']:.2f}", f"{r['bytes'] / 2**20:.1f}",
                 *[f"{r['ppl'][d]:.1f}" for d in DOMAINS], f"{r['ppl']['macro']:.2f}",
                 f"{r['ppl']['macro'] / base:.3f}x", f"{r['mean_abs_dlogit']:.3f}",
                 "" if r["layer_err"] is None else f"{r['layer_err']:.3f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
