"""Routing policies on the demo model: what each buys, on held-out text of every domain. One command:

    .venv/bin/python benchmarks/routing.py            # all sections, a few minutes on 2 cores
    .venv/bin/python benchmarks/routing.py --only quality,scmoe --tokens 4096

Sections (docs/routing.md has the tables and what they mean):
- quality: per-domain perplexity / next-token accuracy vs mean active experts per token, for topk=1..8, a top-p sweep
  (raw weights and renorm) and a skip sweep (fixed betas and auto); the Pareto front; the goal "within 1% of top-4
  perplexity with <= 80% of its active experts".
- offload: decode tokens/s and bytes read per token vs active experts on a synthetic offloaded Qwen3-MoE (random
  weights, so K is the only thing that changes), interleaved repeats, median and range.
- steering: experts found by `experts find` (risk-diff) from traces of french / german / russian / japanese vs
  prose, steered on English prompts; share of generated text in the target language (Cyrillic / kana share; for
  french / german a character n-gram naive Bayes trained on half of the held-out documents, accuracy reported), next
  to no steering and steering as many random experts, and the prose perplexity cost.
- scmoe: SCMoE vs greedy next-token accuracy on held-out code and math.
- c3po: next-token accuracy at the last position of held-out windows with and without C3PO (reference set: correctly
  predicted windows of the other half of the held-out documents).
Prints tables and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moekit.models  # noqa: E402
import moekit.routing as R  # noqa: E402
from benchmarks._demo import DOMAINS, eval_windows, load_demo  # noqa: E402
from moekit.compress.evaluate import evaluate  # noqa: E402
from moekit.routing.calibrate import prepare  # noqa: E402

SECTIONS = ("quality", "offload", "steering", "scmoe", "c3po")


class ActiveCounter:
    """Mean routed experts per token per MoE layer (sentinel slots excluded), from the routers' outputs."""

    def __init__(self, view):
        self.n = self.t = 0
        self.handles = [m.router.register_forward_hook(self._hook(m)) for m in view.layers]

    def _hook(self, layer):
        def hook(mod, args, out):
            _, w, ids = layer.parse_router_output(out)
            self.n += int((ids < layer.num_experts).sum())
            self.t += ids.shape[0]
        return hook

    def mean(self):
        return self.n / max(self.t, 1)

    def close(self):
        for h in self.handles:
            h.remove()


def quality(model, tok, view, args):
    windows = eval_windows(tok, args.tokens, DOMAINS)
    specs = [f"topk={k}" for k in range(1, 9)] + [f"top-p={p}" for p in (0.3, 0.5, 0.7, 0.9)] + \
        [f"top-p={p},renorm" for p in (0.3, 0.4, 0.5, 0.7, 0.9)] + \
        [f"skip={b}" for b in (0.1, 0.15, 0.18, 0.2, 0.3, 0.5)] + ["skip=auto"]
    rows = []
    for spec in specs:
        routing = prepare(R.parse(spec), view, tok)
        counter = ActiveCounter(view)
        t0 = time.perf_counter()
        with R.apply(view, routing):
            res = evaluate(model, windows, 16).to_dict()
        counter.close()
        rows.append({"spec": spec, "active": counter.mean(), "ppl": res["overall"]["perplexity"],
                     "macro_ppl": res["macro_perplexity"], "acc": res["overall"]["accuracy"],
                     "domains": {d: (r["perplexity"], r["accuracy"]) for d, r in res["domains"].items()},
                     "seconds": time.perf_counter() - t0})
        print(f"  {spec:18s} active {rows[-1]['active']:.2f}  ppl {rows[-1]['ppl']:.3f}  acc {rows[-1]['acc']:.4f}",
              flush=True)
    base = next(r for r in rows if r["spec"] == "topk=4")
    front = pareto(rows)
    hits = [r for r in rows if r["ppl"] <= base["ppl"] * 1.01 and r["active"] <= 0.8 * base["active"]]
    print("\nquality vs cost (overall = pooled tokens of all domains; per-domain perplexity below)")
    print(f"{'policy':18s} {'active':>6s} {'ppl':>8s} {'vs top-4':>8s} {'acc':>7s} {'front':>5s}  " +
          " ".join(f"{d[:5]:>6s}" for d in DOMAINS))
    for r in rows:
        print(f"{r['spec']:18s} {r['active']:6.2f} {r['ppl']:8.3f} {r['ppl'] / base['ppl'] - 1:+8.2%} "
              f"{r['acc']:7.4f} {'*' if r in front else '':>5s}  " +
              " ".join(f"{r['domains'][d][0]:6.2f}" for d in DOMAINS))
    print(f"goal (ppl <= 1.01 x top-4's {base['ppl']:.3f}, active <= {0.8 * base['active']:.2f}): "
          + (", ".join(f"{r['spec']} ({r['active']:.2f} experts, {r['ppl'] / base['ppl'] - 1:+.2%})" for r in hits)
             if hits else "no policy reaches it"))
    return {"rows": rows, "front": [r["spec"] for r in front], "goal_met_by": [r["spec"] for r in hits]}


