"""Evidence that the demo model's routing is real: trained vs the same architecture untrained (same seed init).

    python scripts/eval_demo.py --model demo/model --out runs/demo/eval

Held-out text: demo/corpus/heldout/<domain>.txt, each document followed by the eos token as in training, cut into
non-overlapping windows of --seq tokens (the remainder is dropped).

Reports, for the trained model and for the untrained one (the initialisation of scripts/train_demo.py: torch seed 0,
same config; both rounded to bf16 as shipped, evaluated in fp32 with the eager expert loop):
- perplexity per domain: exp(mean next-token cross-entropy over every predicted position of every window);
- per layer, normalised mutual information NMI = I(domain; expert) / H(domain), counting every top-k selection of every
  held-out token, with the domains weighted equally (p(d) = 1/D, p(e | d) = that domain's selection frequencies), so
  H(domain) = log D and NMI lies in [0, 1];
- dead experts per layer (never selected by any held-out token) and the least-used expert's load relative to uniform;
- per-domain expert usage in one layer (top experts by share of selections);
- domain identification from routing alone: a window's expert-count vector (all layers) is assigned to the nearest
  domain centroid (cosine), centroids from even windows, accuracy on odd windows;
- sample generations (greedy, no repeated 4-grams) from 12-token prompts cut from held-out documents (from the
  first line after a third of the document).
Router choices are captured with forward hooks on each layer's `mlp.gate`, which returns (logits, weights, indices).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_corpus import read_docs  # noqa: E402
from train_demo import DOMAINS  # noqa: E402


def load_models(model_dir: Path, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(model_dir, experts_implementation="eager").float().eval()
    cfg = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)  # scripts/train_demo.py seeds right before building the model
    untrained = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager", dtype=torch.float32)
    untrained = untrained.to(torch.bfloat16).float().eval()
    return {"trained": trained, "untrained": untrained}


def heldout_windows(tok, corpus: Path, seq: int) -> dict[str, torch.Tensor]:
    out = {}
    for domain in DOMAINS:
        docs = read_docs(corpus / "heldout" / f"{domain}.txt")
        ids = [t for doc in tok(docs, add_special_tokens=False)["input_ids"] for t in (*doc, tok.eos_token_id)]
        n = len(ids) // seq
        out[domain] = torch.tensor(ids[: n * seq]).view(n, seq)  # [N, S]
    return out


class RouterTap:
    """Forward hooks on every layer's router; keeps the top-k expert ids of the last forward."""

    def __init__(self, model):
        self.ids: list[torch.Tensor] = []
        self.handles = [layer.mlp.gate.register_forward_hook(self._hook) for layer in model.model.layers]

    def _hook(self, module, inputs, output):
        self.ids.append(output[2])  # [T, K]

    def pop(self) -> list[torch.Tensor]:
        ids, self.ids = self.ids, []
        return ids


@torch.no_grad()
def run_domain(model, tap: RouterTap, windows: torch.Tensor, num_experts: int, batch: int):
    """Returns (sum of token NLL, predicted tokens, per-window expert counts [N, L, E])."""
    nll, n_tok, counts = 0.0, 0, []
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch]  # [B, S]
        logits = model(input_ids=x).logits  # [B, S, V]
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum").item()
        n_tok += x[:, 1:].numel()
        per_layer = []
        for ids in tap.pop():
            ids = ids.view(len(x), -1)  # [B, S*K]
            per_layer.append(F.one_hot(ids, num_experts).sum(1))  # [B, E]
        counts.append(torch.stack(per_layer, 1))  # [B, L, E]
    return nll, n_tok, torch.cat(counts).numpy()


def nmi(dom_counts: np.ndarray) -> float:
    """dom_counts [D, E] selections; I(domain; expert) / H(domain) with domains weighted equally."""
    p_e_given_d = dom_counts / dom_counts.sum(1, keepdims=True)  # [D, E]
    p_e = p_e_given_d.mean(0)  # [E]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_e_given_d > 0, p_e_given_d * np.log(p_e_given_d / p_e), 0.0)
    return float(terms.sum(1).mean() / math.log(len(dom_counts)))


