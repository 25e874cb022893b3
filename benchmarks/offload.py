"""Offloaded decoding: moekit's runtime vs accelerate's CPU/disk offload, same model, budget and prompts, same run.

    .venv/bin/python benchmarks/offload.py                   # demo/model + synthetic Qwen3-MoE, demo routing replayed
    .venv/bin/python benchmarks/offload.py --model demo/model --no-synthetic
    .venv/bin/python benchmarks/offload.py --decode greedy   # greedy decoding: flagged where the tokens loop
    .venv/bin/python benchmarks/offload.py --warm            # + one pair with the files in the OS page cache

Workload. Each prompt is decoded --new-tokens steps with a KV cache; by default tokens are sampled (temperature
--temperature, a generator seeded per prompt, so both systems, whose logits are bit-identical, draw the same tokens).
Every generated sequence goes through the loop check of benchmarks/_workload.py (distinct bigrams, longest periodic
suffix): greedy decoding loops on random weights (and on some prompts of the small demo model), its routing then
repeats, and a cache hit rate measured on it is not one users see. The routing itself is checked too: a random-weight
model's routers pick nearly the same experts for every token whatever the tokens (`routing_reuse`: the share of a
token's experts the previous token also used). A row failing either check is printed as DEGENERATE and the script exits
with status 3 after printing everything.

The synthetic model's routing comes from --synthetic-routing. Default `replay`: the trained demo model's routing on
held-out text (a 4,096-token trace over the 8 demo-corpus domains, recorded once under --work), replayed on the
synthetic model by moekit's `replay=TRACE` routing policy for both systems (benchmarks/_replay.py): the demo's 32
experts top-4 map to the synthetic model's 64 top-8 as blocks of two (trace expert e -> experts 2e, 2e + 1; layer i
follows layer i), each prompt replaying the first traced window of another domain. Random weights would route almost
statically (`own`: its own random routers, which the check flags); the replay gives the synthetic model a trained
model's locality at a real model's expert size. The replayed run is checked against its trace (_workload.py
`locality_kept`): every row's experts are the mapped trace row's, SRP and SCH (arXiv 2505.16056) of the run equal the
replayed rows' within 0.05, and both systems' routers returned the same ids; the whole trace's SRP/SCH are printed
beside them. `replay=TRACE` replays any trace (yours, recorded with `moekit trace`).
moekit and accelerate run --repeats times on the synthetic model (default 3) and --model-repeats times on the
checkpoints (default 7: a demo run decodes for about a second), interleaved (the order alternates each repeat, so a
drift of the shared disk's bandwidth hits both alike); tokens/s and the ratio of each repeat's pair are reported as
median and range, with the machine's load average before each repeat.

Budget: 25% of the routed experts' bytes. moekit keeps that many experts per layer in RAM (the budget split evenly over
the MoE layers); accelerate keeps whole layers' fused experts in RAM up to the same bytes (its unit is the module) and
maps the rest to `offload_folder` on disk; non-expert weights are resident in both.
Disk reads are real in both: the moekit store reader drops the pages it read (POSIX_FADV_DONTNEED after every expert
read), and after every accelerate step the benchmark drops its offload files' pages the same way, so neither is served
from the OS page cache. Bytes read from storage are measured (read_bytes of /proc/self/io) as well as counted.
With --warm, after the cold repeats (the headline) both systems run once more with their files in the OS page cache
(read once before decoding, nothing dropped): moekit reads through the page cache (its default outside benchmarks,
`--page-cache`), so a machine with RAM beyond the budget serves misses from memory; the bytes the page cache served
(RWF_NOWAIT reads) and read_bytes show whether the disk was touched.
Physical bound: tokens/s <= disk bandwidth / moekit's missed expert bytes per token (docs/conventions.md), with the disk
bandwidth measured in this run by cold positioned reads of the store files in expert-sized blocks.
Prints a table per model and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moekit.models  # noqa: E402
import moekit.runtime as rt  # noqa: E402
from _replay import ReplaySource, open_source, routing_source  # noqa: E402  (benchmarks/_replay.py)
from _workload import locality, locality_kept, repetition, routing_reuse  # noqa: E402  (benchmarks/_workload.py)

SYNTH = {"hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 64, "num_experts_per_tok": 8,
         "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
         "intermediate_size": 6144, "vocab_size": 8192, "max_position_embeddings": 4096, "norm_topk_prob": True,
         "tie_word_embeddings": False}


def synthetic_checkpoint(path: Path, layers: int) -> Path:
    """A Qwen3-MoE of realistic expert size with random weights: 64 experts x (3 x 2048 x 768) per layer, float32
    (18.9 MB per expert). float32 rather than bf16 because this CPU's bf16 GEMV is ~6x slower than float32 (23 vs 3.7 ms
    per expert, measured), which would make compute, not the offload, the subject of the benchmark."""
    if not (path / "config.json").is_file():
        import transformers

        torch.manual_seed(0)
        config = transformers.Qwen3MoeConfig(**{**SYNTH, "num_hidden_layers": layers})
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(path)
        del model
        gc.collect()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the demo's (same vocabulary): `moekit run` opens it
        if not (path / name).is_file() and (ROOT / "demo/model" / name).is_file():
            shutil.copyfile(ROOT / "demo/model" / name, path / name)
    return path


def read_bytes() -> int:
    """Bytes this process made the kernel fetch from storage (page-cache misses)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def drop_pages(files) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def disk_bandwidth(store_dir: Path, threads: int, limit: int = 768 << 20) -> dict:
    """Cold read bandwidth (bytes/s) of the store's disk, two ways, best of two runs each: one thread reading the layer
    files in expert-sized blocks in order, and `threads` threads reading random whole experts the way the runtime does.
    The bound uses the larger: the disk's best observed bandwidth, not one flattering moekit's access pattern."""
    from concurrent.futures import ThreadPoolExecutor

    store = rt.ExpertStore(store_dir, drop_cache=True)
    files = sorted(store_dir.glob("layer_*.safetensors"))
    layers, n_exp = store.manifest["layers"], store.manifest["num_experts"]
    n = max(1, limit // store.expert_bytes)
    rng = torch.Generator().manual_seed(1)
    best = {"sequential": 0.0, "random_parallel": 0.0}
    for _ in range(2):
        drop_pages(files)
        buf, total, t0 = bytearray(store.expert_bytes), 0, time.perf_counter()
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            off = 0
            while total < limit and (k := os.preadv(fd, [buf], off)) > 0:
                off, total = off + k, total + k
            os.close(fd)
        best["sequential"] = max(best["sequential"], total / (time.perf_counter() - t0))
        drop_pages(files)
        picks = [(layers[int(i) % len(layers)], int(j)) for i, j in
                 zip(torch.randint(0, 1 << 20, (n,), generator=rng), torch.randint(0, n_exp, (n,), generator=rng))]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda lj: store.read(*lj), picks))
        best["random_parallel"] = max(best["random_parallel"], n * store.expert_bytes / (time.perf_counter() - t0))
    drop_pages(files)
    store.close()
    return best


