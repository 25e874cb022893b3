"""Tracing overhead: plain forward vs traced forward on the same batches, and bytes on disk per routing decision.

    .venv/bin/python benchmarks/trace_overhead.py [--batches 8 --batch-size 8 --seq-len 256 --repeats 5 --threads 1]

Model: demo/model when it exists (held-out demo text through its tokenizer), else a random Qwen3-MoE of the demo's
shape (4 layers, hidden 256, 32 experts, top-4; random token ids). The traced forward does all the work of
`moekit trace` per batch (router hooks, sort by weight, drop padding, copy to numpy) plus building and writing the
Parquet chunk; both loops run the decoder stack without the LM head, as `moekit trace` does. Plain and traced repeats
alternate so machine load drifts hit both; the ratio is of medians. Goals: ratio <= 1.10, <= 8 bytes per selected
expert (no logits). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import moekit.models
from moekit.trace import schema, store
from moekit.trace.capture import RouterCapture

DEMO = Path("demo/model")


def demo_shaped_model():
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, moe_intermediate_size=128, intermediate_size=512,
                            num_experts=32, num_experts_per_tok=4, mlp_only_layers=[], norm_topk_prob=True,
                            tie_word_embeddings=True, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.set_experts_implementation("eager")  # what moekit.models.load picks on CPU
    return model.eval()


def batches(view, tokenizer, n: int, b: int, s: int) -> list[torch.Tensor]:
    """n batches [b, s] of held-out demo text (demo model) or random ids (random model)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(1)
        return [torch.randint(0, view.config.vocab_size, (b, s), generator=g) for _ in range(n)]
    text = "".join(p.read_text() for p in sorted(Path("demo/corpus/heldout").glob("*.txt")))
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False)[: n * b * s])
    if len(ids) < n * b * s:
        raise SystemExit(f"held-out text gives only {len(ids)} tokens; lower --batches")
    return list(ids.view(n, b, s))


def plain(view, data) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in data:
            view.forward(ids, head=False, use_cache=False)  # the model without its lm_head, as `moekit trace` runs it
    return time.perf_counter() - t0


def traced(view, data, out: Path) -> float:
    t0 = time.perf_counter()
    per_layer = {layer.index: [] for layer in view.layers}
    with RouterCapture(view) as cap, torch.inference_mode():
        for ids in data:
            view.forward(ids, head=False, use_cache=False)  # the model without its lm_head, as `moekit trace` runs it
            keep = torch.ones(ids.numel(), dtype=torch.bool)
            for index, arrays in cap.take(keep).items():
                per_layer[index].append(arrays)
    T = sum(ids.numel() for ids in data)
    chunk = store.ChunkArrays(
        seq_id=np.repeat(np.arange(T // data[0].shape[1]), data[0].shape[1]), position=np.tile(
            np.arange(data[0].shape[1], dtype=np.int32), T // data[0].shape[1]),
        token_id=torch.cat([d.reshape(-1) for d in data]).numpy().astype(np.int32), domain=np.zeros(T, np.int32),
        domain_names=["bench"],
        ids={i: np.concatenate([a[0] for a in v]) for i, v in per_layer.items()},
        weights={i: np.concatenate([a[1] for a in v]) for i, v in per_layer.items()},
    )
    pa_schema = schema.token_schema(list(per_layer), view.top_k, view.num_experts, logits=False)
    store.write_table_atomic(out, store.chunk_table(chunk, pa_schema))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if (DEMO / "config.json").is_file():
        from transformers import AutoTokenizer

        view, tokenizer, model_used = moekit.models.load(DEMO, dtype=torch.float32), AutoTokenizer.from_pretrained(
            DEMO), f"{DEMO} (float32), held-out demo text"
        view.model.eval()
    else:
        view, tokenizer = moekit.models.load(demo_shaped_model()), None
        model_used = "random Qwen3-MoE of the demo's shape (4 layers, hidden 256, 32 experts top-4), random ids"
    data = batches(view, tokenizer, args.batches, args.batch_size, args.seq_len)
    tokens = args.batches * args.batch_size * args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / schema.chunk_name(0)
        plain(view, data[:1]), traced(view, data[:1], out)  # warm-up
        times = {"plain": [], "traced": []}
        for _ in range(args.repeats):
            times["plain"].append(plain(view, data))
            times["traced"].append(traced(view, data, out))
        size = out.stat().st_size
    p, t = statistics.median(times["plain"]), statistics.median(times["traced"])
    L, K = len(view.layers), view.top_k
    result = {
        "benchmark": "trace_overhead", "model": model_used, "threads": torch.get_num_threads(), "tokens": tokens,
        "batch": [args.batch_size, args.seq_len], "repeats": args.repeats,
        "plain_s": round(p, 4), "traced_s": round(t, 4), "overhead_ratio": round(t / p, 4),
        "plain_tokens_per_s": round(tokens / p), "traced_tokens_per_s": round(tokens / t),
        "bytes_per_token_layer": round(size / (tokens * L), 3), "bytes_per_selected_expert": round(size / (tokens * L * K), 3),
        "goal_ratio": 1.10, "goal_bytes_per_selected_expert": 8.0,
    }
    print(f"model: {model_used}")
    print(f"plain  {p:.3f} s  ({tokens / p:,.0f} tokens/s)   median of {args.repeats}: {[round(x, 3) for x in times['plain']]}")
    print(f"traced {t:.3f} s  ({tokens / t:,.0f} tokens/s)   median of {args.repeats}: {[round(x, 3) for x in times['traced']]}")
    print(f"tracing time / plain forward time = {t / p:.3f} (goal <= 1.10)")
    print(f"on disk: {size:,} bytes = {result['bytes_per_token_layer']} per token-layer, "
          f"{result['bytes_per_selected_expert']} per selected expert (goal <= 8)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