def centroid_accuracy(per_window: dict[str, np.ndarray]) -> float:
    """Nearest-centroid (cosine) domain classification of one window from its expert counts, all layers."""
    def unit(v):
        v = v.reshape(len(v), -1).astype(np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    cents = np.stack([unit(c[0::2]).mean(0) for c in per_window.values()])  # [D, L*E]
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    hits = total = 0
    for d, c in enumerate(per_window.values()):
        test = unit(c[1::2])
        hits += int((test @ cents.T).argmax(1).__eq__(d).sum())
        total += len(test)
    return hits / total


def evaluate(model, windows: dict[str, torch.Tensor], batch: int) -> dict:
    cfg = model.config
    tap = RouterTap(model)
    ppl, per_window = {}, {}
    for domain, w in windows.items():
        nll, n, counts = run_domain(model, tap, w, cfg.num_experts, batch)
        ppl[domain] = math.exp(nll / n)
        per_window[domain] = counts  # [N, L, E]
    dom_counts = np.stack([c.sum(0) for c in per_window.values()])  # [D, L, E]
    layers = []
    for layer in range(cfg.num_hidden_layers):
        c = dom_counts[:, layer]  # [D, E]
        load = c.sum(0) / c.sum() * cfg.num_experts
        layers.append({"nmi": nmi(c), "dead": int((c.sum(0) == 0).sum()), "min_load": float(load.min()),
                       "max_load": float(load.max())})
    return {"ppl": ppl, "layers": layers, "centroid_acc": centroid_accuracy(per_window),
            "usage": dom_counts.tolist()}


@torch.no_grad()
def samples(model, tok, corpus: Path, per_domain: int, prompt_tokens: int, new_tokens: int) -> dict[str, list]:
    out = {}
    for domain in DOMAINS:
        docs = read_docs(corpus / "heldout" / f"{domain}.txt")
        step = max(1, len(docs) // per_domain)
        out[domain] = []
        for doc in docs[::step][:per_domain]:
            # Start at a line a third of the way in: document openings (man page headers) look alike across domains.
            start = doc.find("\n", len(doc) // 3) + 1
            body = doc[start:].lstrip() or doc
            ids = tok(body, add_special_tokens=False)["input_ids"][:prompt_tokens]
            prompt = tok.decode(ids)
            gen = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                 no_repeat_ngram_size=4, pad_token_id=tok.eos_token_id)
            out[domain].append({"prompt": prompt, "completion": tok.decode(gen[0, len(ids):])})
    return out


def markdown(res: dict, usage_layer: int, num_experts: int, top_k: int, top: int = 4) -> str:
    t, u = res["trained"], res["untrained"]
    lines = ["| Domain | Perplexity, trained | Perplexity, untrained |", "|---|---|---|"]
    lines += [f"| {d} | {t['ppl'][d]:.1f} | {u['ppl'][d]:.1f} |" for d in DOMAINS]
    lines += ["", "| Layer | NMI trained | NMI untrained | Dead experts trained | Dead untrained | Min / max load trained "
              "(1 = uniform) |", "|---|---|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(t["layers"], u["layers"])):
        lines.append(f"| {i} | {a['nmi']:.3f} | {b['nmi']:.3f} | {a['dead']} | {b['dead']} | "
                     f"{a['min_load']:.2f} / {a['max_load']:.2f} |")
    lines += ["", f"Domain identification from one window's routing (nearest centroid): trained "
              f"{t['centroid_acc']:.1%}, untrained {u['centroid_acc']:.1%} (chance {1 / len(DOMAINS):.1%}).", ""]
    usage = np.array(t["usage"])[:, usage_layer]  # [D, E]
    frac = usage / usage.sum(1, keepdims=True)
    lines += [f"Layer {usage_layer}, trained: top {top} experts per domain, share of that domain's selections "
              f"(uniform = {1 / num_experts:.1%}; each token selects {top_k} experts, so a row sums to 100% over all experts)",
              "", "| Domain | " + " | ".join(f"#{i + 1}" for i in range(top)) + " |", "|---" * (top + 1) + "|"]
    for d, row in zip(DOMAINS, frac):
        best = np.argsort(-row)[:top]
        lines.append(f"| {d} | " + " | ".join(f"e{e} {row[e]:.1%}" for e in best) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("demo/model"))
    ap.add_argument("--corpus", type=Path, default=Path("demo/corpus"))
    ap.add_argument("--out", type=Path, default=Path("runs/demo/eval"))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="the seed train_demo.py initialised the model with")
    ap.add_argument("--max-windows", type=int, default=96, help="windows per domain (the first ones); 0 = all")
    ap.add_argument("--only", choices=["trained", "untrained"], help="evaluate one model, cache it, skip the report")
    ap.add_argument("--reuse", action="store_true", help="reuse a model's cached <out>/<name>.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.model)
    models = load_models(args.model, args.seed)
    windows = heldout_windows(tok, args.corpus, args.seq)
    if args.max_windows:
        windows = {d: w[: args.max_windows] for d, w in windows.items()}
    res = {"windows": {d: len(w) for d, w in windows.items()}, "seq": args.seq}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        cache = args.out / f"{name}.json"
        if args.only and name != args.only:
            continue
        if args.reuse and cache.exists():
            res[name] = json.loads(cache.read_text())
        else:
            res[name] = evaluate(model, windows, args.batch)
            cache.write_text(json.dumps(res[name]))
        print(f"{name}: done at {time.time() - t0:.0f} s", flush=True)
    if args.only:
        return
    usage_layer = int(np.argmax([layer["nmi"] for layer in res["trained"]["layers"]]))
    res["samples"] = samples(models["trained"], tok, args.corpus, args.samples, prompt_tokens=12, new_tokens=40)
    (args.out / "eval.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    cfg = models["trained"].config
    md = markdown(res, usage_layer, cfg.num_experts, cfg.num_experts_per_tok)
    (args.out / "eval.md").write_text(md + "\n")
    print(md)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