def expert_compute_s(path: Path, threads: int, reps: int = 20) -> float:
    """Seconds to compute one expert on one token (the family's kernel on weights of the model's expert shape and dtype,
    resident in RAM), median of `reps`: the fast-tier/compute floor of a decode step is layers x top-k of these."""
    from moekit.runtime.engine import _kernel

    view = moekit.models.load(path, meta=True)
    layer = view.layers[0]
    shapes = {n: getattr(layer.experts, p).shape[1:] for n, p in (("gate_up", "gate_up_proj"), ("down", "down_proj"))}
    dtype = layer.expert_params()[0].dtype
    ws = [{n: torch.randn(s, dtype=dtype) for n, s in shapes.items()} for _ in range(8)]  # > cache: RAM-resident
    x = torch.randn(1, view.config.hidden_size, dtype=dtype)
    kernel, act = _kernel(layer.layout), type("M", (), {})()
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import _default_apply_gate

    act.act_fn = ACT2FN[view.config.hidden_act]
    act._apply_gate = lambda y: _default_apply_gate(act, y)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        kernel(act, x, ws[i % len(ws)])
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]


class Sampler:
    """Next token from the last position's logits [1, V]: argmax (temperature 0) or a draw from softmax(logits / T)
    with a generator seeded once per prompt, so two systems with equal logits draw equal tokens."""

    def __init__(self, temperature: float, seed: int):
        self.temperature, self.gen = temperature, torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(-1, keepdim=True)  # [1, 1]
        probs = torch.softmax(logits.double() / self.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=self.gen)  # [1, 1]


