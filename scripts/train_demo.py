"""Train the moekit demo model: a small fine-grained Qwen3-MoE causal LM on the multi-domain demo corpus, on CPU.

    python scripts/build_corpus.py --sources /tmp/moekit-sources      # once: writes demo/corpus/{train,heldout}
    nohup python scripts/train_demo.py --steps 5000 > runs/demo/stdout.txt 2>&1 &

On a shared CPU the throughput is not known in advance; `--time-budget SECONDS` then runs the cosine schedule over the
fraction of the budget used (training time only) and stops when it is spent, so the run ends on time with a fully decayed
learning rate. The log records the step count and learning rate of every logged step.

Steps:
1. Byte-level BPE tokenizer (vocab 8192) trained with `tokenizers` on the training split, each domain capped at the same
   number of characters so no domain dominates the merges. `<|endoftext|>` is bos, eos and pad; every document ends
   with it in training.
2. Each domain's training text tokenised once into runs/demo/tokens/<domain>.npy (uint16).
3. Training: every batch holds the same number of 256-token windows from each domain (uniform domain mixture), AdamW,
   linear warm-up then cosine decay, gradient clipping. Load balancing is the Switch loss of transformers'
   `load_balancing_loss_func`, applied to each layer separately and summed: the all-layers call sums expert counts over
   layers, so an expert dead in one layer hides behind the same expert overused in another.
4. Checkpoint (fp32 + optimizer) every --ckpt-every steps under runs/demo/ckpt; `--resume` continues from it.
5. Final model saved in bf16 with the tokenizer to demo/model/ (written to a temp dir, then renamed).

Log: runs/demo/train_log.tsv (one line per --log-every steps: loss per domain, aux loss, throughput, min expert load).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_corpus import DOC_SEP, read_docs  # noqa: E402

DOMAINS = ["prose", "code", "math", "german", "french", "russian", "japanese", "dialogue"]
EOS = DOC_SEP


def model_config(vocab_size: int, eos_id: int):
    from transformers import Qwen3MoeConfig

    # Fine-grained experts (32 small experts, 4 active) like Qwen3-MoE / DeepSeek-MoE, every layer MoE.
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        moe_intermediate_size=128,
        intermediate_size=512,  # unused: no dense layers
        num_experts=32,
        num_experts_per_tok=4,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        output_router_logits=False,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


# ---------------------------------------------------------------- tokenizer and data


def train_tokenizer(corpus: Path, out: Path, vocab_size: int, chars_per_domain: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for domain in DOMAINS:
            n = 0
            for doc in read_docs(corpus / "train" / f"{domain}.txt"):
                if n >= chars_per_domain:
                    break
                n += len(doc)
                yield doc

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=1024)
    fast.save_pretrained(out)
    return fast


def tokenize_domains(tok, corpus: Path, out: Path) -> dict[str, np.ndarray]:
    out.mkdir(parents=True, exist_ok=True)
    data = {}
    for domain in DOMAINS:
        path = out / f"{domain}.npy"
        if not path.exists():
            docs = read_docs(corpus / "train" / f"{domain}.txt")
            ids = tok(docs, add_special_tokens=False)["input_ids"]
            flat = np.fromiter((t for doc in ids for t in (*doc, tok.eos_token_id)), dtype=np.uint16)
            np.save(path, flat)
        data[domain] = np.load(path)
        print(f"{domain:10s} {len(data[domain]):10,d} tokens", flush=True)
    return data


def get_batch(data: dict[str, np.ndarray], rows_per_domain: int, seq: int, rng: np.random.Generator):
    rows, labels = [], []
    for d, domain in enumerate(DOMAINS):
        arr = data[domain]
        for start in rng.integers(0, len(arr) - seq - 1, size=rows_per_domain):
            rows.append(arr[start:start + seq + 1].astype(np.int64))
            labels.append(d)
    x = torch.from_numpy(np.stack(rows))  # [B, seq+1]
    return x[:, :-1], x[:, 1:], torch.tensor(labels)


# ---------------------------------------------------------------- training


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor * peak + (1 - floor) * peak * 0.5 * (1 + math.cos(math.pi * progress))


def per_layer_balance_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    # One call per layer: the Switch loss (arXiv 2101.03961, Eq. 4-6) then penalises imbalance inside each layer.
    return sum(load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits)


def min_load(router_logits, num_experts: int, top_k: int) -> list[float]:
    """Per layer: the least-used expert's share of selections divided by the uniform share (0 = a dead expert)."""
    out = []
    for logits in router_logits:
        idx = logits.topk(top_k, dim=-1).indices.flatten()
        counts = torch.bincount(idx, minlength=num_experts).float()
        out.append(round(float(counts.min() / counts.mean()), 3))
    return out