def pareto(rows):
    return [r for r in rows if not any(o["active"] <= r["active"] and o["ppl"] < r["ppl"] or
                                       o["active"] < r["active"] and o["ppl"] <= r["ppl"] for o in rows)]


def offload(args):
    import transformers

    import moekit.runtime as rt

    folder = Path(tempfile.mkdtemp(prefix="moekit-routing-bench-"))
    cfg = transformers.Qwen3MoeConfig(hidden_size=768, moe_intermediate_size=512, num_experts=32,
                                      num_experts_per_tok=8, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=4, head_dim=96, intermediate_size=2048, vocab_size=4096,
                                      norm_topk_prob=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder / "model")
    rt.build_store(moekit.models.load(folder / "model", dtype=torch.float32), folder / "store")
    expert_mb = rt.ExpertStore(folder / "store").expert_bytes / 1e6
    specs = [None, "topk=4", "topk=2", "rank=0"]
    results = {s: [] for s in specs}
    prompt = torch.randint(1, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    for rep in range(args.repeats):
        for spec in specs:  # interleaved: each repeat runs every policy once
            view = moekit.models.load(folder / "model", dtype=torch.float32)
            om = rt.offload(view, folder / "store", int(8 * 2 * expert_mb * 1e6) + 1, prefetch=False,
                            drop_cache=True)  # 8 experts per layer, every miss a real read (O_DIRECT)
            hooks = R.attach(view)
            hooks.set_all(R.parse(spec))
            results[spec].append(_decode(om, prompt, args.decode_tokens))
            hooks.remove()
            om.close()
    print(f"\noffloaded decode, synthetic Qwen3-MoE (2 layers x 32 experts of {expert_mb:.1f} MB, top-8, random "
          f"weights: near-uniform routing), budget 8 experts/layer (LRU), {args.decode_tokens} decode steps after a "
          f"16-token prefill, {args.repeats} interleaved repeats; every miss read from disk (O_DIRECT)")
    print(f"{'policy':10s} {'active':>6s} {'tok/s median [range]':>24s} {'MB read/token':>14s} {'vs stock':>8s}")
    out = {}
    stock = np.median([r["tok_s"] for r in results[None]])
    for spec, rs in results.items():
        tps = [r["tok_s"] for r in rs]
        out[spec or "stock"] = {"active": float(np.mean([r["active"] for r in rs])), "tok_s": float(np.median(tps)),
                                "tok_s_range": [min(tps), max(tps)],
                                "bytes_per_token": float(np.median([r["bytes_per_token"] for r in rs]))}
        o = out[spec or "stock"]
        print(f"{spec or 'stock':10s} {o['active']:6.2f} {o['tok_s']:10.2f} [{min(tps):.2f}, {max(tps):.2f}]"
              f" {o['bytes_per_token'] / 1e6:14.1f} {o['tok_s'] / stock:8.2f}x")
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
    return out


# ---------------------------------------------------------------- language steering


def _decode(om, prompt, n: int) -> dict:
    """Prefill, then n greedy decode steps with a KV cache; tokens/s, active experts and bytes read of the decode
    steps only."""
    from transformers import DynamicCache

    counter = ActiveCounter(om.view)
    cache = DynamicCache(config=om.model.config)
    with torch.no_grad():
        out = om.model(prompt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        before, counter.n, counter.t = om.totals()["bytes_read"], 0, 0
        t0 = time.perf_counter()
        for _ in range(n):
            out = om.model(nxt, cache=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        dt = time.perf_counter() - t0
    counter.close()
    return {"tok_s": n / dt, "active": counter.mean(), "bytes_per_token": (om.totals()["bytes_read"] - before) / n}


def char_ngrams(text, n=3):
    text = f" {text.lower()} "
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


class NGramNB:
    """Multinomial naive Bayes over character trigrams (add-one smoothing)."""

    def fit(self, docs: dict[str, list[str]]):
        self.counts = {c: sum((char_ngrams(d) for d in ds), Counter()) for c, ds in docs.items()}
        self.totals = {c: sum(v.values()) for c, v in self.counts.items()}
        self.vocab = len(set().union(*self.counts.values()))
        return self

    def predict(self, text):
        grams = char_ngrams(text)
        return max(self.counts, key=lambda c: sum(n * math.log((self.counts[c][g] + 1) / (self.totals[c] + self.vocab))
                                                  for g, n in grams.items()))


def _docs(domain):
    text = (ROOT / f"demo/corpus/heldout/{domain}.txt").read_text()
    return [d.strip() for d in text.split("\n<|endoftext|>\n") if d.strip()]


def _chunks(docs, size=200):
    return [d[i:i + size] for d in docs for i in range(0, len(d) - size + 1, size)]


def steering(model, tok, view, args):
    import moekit.trace
    from moekit.routing.find import find
    from moekit.routing.spec import write_steering

    langs = ["french", "german", "russian", "japanese"]
    classes = ["prose", "code", "math", "french", "german", "dialogue"]
    train = {c: _chunks(_docs(c)[0::2])[:150] for c in classes}
    test = {c: _chunks(_docs(c)[1::2])[:60] for c in classes}
    nb = NGramNB().fit(train)
    acc = float(np.mean([nb.predict(t) == c for c, ts in test.items() for t in ts]))
    work = Path(tempfile.mkdtemp(prefix="moekit-steer-"))
    opts = moekit.trace.TraceOptions(seq_len=256, max_tokens=args.trace_tokens)
    for d in ["prose"] + langs:
        moekit.trace.record(view, [d], work / d, tokenizer=tok, options=opts)
    prompts = [tok.decode(w[:24]) for w in eval_windows(tok, 24 * args.prompts, ["prose"])["prose"]][:args.prompts]
    if len(prompts) < args.prompts:
        prompts = [tok.decode(w[i:i + 24]) for w in eval_windows(tok, 4096, ["prose"])["prose"]
                   for i in range(0, 200, 40)][:args.prompts]
    prose_eval = eval_windows(tok, args.tokens, ["prose"])
    rng = np.random.default_rng(0)
    out = {"classifier_accuracy": acc}

    def share(lang, text):
        if lang == "russian":
            letters = [c for c in text if c.isalpha()]
            return sum("\u0400" <= c <= "\u04ff" for c in letters) / max(len(letters), 1)
        if lang == "japanese":
            letters = [c for c in text if not c.isspace()]
            return sum("\u3040" <= c <= "\u30ff" for c in letters) / max(len(letters), 1)
        return float(nb.predict(text) == lang)

    def generate(routing):
        texts = []
        hooks = R.attach(view)
        hooks.set_all(routing)
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            with torch.no_grad():
                o = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            texts.append(tok.decode(o[0, ids.shape[1]:], skip_special_tokens=True))
        hooks.remove()
        return texts

    def prose_ppl(routing):
        with R.apply(view, routing):
            return evaluate(model, prose_eval, 16).to_dict()["overall"]["perplexity"]

    base_texts, base_ppl = generate(None), prose_ppl(None)
    modes = [("force", args.steer_top, "force", None), ("steer", 4 * args.steer_top, "steer", 1.0)]
    print(f"\nlanguage steering: {len(prompts)} English (prose) prompts, {args.new_tokens} greedy tokens each; "
          f"experts: risk-diff of LANG vs prose traces ({args.trace_tokens} tokens each); modes: force = top "
          f"{args.steer_top} forced on (SteerMoE), steer = top {4 * args.steer_top} soft-steered with lambda 1 "
          f"(multilingual steering); random = as many random experts per layer, same mode; fr/de share by a "
          f"character-trigram naive Bayes over 6 domains (held-out accuracy {acc:.1%})")
    print(f"{'target':9s} {'mode':6s} {'none':>5s} {'steered':>8s} {'random':>7s}  prose ppl none / steered / random")
    for lang in langs:
        for mode, top, action, strength in modes:
            entries = find(moekit.trace.open(work / lang), moekit.trace.open(work / "prose"), "risk-diff",
                           top=top, action=action, strength=strength)
            write_steering(work / f"{lang}-{mode}.json", entries, {"lang": lang})
            steered = R.parse(None, work / f"{lang}-{mode}.json")
            by_layer = Counter(e["layer"] for e in entries)
            rand = {l: tuple(int(x) for x in rng.choice(view.num_experts, n, replace=False))
                    for l, n in by_layer.items()}
            random_routing = R.Routing([R.policies.Force(rand) if action == "force"
                                        else R.policies.Steer(rand, lam=strength)])
            row = {"experts": [(e["layer"], e["expert"]) for e in entries]}
            for name, routing, texts in [("none", None, base_texts), ("steered", steered, None),
                                         ("random", random_routing, None)]:
                texts = texts if texts is not None else generate(routing)
                row[name] = float(np.mean([share(lang, t) for t in texts]))
                row[f"{name}_prose_ppl"] = base_ppl if routing is None else prose_ppl(routing)
                row[f"{name}_sample"] = texts[0][:60]
            out[f"{lang} {mode}"] = row
            print(f"{lang:9s} {mode:6s} {row['none']:5.2f} {row['steered']:8.2f} {row['random']:7.2f}  "
                  f"{row['none_prose_ppl']:9.2f} / {row['steered_prose_ppl']:.2f} / {row['random_prose_ppl']:.2f}"
                  f"   steered: {row['steered_sample']!r}")
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return out


def scmoe_section(model, tok, view, args):
    from moekit.routing import scmoe

    hooks = R.attach(view)
    out = {}
    print("\nSCMoE (alpha 0.1, strong = stock top-4, weak = rank r) vs greedy next-token accuracy")
    for domain in ("code", "math"):
        ws = eval_windows(tok, args.tokens, [domain])[domain]
        for beta, rank in [(0.5, 2), (0.5, 1), (0.25, 2), (1.0, 2)]:
            r = scmoe.accuracy(model, hooks, ws, scmoe.Contrast(beta=beta, rank=rank))
            out[f"{domain} beta={beta} rank={rank}"] = r
            print(f"  {domain:5s} beta={beta:<4g} rank={rank}: scmoe {r['accuracy']:.4f}  greedy "
                  f"{r['greedy_accuracy']:.4f}  ({r['accuracy'] - r['greedy_accuracy']:+.4f}, {r['tokens']} tokens)")
    hooks.remove()
    return out


def c3po_section(model, tok, view, args):
    from moekit.routing.c3po import C3PO, build_reference, last_position_omegas, embed

    def windows(part):
        out = []
        for d in DOMAINS:
            for doc in _docs(d)[part::2]:
                ids = tok(doc).input_ids
                out += [np.array(ids[i:i + 64]) for i in range(0, len(ids) - 64, 512)]
        return out

    ref_w, eval_w = windows(1)[:args.c3po_ref], windows(0)[:args.c3po_eval]
    t0 = time.perf_counter()
    ref, share = build_reference(view, tok, ref_w)
    _, base_correct = last_position_omegas(view, eval_w)
    emb = embed([tok.decode(w[:-1]) for w in eval_w])
    out = {"reference": len(ref.embeddings), "reference_share_correct": share, "eval_windows": len(eval_w),
           "accuracy_stock": float(np.mean(base_correct))}
    hooks = R.attach(view)
    for last in (5, 2, 1):  # the released code's last 5 (of OLMoE's 16); this model has 4 MoE layers
        policy = C3PO(None, last_layers=last, reference=ref)
        policy.bind(view)
        correct = []
        for w, e in zip(eval_w, emb):
            hooks.set_all(R.Routing([policy.for_embedding(e)]))
            with torch.no_grad():
                logits = model(torch.from_numpy(w[:-1].astype(np.int64))[None]).logits[0, -1]
            correct.append(int(logits.argmax()) == int(w[-1]))
        out[f"accuracy_c3po_last{last}"] = float(np.mean(correct))
    hooks.remove()
    out["seconds"] = time.perf_counter() - t0
    print(f"\nC3PO (released form: kNN k=3 over all-MiniLM-L6-v2 embeddings, omega replaced at the last position): "
          f"reference {out['reference']} correctly predicted windows ({share:.1%} of {len(ref_w)}, odd held-out "
          f"documents); {len(eval_w)} windows of 64 tokens from the even documents, next-token accuracy at the last "
          f"position: stock {out['accuracy_stock']:.4f}; C3PO in the last 5 (= all 4) layers "
          f"{out['accuracy_c3po_last5']:.4f}, last 2 {out['accuracy_c3po_last2']:.4f}, last 1 "
          f"{out['accuracy_c3po_last1']:.4f}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens per domain (quality, scmoe)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--trace-tokens", type=int, default=8192)
    ap.add_argument("--steer-top", type=int, default=8)
    ap.add_argument("--c3po-ref", type=int, default=400)
    ap.add_argument("--c3po-eval", type=int, default=200)
    args = ap.parse_args()
    only = set(args.only.split(","))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    model, tok, name = load_demo(args.model)
    view = moekit.models.load(model)
    print(f"model {name}; load average {os.getloadavg()}")
    result = {"model": name, "load_average_start": os.getloadavg()}
    for section, fn in [("quality", lambda: quality(model, tok, view, args)), ("offload", lambda: offload(args)),
                        ("steering", lambda: steering(model, tok, view, args)),
                        ("scmoe", lambda: scmoe_section(model, tok, view, args)),
                        ("c3po", lambda: c3po_section(model, tok, view, args))]:
        if section in only:
            t0 = time.perf_counter()
            result[section] = fn()
            print(f"[{section}: {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()}]", flush=True)
    result["load_average_end"] = os.getloadavg()
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