def decode(model, prompt: torch.Tensor, new_tokens: int, sampler, snapshot=lambda: None, after_step=lambda: None):
    """Decode -> (tokens [new_tokens], seconds of the decode steps after the first token, snapshot() taken right
    after the first token, for decode-only accounting)."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        tok = sampler(out.logits[:, -1])  # [1, 1]
        toks, past = [tok], out.past_key_values
        after_step()
        first = snapshot()
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(tok, past_key_values=past, use_cache=True)
            tok, past = sampler(out.logits[:, -1]), out.past_key_values
            toks.append(tok)
            after_step()
        return torch.cat(toks, dim=1)[0], time.perf_counter() - t0, first


def prompts_for(path: Path, vocab: int, n: int) -> list[torch.Tensor]:
    texts = ["The history of the printing press begins", "def fibonacci(n):\n    if n < 2:",
             "In 1969 the first humans landed on", "Photosynthesis converts light energy into"][:n]
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return [tok(t, return_tensors="pt").input_ids for t in texts]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, 16), generator=g) for _ in texts]


def warm_pages(files) -> None:
    """Read the files once, so the OS page cache holds them (a machine with RAM beyond the budget)."""
    for file in files:
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


def samplers(args, n: int) -> list[Sampler]:
    return [Sampler(args.temperature if args.decode == "sample" else 0.0, args.seed + i) for i in range(n)]


def run_moekit(path: Path, work: Path, budget_frac: float, prompts, new_tokens: int, prefetch: bool, policy: str,
               io_threads: int, sample, lowbit: int | None = None, lowbit_threshold: float = 0.1, routing=None,
               starts=None, warm: bool = False):
    from moekit.runtime.checkpoint import build_store_from_checkpoint, load_from_store
    from moekit.runtime.store import SCHEMA_VERSION

    store_dir = work / f"store-v{SCHEMA_VERSION}-{path.name}"  # as `moekit run`: built once, experts never all in RAM
    build_store_from_checkpoint(path, store_dir)
    view = load_from_store(path, store_dir)
    expert_bytes = rt.ExpertStore(store_dir).expert_bytes
    total_expert = expert_bytes * view.num_experts * len(view.layers)
    budget = int(budget_frac * total_expert)
    if lowbit is not None:
        from moekit.runtime.lowbit import build_lowbit

        build_lowbit(store_dir, lowbit)
    om = rt.offload(view, store_dir, budget, policy=policy, prefetch=prefetch, drop_cache=not warm,
                    io_threads=io_threads, lowbit=lowbit, lowbit_threshold=lowbit_threshold,
                    record=True)  # routing for the reuse check
    replayed = routing.attach(view, starts) if routing is not None else None
    if warm:  # buffered reads (moekit's default outside benchmarks): misses come from the page cache
        warm_pages(sorted(store_dir.glob("layer_*.safetensors")))
    else:
        om.layers[0].store.drop_page_cache()
    outs, secs, steps, bytes_counted, io, missed, cached, reuse = [], 0.0, 0, 0, 0, 0, 0, []
    for i, (p, sampler) in enumerate(zip(prompts, sample)):
        if replayed is not None:
            replayed.begin(i)
        n_steps = len(om.layers[0].stats.routing)
        toks, s, (first, io0) = decode(view.model, p, new_tokens, sampler,
                                       snapshot=lambda: (om.totals(), read_bytes()))
        decode_steps = [[ids for ids in layer.stats.routing[n_steps + 1:]] for layer in om.layers]  # after the prefill
        reuse.append(routing_reuse(decode_steps, view.num_experts))
        after = om.totals()
        outs.append(toks)
        secs, steps = secs + s, steps + new_tokens - 1
        bytes_counted += after["bytes_read"] - first["bytes_read"]
        missed += after["misses"] - first["misses"]
        cached += after["page_cache_bytes"] - first["page_cache_bytes"]
        io += read_bytes() - io0
    t = om.totals()
    res = {"tok_s": steps / secs, "bytes_per_token": bytes_counted / steps, "io_bytes_per_token": io / steps,
           "hit_rate": t["hit_rate"], "prefetch_precision": t["prefetch_precision"],
           "prefetch_recall": t["prefetch_recall"], "wait_s": t["wait_s"], "compute_s": t["compute_s"],
           "experts_per_layer": om.capacity, "budget": budget, "expert_bytes": expert_bytes,
           "total_expert_bytes": total_expert, "layers": len(view.layers), "num_experts": view.num_experts,
           "top_k": view.top_k, "missed_bytes_per_token": missed * expert_bytes / steps,
           "lowbit_reads": t["lowbit_reads"], "page_cache_bytes_per_token": cached / steps, "routing_reuse": reuse}
    if replayed is not None:
        res["executed"] = replayed.executed()
        replayed.remove()
    om.close()
    return res, outs, store_dir  # the model is freed when this frame goes; main() collects between runs


def run_accelerate(path: Path, work: Path, budget: int, expert_bytes_layer: int, layers: int, prompts, new_tokens,
                   sample, routing=None, starts=None, warm: bool = False):
    from transformers import AutoModelForCausalLM

    offload = work / "accelerate-offload"
    shutil.rmtree(offload, ignore_errors=True)
    resident_layers = budget // expert_bytes_layer  # accelerate offloads whole modules: the fused experts of a layer
    view = moekit.models.load(path, meta=True)
    device_map = {name: "cpu" for name, _ in view.model.named_children() if name != "model"}
    base = view.model.model
    for name, _ in base.named_children():
        if name != "layers":
            device_map[f"model.{name}"] = "cpu"
    moe_rank = {m.index: r for r, m in enumerate(view.layers)}
    for i, layer in enumerate(base.layers):
        for name, child in layer.named_children():
            if name == "mlp" and i in moe_rank:
                for sub, _ in child.named_children():
                    on_disk = sub == "experts" and moe_rank[i] >= resident_layers
                    device_map[f"model.layers.{i}.mlp.{sub}"] = "disk" if on_disk else "cpu"
            else:
                device_map[f"model.layers.{i}.{name}"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(offload),
                                                 dtype="auto", experts_implementation="eager")
    replayed = routing.attach(moekit.models.load(model), starts) if routing is not None else None
    files = sorted(offload.rglob("*")) + sorted(path.glob("*.safetensors"))
    files = [f for f in files if f.is_file()]
    if warm:
        warm_pages(files)
    else:
        drop_pages(files)
    outs, secs, steps, io = [], 0.0, 0, 0
    for i, (p, sampler) in enumerate(zip(prompts, sample)):
        if replayed is not None:
            replayed.begin(i)
        toks, s, io0 = decode(model, p, new_tokens, sampler, snapshot=read_bytes,
                              after_step=(lambda: None) if warm else (lambda: drop_pages(files)))
        outs.append(toks)
        secs, steps = secs + s, steps + new_tokens - 1
        io += read_bytes() - io0
    disk_layers = layers - min(resident_layers, layers)
    res = {"tok_s": steps / secs, "bytes_per_token": disk_layers * expert_bytes_layer, "io_bytes_per_token": io / steps,
           "resident_layers": int(min(resident_layers, layers))}
    if replayed is not None:
        res["executed"] = replayed.executed()
        replayed.remove()
    del model
    gc.collect()
    shutil.rmtree(offload, ignore_errors=True)
    return res, outs


def spread(values: list[float]) -> dict:
    """Median and range of repeated measurements."""
    v = sorted(values)
    return {"median": float(statistics.median(v)), "min": v[0], "max": v[-1], "runs": list(values)}


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle for an even count): its other columns go with it."""
    return sorted(runs, key=lambda r: r["tok_s"])[(len(runs) - 1) // 2]


def bench(path: Path, work: Path, args, routing_name: str | None = None, repeats: int = 3) -> dict:
    prompts = prompts_for(path, moekit.models.load_config(path).vocab_size, args.prompts)
    routing = open_source(routing_name or "own", work)
    rows_per_prompt = [p.shape[1] + args.new_tokens - 1 for p in prompts]  # prefill rows + one per fed-back token
    starts = routing.starts(len(prompts), rows_per_prompt) if routing is not None else None
    mk_runs, acc_runs, ratios, loads, bws, same, same_routing = [], [], [], [], [], [], []
    mk = None
    for r in range(repeats):
        loads.append(os.getloadavg()[0])
        order = ["moekit", "accelerate"] if r % 2 == 0 else ["accelerate", "moekit"]
        for system in order if args.accelerate else ["moekit"]:
            gc.collect()  # the previous run's model
            if system == "moekit":
                mk, mk_out, store_dir = run_moekit(path, work, args.budget, prompts, args.new_tokens, args.prefetch,
                                                   args.policy, args.io_threads, samplers(args, len(prompts)),
                                                   routing=routing, starts=starts)
                mk_runs.append(mk)
            else:
                layer_bytes = mk["expert_bytes"] * mk["num_experts"]
                acc, acc_out = run_accelerate(path, work, mk["budget"], layer_bytes, mk["layers"], prompts,
                                              args.new_tokens, samplers(args, len(prompts)), routing, starts)
                acc_runs.append(acc)
            bws.append(disk_bandwidth(store_dir, args.io_threads))  # after every run: the disk is shared
        if args.accelerate:
            ratios.append(mk_runs[-1]["tok_s"] / acc_runs[-1]["tok_s"])  # the pair of this repeat
            same.append(all(torch.equal(a, b) for a, b in zip(mk_out, acc_out)))
            if routing is not None:  # the same expert traffic: both systems' routers returned the same ids
                same_routing.append(same_executed(mk_runs[-1]["executed"], acc_runs[-1]["executed"]))
    executed = mk_runs[-1].get("executed")
    for run in mk_runs + acc_runs:
        run.pop("executed", None)
    loop = [repetition(t.tolist()) for t in mk_out]
    reuse = mk_runs[-1]["routing_reuse"]  # routing is the same in every repeat (bit-exact, same seeds)
    mk = {**median_run(mk_runs), "prefetch": args.prefetch, "tok_s_spread": spread([m["tok_s"] for m in mk_runs]),
          "hit_rate_spread": spread([m["hit_rate"] for m in mk_runs])}
    row = {"model": str(path), "routing": routing_name or "own",
           "experts": f"{mk['layers']} layers x {mk['num_experts']} experts, top-{mk['top_k']}",
           "expert_mb": mk["expert_bytes"] / 1e6, "experts_gb": mk["total_expert_bytes"] / 1e9,
           "budget_mb": mk["budget"] / 1e6, "moekit": mk, "repeats": repeats, "load_average_1min": loads,
           "decode": args.decode, "temperature": args.temperature if args.decode == "sample" else 0.0,
           "loop_check": loop, "routing_reuse": reuse,
           "degenerate": any(x["looping"] for x in loop) or any(x["static"] for x in reuse)}
    if routing is not None:
        row["replay"] = replay_check(routing, executed, starts, mk["num_experts"])
        row["replay"]["same_routing_in_both_systems"] = all(same_routing) if same_routing else None
        row["degenerate"] |= not row["replay"]["locality"]["kept"] or row["replay"]["same_routing_in_both_systems"] is False
    if args.lowbit is not None:  # HOBBIT: low-weight misses as low-bit copies (changes the output: agreement printed)
        gc.collect()
        low, low_out, _ = run_moekit(path, work, args.budget, prompts, args.new_tokens, args.prefetch, args.policy,
                                     args.io_threads, samplers(args, len(prompts)), args.lowbit,
                                     args.lowbit_threshold, routing, starts)
        low.pop("executed", None)
        low.update(lowbit_bits=args.lowbit, lowbit_threshold=args.lowbit_threshold)
        low["same_tokens_fraction"] = sum(int((a == b).sum()) for a, b in zip(low_out, mk_out)) / sum(
            a.numel() for a in mk_out)
        mk["lowbit"] = low
    if args.accelerate:
        row["accelerate"] = {**median_run(acc_runs), "tok_s_spread": spread([a["tok_s"] for a in acc_runs])}
        row["ratio"] = spread(ratios)
        row["same_tokens"] = all(same)
    if args.warm:  # RAM beyond the budget: the OS page cache holds the files (one pair, after the cold repeats)
        gc.collect()
        warm, _, _ = run_moekit(path, work, args.budget, prompts, args.new_tokens, args.prefetch, args.policy,
                                args.io_threads, samplers(args, len(prompts)), routing=routing, starts=starts,
                                warm=True)
        warm.pop("executed", None)
        row["warm"] = {"moekit": warm}
        if args.accelerate:
            gc.collect()
            layer_bytes = mk["expert_bytes"] * mk["num_experts"]
            acc, _ = run_accelerate(path, work, mk["budget"], layer_bytes, mk["layers"], prompts, args.new_tokens,
                                    samplers(args, len(prompts)), routing, starts, warm=True)
            acc.pop("executed", None)
            row["warm"].update(accelerate=acc, ratio=warm["tok_s"] / acc["tok_s"])
    row["disk_measurements_gbs"] = [{k: v / 1e9 for k, v in m.items()} for m in bws]
    bw = max(v for m in bws for v in m.values())
    row["disk_gbs"] = bw / 1e9
    # this machine's second floor: the active experts' compute from RAM (layers x top-k expert GEMVs per token)
    row["expert_compute_ms"] = expert_compute_s(path, args.threads) * 1e3
    floor = mk["layers"] * mk["top_k"] * row["expert_compute_ms"] / 1e3
    row["full_bound_tok_s"] = 1 / max(mk["missed_bytes_per_token"] / bw, floor)
    row["fraction_of_full_bound"] = mk["tok_s"] / row["full_bound_tok_s"]
    # the physical bound at moekit's hit rate: every demand-missed byte must come from disk (prefetches of wrongly
    # predicted experts are extra traffic the bound does not grant)
    row["bound_tok_s"] = bw / mk["missed_bytes_per_token"] if mk["missed_bytes_per_token"] else float("inf")
    row["fraction_of_bound"] = mk["tok_s"] / row["bound_tok_s"]
    # the same bound at the disk's bandwidth for the pattern moekit needs (random expert reads, several in flight):
    # experts are read in the order routing asks for them, so the sequential figure above is out of reach by design
    random_bw = max(m["random_parallel"] for m in bws)
    row["random_bound_tok_s"] = random_bw / mk["missed_bytes_per_token"] if mk["missed_bytes_per_token"] else 0.0
    row["fraction_of_random_bound"] = mk["tok_s"] / row["random_bound_tok_s"] if row["random_bound_tok_s"] else 0.0
    return row


def same_executed(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(np.array_equal(x[i], y[i]) for i in x) for x, y in zip(a, b, strict=True))


def replay_check(source: ReplaySource, executed: list[dict], starts: list[int], model_experts: int) -> dict:
    """The replayed run against its trace: locality_kept on the rows each prompt replayed, and, for scale, the same
    statistics over the whole trace (every traced window; trace capacities 2 and 4 x K_t)."""
    from moekit.routing.replay import source_layer

    trace = source.trace
    layer_ids = list(executed[0])  # model decoder-layer indices, in order
    follows = [trace.layers[source_layer(i, len(trace.layers), len(layer_ids))] for i in range(len(layer_ids))]
    want = [[trace.ids(t)[s:s + len(run[li])] for s, run in zip(starts, executed)] for li, t in zip(layer_ids, follows)]
    got = [[run[li] for run in executed] for li in layer_ids]
    caps = [2 * trace.top_k, 4 * trace.top_k]
    whole = {t: locality(trace.ids(t), trace.seq_id, trace.num_experts, caps) for t in trace.layers}
    return {"trace": str(source.path), "trace_model": trace.manifest.get("model"), "trace_tokens": trace.num_tokens,
            "trace_shape": f"{len(trace.layers)} layers x {trace.num_experts} experts, top-{trace.top_k}",
            "mapping": f"trace expert e -> model experts [{model_experts}e/{trace.num_experts}, "
                       f"{model_experts}(e+1)/{trace.num_experts}); model layer i follows trace layer "
                       f"i*{len(trace.layers)}/{len(layer_ids)} (docs/routing.md)",
            "layers_followed": dict(zip(layer_ids, follows)), "start_rows": starts,
            "start_domains": [trace.manifest["domain_names"][int(trace.domain[s])] for s in starts]
            if trace.manifest.get("domain_names") else None,
            "locality": locality_kept(want, got, trace.num_experts, model_experts),
            "whole_trace": {"capacities": caps, "per_layer": whole}}


def print_row(row: dict) -> None:
    mk, acc = row["moekit"], row.get("accelerate")
    print(f"\n{row['model']}: {row['experts']}, expert {row['expert_mb']:.2f} MB, experts {row['experts_gb']:.2f} GB, "
          f"budget {row['budget_mb']:.0f} MB (25%), disk {row['disk_gbs']:.2f} GB/s (best measured, cold)")
    print(f"workload: {row['decode']} decoding (temperature {row['temperature']:g}), routing {row['routing']}, "
          f"{row['repeats']} interleaved repeats, load average "
          f"{', '.join(f'{x:.1f}' for x in row['load_average_1min'])}")
    if "replay" in row:
        print_replay(row["replay"])
    for i, (c, u) in enumerate(zip(row["loop_check"], row["routing_reuse"])):
        print(f"  prompt {i}: distinct-2 {c['distinct_2']:.2f}, longest periodic suffix {c['cycle_tokens']} of "
              f"{c['tokens']} tokens (period {c['cycle_period']}){'  LOOPING' if c['looping'] else ''}; experts "
              f"kept from the previous token {u['mean']:.2f} (per layer {' '.join(f'{x:.2f}' for x in u['per_layer'])}"
              f"; chance {u['chance']:.2f}){'  STATIC ROUTING' if u['static'] else ''}")
    print(f"{'system':<12}{'tok/s median':>13}{'range':>17}{'missed MB/tok':>15}{'read MB/tok':>13}{'disk MB/tok':>13}"
          f"{'hit rate':>10}")
    t = mk["tok_s_spread"]
    print(f"{'moekit':<12}{t['median']:>13.3f}{t['min']:>8.3f}-{t['max']:<8.3f}"
          f"{mk['missed_bytes_per_token'] / 1e6:>15.1f}{mk['bytes_per_token'] / 1e6:>13.1f}"
          f"{mk['io_bytes_per_token'] / 1e6:>13.1f}{mk['hit_rate']:>10.3f}")
    if acc:
        t = acc["tok_s_spread"]
        print(f"{'accelerate':<12}{t['median']:>13.3f}{t['min']:>8.3f}-{t['max']:<8.3f}"
              f"{acc['bytes_per_token'] / 1e6:>15.1f}{acc['bytes_per_token'] / 1e6:>13.1f}"
              f"{acc['io_bytes_per_token'] / 1e6:>13.1f}{'-':>10}")
        r = row["ratio"]
        print(f"ratio moekit/accelerate (each repeat's pair): median {r['median']:.2f}x, range {r['min']:.2f}-"
              f"{r['max']:.2f}x; same tokens: {row['same_tokens']}")
    if "lowbit" in mk:
        low = mk["lowbit"]
        print(f"moekit + {low['lowbit_bits']}-bit misses below weight {low['lowbit_threshold']}: {low['tok_s']:.3f} "
              f"tok/s, read {low['bytes_per_token'] / 1e6:.1f} MB/tok, {low['lowbit_reads']} low-bit reads, "
              f"tokens equal to the exact run: {low['same_tokens_fraction']:.2f}")
    print(f"moekit prefetch {'on' if mk['prefetch'] else 'off'}; full bound {row['full_bound_tok_s']:.2f} tok/s = "
          f"1 / max(missed bytes / disk bandwidth, layers x top-k x {row['expert_compute_ms']:.2f} ms expert compute): "
          f"moekit (median run) reaches {row['fraction_of_full_bound']:.2f} of it")
    print(f"bound {row['bound_tok_s']:.2f} tok/s = disk bandwidth / moekit missed bytes per token: "
          f"{row['fraction_of_bound']:.2f} of it; random-read bound {row['random_bound_tok_s']:.2f} tok/s (disk's best "
          f"random-expert bandwidth, 4 threads): {row['fraction_of_random_bound']:.2f}; median run: wait "
          f"{mk['wait_s']:.1f} s, compute {mk['compute_s']:.1f} s")
    if "warm" in row:
        w = row["warm"]
        line = (f"warm page cache (one pair): moekit {w['moekit']['tok_s']:.3f} tok/s, read "
                f"{w['moekit']['bytes_per_token'] / 1e6:.1f} MB/tok of which the page cache served "
                f"{w['moekit']['page_cache_bytes_per_token'] / 1e6:.1f}, disk {w['moekit']['io_bytes_per_token'] / 1e6:.1f}"
                f" MB/tok")
        if "accelerate" in w:
            line += (f"; accelerate {w['accelerate']['tok_s']:.3f} tok/s (disk "
                     f"{w['accelerate']['io_bytes_per_token'] / 1e6:.1f} MB/tok); ratio {w['ratio']:.2f}x")
        print(line)
    if row["degenerate"]:
        print("DEGENERATE WORKLOAD: the generated tokens loop or the routing barely changes from token to token "
              "(above), so a cache hits far more often than users see. Do not quote this row.")


def print_replay(rep: dict) -> None:
    loc = rep["locality"]
    ms = loc["segment_lengths"]
    fmt = lambda xs: "/".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"routing replayed from {rep['trace']} ({rep['trace_model']}, {rep['trace_shape']}, "
          f"{rep['trace_tokens']} tokens); {rep['mapping']}; prompts start at trace rows {rep['start_rows']} "
          f"({', '.join(rep['start_domains'] or [])}); same routing in both systems: "
          f"{rep['same_routing_in_both_systems']}")
    print(f"  rows following the mapped trace: {loc['follows']:.3f}; SRP (m={'/'.join(map(str, ms))}) and SCH "
          f"(m={'/'.join(map(str, ms))} x capacities) of the replayed rows, trace -> run, max |diff| SRP "
          f"{loc['max_srp_diff']:.3f}, SCH {loc['max_sch_diff']:.3f} (<= 0.05): "
          f"{'KEPT' if loc['kept'] else 'NOT KEPT'}")
    for li, (lay, t) in enumerate(zip(loc["per_layer"], rep["layers_followed"].values())):
        whole = rep["whole_trace"]["per_layer"][t]
        print(f"  layer {li}: SRP {fmt(lay['srp_trace'])} -> {fmt(lay['srp_run'])}, SCH cap "
              f"{lay['capacities_trace']}->{lay['capacities_model']} {fmt(sum(lay['sch_trace'], []))} -> "
              f"{fmt(sum(lay['sch_run'], []))}; whole trace layer {t}: SRP {fmt(whole['srp'])}, SCH "
              f"{fmt(sum(whole['sch'], []))}")