def save_final(model, tok, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("demo/corpus"))
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--out", type=Path, default=Path("demo/model"))
    ap.add_argument("--steps", type=int, default=5000, help="cosine schedule length (and the stop) in steps")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; if set, schedule and stop by time instead")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rows-per-domain", type=int, default=1, help="batch = rows-per-domain x 8 domains sequences")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--ckpt-every", type=int, default=1000)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--bench", type=int, default=0, help="only time this many steps, save nothing")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, Qwen3MoeForCausalLM

    args.run.mkdir(parents=True, exist_ok=True)
    tok_dir = args.run / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tok = train_tokenizer(args.corpus, tok_dir, vocab_size=8192, chars_per_domain=3_000_000)
    data = tokenize_domains(tok, args.corpus, args.run / "tokens")

    torch.manual_seed(args.seed)
    cfg = model_config(len(tok), tok.eos_token_id)
    model = Qwen3MoeForCausalLM._from_config(cfg, experts_implementation="grouped_mm", dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,d}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)

    ckpt = args.run / "ckpt" / "state.pt"
    start, trained_s = 0, 0.0
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        trained_s = state.get("trained_s", 0.0)
        print(f"resumed at step {start}", flush=True)

    E, K = cfg.num_experts, cfg.num_experts_per_tok
    log = open(args.run / "train_log.tsv", "a" if start else "w")
    if not start:
        log.write("step\ttokens\telapsed_s\tlr\tloss\taux\ttok_per_s\tmin_load_per_layer\t"
                  + "\t".join(f"loss_{d}" for d in DOMAINS) + "\n")
    model.train()
    t0, tokens_per_step = time.time(), args.rows_per_domain * len(DOMAINS) * args.seq
    window_t, window_tokens = time.time(), 0
    step = start
    while step < (args.bench or (10**9 if args.time_budget else args.steps)):
        step_t = time.time()
        if args.time_budget:
            if trained_s >= args.time_budget:
                break
            lr = lr_at(trained_s, args.time_budget, args.lr, 0, floor=0.1) if step >= args.warmup else \
                lr_at(step, args.warmup, args.lr, args.warmup, floor=0.1)
        else:
            lr = lr_at(step, args.steps, args.lr, args.warmup, floor=0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        # Seed per step so a resumed run draws the same batches.
        x, y, dom = get_batch(data, args.rows_per_domain, args.seq, np.random.default_rng(args.seed * 1_000_003 + step))
        out = model(input_ids=x, output_router_logits=True)
        ce_tok = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), reduction="none").view_as(y)  # [B, S]
        ce = ce_tok.mean()
        aux = per_layer_balance_loss(out.router_logits, E, K)
        (ce + args.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window_tokens += tokens_per_step
        trained_s += time.time() - step_t
        if (step + 1) % args.log_every == 0 or step == start:
            now = time.time()
            per_dom = [ce_tok[dom == d].mean().item() for d in range(len(DOMAINS))]
            row = [step + 1, (step + 1) * tokens_per_step, round(now - t0, 1), f"{lr:.2e}", f"{ce.item():.4f}",
                   f"{aux.item():.4f}", round(window_tokens / (now - window_t)),
                   json.dumps(min_load(out.router_logits, E, K))] + [f"{v:.3f}" for v in per_dom]
            log.write("\t".join(map(str, row)) + "\n")
            log.flush()
            window_t, window_tokens = now, 0
        if not args.bench and (step + 1) % args.ckpt_every == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                        "trained_s": trained_s}, str(ckpt) + ".tmp")
            os.replace(str(ckpt) + ".tmp", ckpt)
        step += 1
    log.close()
    if args.bench:
        return
    save_final(model, tok, args.out)
    print(f"saved {args.out} after {step} steps, {step * tokens_per_step:,d} tokens, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