def print_summary(rows: list[dict]) -> None:
    print(f"\n{'model':<44}{'decode':>8}{'routing':>9}{'hit rate':>10}{'ratio median':>14}{'range':>14}  workload")
    for row in rows:
        r = row.get("ratio")
        ratio = (f"{r['median']:>13.2f}x{r['min']:>8.2f}-{r['max']:.2f}x" if r else f"{'-':>14}{'-':>14}")
        name = Path(row["model"])
        name = name.relative_to(ROOT) if name.is_relative_to(ROOT) else name.name
        print(f"{str(name):<44}{row['decode']:>8}{row['routing'].partition('=')[0]:>9}{row['moekit']['hit_rate']:>10.3f}"
              f"{ratio}  {verdict(row)}")


def verdict(row: dict) -> str:
    rep = row.get("replay")
    why = [w for w, bad in (("tokens loop", any(c["looping"] for c in row["loop_check"])),
                            ("static routing", any(u["static"] for u in row["routing_reuse"])),
                            ("trace locality not kept", rep is not None and not rep["locality"]["kept"]),
                            ("systems routed differently", rep is not None
                             and rep["same_routing_in_both_systems"] is False)) if bad]
    if why:
        return f"DEGENERATE ({', '.join(why)})"
    return "ok (no loop, routing varies" + (", trace locality kept)" if rep is not None else ")")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", help="checkpoint(s); default: demo/model if present")
    ap.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--synthetic-routing", default="replay", type=routing_source,
                    help="where the synthetic model's routing comes from: replay (default: the demo model's routing "
                         "on held-out text, recorded under --work), replay=TRACE (any trace), own (its random "
                         "routers: flagged static)")
    ap.add_argument("--layers", type=int, default=4, help="MoE layers of the synthetic model")
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of the routed experts' bytes")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--decode", choices=["sample", "greedy"], default="sample",
                    help="sample (default: what chat users run) or greedy (loops on small and random models)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (--decode sample)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the first prompt (+1 per prompt)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved moekit / accelerate repeats, synthetic model")
    ap.add_argument("--model-repeats", type=int, default=7,
                    help="the same for the --model checkpoints (default demo/model): a demo run decodes for about a "
                         "second, so its tokens/s is the noisier, and a repeat costs seconds")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=False,
                    help="moekit's pre-gating prefetch (default off: `moekit run`'s default on the CPU)")
    ap.add_argument("--accelerate", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--lowbit", type=int, default=None, help="also run moekit once with HOBBIT low-bit misses of BITS")
    ap.add_argument("--lowbit-threshold", type=float, default=0.1)
    ap.add_argument("--io-threads", type=int, default=4, help="moekit's expert-reading threads")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for both systems (default 1: on a shared, oversubscribed 2-core "
                         "machine OpenMP barriers stall for whole scheduler slices; measured 69 ms per index_add_)")
    ap.add_argument("--warm", action=argparse.BooleanOptionalAction, default=False,
                    help="after the cold repeats (the headline), run both systems once more with their files in the "
                         "OS page cache (a machine with RAM beyond the budget; reads the files first: ~1 min more)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moekit-bench")
    args = ap.parse_args()
    if min(args.repeats, args.model_repeats) < 1 or args.new_tokens < 2 or args.temperature <= 0:
        ap.error("--repeats and --model-repeats >= 1, --new-tokens >= 2 and --temperature > 0 are needed")
    t0, load0 = time.perf_counter(), os.getloadavg()  # wall time includes building the synthetic model and the trace
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoints = args.model or ([ROOT / "demo/model"] if (ROOT / "demo/model/config.json").is_file() else [])
    models = [(m, None, args.model_repeats) for m in checkpoints]
    if args.synthetic:
        models.append((synthetic_checkpoint(args.work / f"synthetic-qwen3moe-{args.layers}l", args.layers),
                       args.synthetic_routing, args.repeats))
    rows = []
    for path, routing, repeats in models:
        rows.append(bench(path, args.work, args, routing, repeats))
        print_row(rows[-1])
    print_summary(rows)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()
    print(f"wall time {wall / 60:.1f} min (work folder {args.work}); load average (1, 5, 15 min) at the start "
          f"{', '.join(f'{x:.2f}' for x in load0)}, at the end {', '.join(f'{x:.2f}' for x in load1)}")
    print(json.dumps({"benchmark": "offload", "wall_s": wall, "load_average_start": load0, "load_average_end": load1,
                      "budget_fraction": args.budget, "new_tokens": args.new_tokens,
                      "prompts": args.prompts, "policy": args.policy, "prefetch": args.prefetch,
                      "decode": args.decode, "temperature": args.temperature, "seed": args.seed,
                      "repeats": args.repeats, "model_repeats": args.model_repeats,
                      "io_threads": args.io_threads, "threads": args.threads, "warm": args.warm,
                      "degenerate": any(r["degenerate"] for r in rows), "rows": rows}, default=float))
    if any(r["degenerate"] for r in rows):
        sys.exit(3)


if __name__ == "__main__":
    main()
