"""Serving: `moekit serve` against `transformers serve --continuous-batching`, and batching over offloaded experts.

    .venv/bin/python benchmarks/serve.py                  # both setups, 3 repeats (over 40 min on 2 shared cores)
    .venv/bin/python benchmarks/serve.py --setups memory --repeats 1
    .venv/bin/python benchmarks/serve.py --setups offload --offload-models synthetic --offload-concurrency 1,16 \
        --repeats 3 --max-tokens 32      # the replayed synthetic offload rows of docs/serving.md (~6 min)

Setup 1, demo model in memory: moekit serve (--budget all: every expert stays resident once read; a warm-up pass reads
them before any timing) and
transformers serve --continuous-batching (its paged-attention continuous batching, KV cache sized with --cb-num-blocks
/ --cb-max-batch-tokens to the same tokens as moekit's --max-kv-tokens / --max-step-tokens: left to its defaults on the
CPU, it sizes its cache from RAM and spends most of each step clearing it), both servers up during the whole run, the
same torch threads, the same prompts (held-out text of the eight demo corpus domains), greedy, max_tokens 64,
streamed, at concurrency 1, 8 and 32, the two systems interleaved at every concurrency and repeat. Reported: aggregate
tokens/s (generated tokens / wall time of the whole batch of requests), time to first token and time per output token
((e2e - TTFT) / (tokens - 1)) p50 / p99 over requests; ratios against transformers serve from the same repeat.
Goal (issue #12): >= 1.5x transformers serve's tokens/s at 8 and 32 with TTFT no worse.

Setup 2, offloaded at 25% budget (--no-page-cache: experts read with O_DIRECT, the budget is all the RAM they get), at
concurrency 1, 4 and 16; tokens/s, expert bytes read per generated token and hit rate, from the server's own /metrics.
Two workloads (--offload-models): `synthetic`, a Qwen3-MoE with 64 experts, top-8, random weights, float32 (the
issue's setup); and `demo`, the demo model (trained routing, 8 of each layer's 32 experts cached). Random weights loop
under greedy decoding (the same tokens, the same routing, flattering hit rates), so the synthetic workload samples
(temperature 1, seeded) from prompts of 32 random token ids, a different prompt per request; the distinct character
4-gram fraction of the outputs is printed to show nothing loops. The synthetic model's routing comes from
--synthetic-routing. Default `replay`: the trained demo model's routing on held-out text (the offload benchmark's
4,096-token trace over the 8 demo-corpus domains, S = 27 windows of at most 256 tokens, recorded once under --work;
benchmarks/_replay.py), served with `--routing replay=TRACE`: the demo's 32 experts top-4 map onto the synthetic 64
top-8 as blocks of two, and the server's n-th sequence replays traced window n mod S (moekit/routing/replay.py), so
concurrent sequences route like different users on different texts. Every concurrency then sends the same number of
requests (the largest concurrency, at least --offload-requests-min), after untimed one-token requests that bring the
server's count to a multiple of S: each measurement replays traced windows 0..15 (prose to japanese), the same ones
at every concurrency and repeat, so concurrency 1 is not flattered by an easier subset. `own`: the random routers,
which route one sequence almost statically (the residual stream of a random model is dominated by slowly varying
attention averages; issue #18), so their concurrency-1 hit rate is far above a trained model's and batching looks
worse than it is. Concurrencies are interleaved within each repeat (order alternating).
Goal (issue #12): at 16, bytes per token <= 0.5x and tokens/s >= 3x their concurrency-1 values.

Prints tables, the load average, and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx  # the openai package's HTTP client (in the lock as its dependency)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _replay import ReplaySource, open_source, routing_source  # noqa: E402  (benchmarks/_replay.py)
from moekit.routing.replay import sequence_starts  # noqa: E402

DOMAINS = ["prose", "code", "math", "german", "french", "russian", "japanese", "dialogue"]
SYNTH = {"hidden_size": 1024, "moe_intermediate_size": 512, "num_experts": 64, "num_experts_per_tok": 8,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128,
         "intermediate_size": 4096, "vocab_size": 8192, "max_position_embeddings": 4096, "norm_topk_prob": True,
         "tie_word_embeddings": False}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def demo_prompts(n: int, tokens: int = 48) -> list[str]:
    """n prompts of about `tokens` tokens, round-robin over the domains' held-out files (different windows)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "demo" / "model")
    out = []
    for i in range(n):
        ids = tok((ROOT / "demo/corpus/heldout" / f"{DOMAINS[i % 8]}.txt").read_text()[:20000]).input_ids
        start = (i // 8) * 97 * tokens % max(1, len(ids) - tokens)
        out.append(tok.decode(ids[start:start + tokens]))
    return out


def synthetic_checkpoint(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**SYNTH), dtype=torch.float32)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    transformers.AutoTokenizer.from_pretrained(ROOT / "demo" / "model").save_pretrained(tmp)  # ids < 8192: any works
    tmp.rename(path)
    return path


class Server:
    def __init__(self, name: str, cmd: list[str], url: str, model: str, env: dict):
        self.name, self.url, self.model = name, url, model
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{name} exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        sys.exit(f"{name} did not become healthy")

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (all its threads): less sensitive to a shared machine's load."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}  # summed over labels (layers, finish reasons)
        for fam in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=30).text):
            for s in fam.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


async def request(client, server: Server, prompt: str, max_tokens: int, sampling: dict) -> dict:
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **sampling}
    t0 = time.perf_counter()
    first, text, tokens = None, [], None
    async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c.get("text"):
                    first = first or time.perf_counter()
                    text.append(c["text"])
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - t0, "e2e": end - t0, "tokens": tokens or 0, "text": "".join(text)}


async def run_load(server: Server, prompts: list[str], concurrency: int, max_tokens: int, sampling) -> dict:
    todo = list(enumerate(prompts))
    results: dict[int, dict] = {}

    async def worker(client):
        while todo:
            i, p = todo.pop(0)
            results[i] = await request(client, server, p, max_tokens, sampling(i))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        t0, cpu0 = time.perf_counter(), server.cpu_s()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, server.cpu_s() - cpu0
    rows = [results[i] for i in range(len(prompts))]
    tokens = sum(r["tokens"] for r in rows)
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in rows if r["tokens"] > 1]
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "tok_per_cpu_s": tokens / max(cpu, 1e-9),
            "ttft_p50": pct([r["ttft"] for r in rows], 50),
            "ttft_p99": pct([r["ttft"] for r in rows], 99), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
            "texts": [r["text"] for r in rows]}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def distinct_fraction(texts: list[str], unit=str.split) -> float:
    """Distinct 4-grams / 4-grams over the outputs (of words, or of characters): near 0 when generation loops."""
    grams = [tuple(w[i:i + 4]) for t in texts for w in [unit(t)] for i in range(max(0, len(w) - 3))]
    return len(set(grams)) / len(grams) if grams else float("nan")


def moekit_cmd(model: Path, port: int, args, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "moekit", "serve", str(model), "--port", str(port), "--threads", str(args.threads),
            "--max-batch", str(args.max_batch), "--max-queue", "256", "--max-kv-tokens", str(args.kv_tokens),
            "--max-step-tokens", str(args.step_tokens), *extra]


def summarise(runs: list[dict], key: str) -> tuple[float, float, float]:
    vals = [r[key] for r in runs]
    return statistics.median(vals), min(vals), max(vals)


def memory_setup(args, env) -> dict:
    model = ROOT / "demo" / "model"
    prompts = demo_prompts(max(args.requests_min, 2 * max(args.memory_concurrency)))
    ours = Server("moekit", moekit_cmd(model, args.port, args, ["--budget", "all"]), f"http://127.0.0.1:{args.port}",
                  "model", env)
    blocks = -(-args.kv_tokens // 256)
    theirs = Server("transformers", [str(Path(sys.executable).with_name("transformers")), "serve", str(model),
                                     "--continuous-batching", "--host", "127.0.0.1", "--port", str(args.port + 1),
                                     "--device", "cpu", "--cb-block-size", "256", "--cb-num-blocks", str(blocks),
                                     "--cb-max-batch-tokens", str(args.step_tokens), "--log-level", "warning"],
                    f"http://127.0.0.1:{args.port + 1}", str(model), env)
    greedy = lambda i: {"temperature": 0}  # noqa: E731
    out = {}
    try:
        for srv in (ours, theirs):  # warm-up: first-use costs (expert reads, allocator, kernels) outside the timing
            asyncio.run(run_load(srv, prompts, 8, 16, greedy))
        for c in args.memory_concurrency:
            per = {"moekit": [], "transformers": []}
            for rep in range(args.repeats):
                for srv in ((ours, theirs) if rep % 2 == 0 else (theirs, ours)):  # interleaved, order alternating
                    res = asyncio.run(run_load(srv, prompts[:max(args.requests_min, 2 * c)], c, args.max_tokens,
                                               greedy))
                    res["load"] = loadavg()
                    per[srv.name].append(res)
                    print(f"  memory c={c:<3} rep {rep} {srv.name:<12} {res['tok_s']:8.1f} tok/s "
                          f"({res['tok_per_cpu_s']:6.1f} per CPU s)  ttft p50 "
                          f"{res['ttft_p50'] * 1e3:7.0f} ms  tpot p50 {res['tpot_p50'] * 1e3:6.1f} ms  "
                          f"load {res['load']}", flush=True)
            same = sum(a == b for a, b in zip(per["moekit"][0]["texts"], per["transformers"][0]["texts"]))
            out[c] = {"runs": per, "same_text": same / len(per["moekit"][0]["texts"]),
                      "distinct_4grams": distinct_fraction(per["moekit"][0]["texts"]),
                      "ratios": [a["tok_s"] / b["tok_s"] for a, b in zip(per["moekit"], per["transformers"])],
                      "cpu_ratios": [a["tok_per_cpu_s"] / b["tok_per_cpu_s"] for a, b in zip(per["moekit"],
                                                                                            per["transformers"])],
                      "ttft_ratios": [a["ttft_p50"] / b["ttft_p50"] for a, b in zip(per["moekit"],
                                                                                   per["transformers"])]}
    finally:
        ours.stop()
        theirs.stop()
    return out


@dataclass
class Workload:
    """One offloaded workload: its checkpoint, 25% budget, prompts, sampling(i, rep), expert sizes, routing."""

    model: Path
    budget: int  # bytes
    prompts: list
    sampling: Callable[[int, int], dict]
    expert_bytes: int
    total: int  # all experts' bytes
    how: str  # for the table's heading
    replay: ReplaySource | None = None  # the server's --routing replay=TRACE (None: the model's own routers)


def offload_workloads(args) -> dict[str, Workload]:
    out = {}
    if "synthetic" in args.offload_models:
        model = synthetic_checkpoint(args.work / "serve-synthetic")
        eb = 3 * SYNTH["hidden_size"] * SYNTH["moe_intermediate_size"] * 4
        total = eb * SYNTH["num_experts"] * SYNTH["num_hidden_layers"]
        g = random.Random(0)  # distinct random-token prompts: each request routes its own way
        prompts = [[g.randrange(1, SYNTH["vocab_size"]) for _ in range(32)] for _ in range(64)]
        source = open_source(args.synthetic_routing, args.work)
        how = (f"routing replayed from {source.path} (each sequence its own traced sequence)" if source is not None
               else "its own random routers")
        out["synthetic"] = Workload(model, total // 4, prompts, lambda i, rep: {"temperature": 1.0,
                                                                               "seed": 1000 * rep + i},
                                    eb, total, f"sampling at temperature 1, random-token prompts, {how}", source)
    if "demo" in args.offload_models:  # trained routing: what batching does when routing is not random
        eb, total = 3 * 256 * 128 * 2, 3 * 256 * 128 * 2 * 32 * 4
        out["demo"] = Workload(ROOT / "demo" / "model", total // 4, demo_prompts(64), lambda i, rep: {"temperature": 0},
                               eb, total, "greedy, held-out text")
    return out


def offload_setup(args, env, name, w: Workload) -> dict:
    extra = ["--budget", str(w.budget), "--no-page-cache", "--store", str(args.work / f"serve-store-{name}"),
             *(["--routing", w.replay.spec] if w.replay is not None else []), *shlex.split(args.offload_serve_args)]
    srv = Server("moekit", moekit_cmd(w.model, args.port + 2, args, extra), f"http://127.0.0.1:{args.port + 2}",
                 w.model.name, env)
    # Replayed: the server's n-th sequence replays traced sequence n mod S (moekit/routing/replay.py). Every
    # concurrency sends the same number of requests (the largest concurrency), and untimed one-token requests before
    # each measurement bring the server's count to a multiple of S: every measurement replays traced sequences
    # 0..most-1, the same users at every concurrency and repeat.
    most = max(*args.offload_concurrency, args.offload_requests_min)
    S = len(sequence_starts(w.replay.trace)) if w.replay is not None else 0
    out = {c: {"runs": []} for c in args.offload_concurrency}
    try:
        asyncio.run(run_load(srv, w.prompts[-2:], 2, 4, lambda i: w.sampling(i, 99)))
        issued = 2  # sequences the server has numbered (the warm-up's)
        for rep in range(args.repeats):
            order = args.offload_concurrency if rep % 2 == 0 else args.offload_concurrency[::-1]  # interleaved
            for c in order:
                if S and issued % S:
                    pad = S - issued % S
                    asyncio.run(run_load(srv, w.prompts[:pad], min(pad, most), 1, lambda i: w.sampling(i, 99)))
                    issued += pad
                before = srv.metrics()
                n = most if S else max(c, args.offload_requests_min)
                res = asyncio.run(run_load(srv, w.prompts[:n], c, args.max_tokens,
                                           lambda i, rep=rep: w.sampling(i, rep)))
                after = srv.metrics()
                d = lambda k: after.get(k, 0) - before.get(k, 0)  # noqa: E731
                hits, misses = d("moekit:expert_cache_hits_total"), d("moekit:expert_cache_misses_total")
                res.update(bytes_per_token=d("moekit:expert_bytes_read_total") / max(1, res["tokens"]),
                           hit_rate=hits / max(1, hits + misses), load=loadavg(),
                           distinct_tokens=distinct_fraction(res["texts"], list))
                if S:
                    res["traced_sequences"] = sorted({(issued + k) % S for k in range(n)})
                issued += n
                out[c]["runs"].append(res)
                print(f"  offload {name} c={c:<3} rep {rep} {res['tok_s']:8.2f} tok/s  "
                      f"{res['bytes_per_token'] / 1e6:7.2f} MB/token  hit rate {res['hit_rate']:.3f}  "
                      f"load {res['load']}"
                      + (f"  replays {len(res['traced_sequences'])} of {S} traced sequences" if S else ""),
                      flush=True)
    finally:
        srv.stop()
    out["expert_mb"], out["experts_gb"], out["budget_mb"] = w.expert_bytes / 1e6, w.total / 1e9, w.budget / 1e6
    out["how"] = w.how
    return out


def print_memory(res: dict) -> None:
    print("\nDemo model in memory: moekit serve vs transformers serve --continuous-batching (median [min-max] over "
          "repeats)")
    print(f"{'conc':>4} {'system':<13}{'tok/s':>24}{'TTFT p50 ms':>14}{'TTFT p99 ms':>13}{'TPOT p50 ms':>13}"
          f"{'TPOT p99 ms':>13}")
    for c, row in res.items():
        for name, runs in row["runs"].items():
            med, lo, hi = summarise(runs, "tok_s")
            print(f"{c:>4} {name:<13}{med:>10.1f} [{lo:.1f}-{hi:.1f}]".ljust(42)
                  + f"{summarise(runs, 'ttft_p50')[0] * 1e3:>14.0f}{summarise(runs, 'ttft_p99')[0] * 1e3:>13.0f}"
                    f"{summarise(runs, 'tpot_p50')[0] * 1e3:>13.1f}{summarise(runs, 'tpot_p99')[0] * 1e3:>13.1f}")
        r = row["ratios"]
        print(f"     ratio tok/s {statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}] (per CPU second "
              f"{statistics.median(row['cpu_ratios']):.2f}x), TTFT p50 ratio "
              f"{statistics.median(row['ttft_ratios']):.2f}; same greedy text {row['same_text']:.2f}; distinct "
              f"4-grams {row['distinct_4grams']:.2f}")


def print_offload(name: str, res: dict) -> None:
    print(f"\n{name} model offloaded: {res['experts_gb']:.3f} GB of experts ({res['expert_mb']:.2f} MB each), "
          f"budget {res['budget_mb']:.1f} MB (25%), O_DIRECT reads, {res['how']}")
    print(f"{'conc':>4}{'tok/s':>26}{'MB read/token':>16}{'hit rate':>10}{'distinct char 4-grams':>23}")
    base = None
    for c, row in res.items():
        if not isinstance(c, int):
            continue
        runs = row["runs"]
        med, lo, hi = summarise(runs, "tok_s")
        bpt = summarise(runs, "bytes_per_token")[0]
        base = base or (med, bpt)
        print(f"{c:>4}{med:>12.2f} [{lo:.2f}-{hi:.2f}]".ljust(30) + f"{bpt / 1e6:>16.1f}"
              f"{summarise(runs, 'hit_rate')[0]:>10.3f}{summarise(runs, 'distinct_tokens')[0]:>23.2f}"
              f"   vs c=1: tok/s {med / base[0]:.2f}x, bytes/token {bpt / base[1]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default="memory,offload", help="memory, offload or both (comma-separated)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--memory-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--offload-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--requests-min", type=int, default=8, help="requests per measurement at least (else 2 x conc)")
    ap.add_argument("--offload-requests-min", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of both servers (OMP_NUM_THREADS too)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--kv-tokens", type=int, default=8192, help="KV tokens of both servers' caches")
    ap.add_argument("--step-tokens", type=int, default=512, help="tokens per step of both servers")
    ap.add_argument("--port", type=int, default=18600)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moekit-serve-bench"))
    ap.add_argument("--offload-models", default="synthetic,demo",
                    help="offloaded workloads: synthetic (random weights) and/or demo (trained routing)")
    ap.add_argument("--synthetic-routing", default="replay", type=routing_source,
                    help="the synthetic model's routing: replay (default: the demo model's routing on held-out text, "
                         "recorded under --work, served with --routing replay=TRACE), replay=TRACE (any trace), own "
                         "(its random routers: near-static, flattering hit rates)")
    ap.add_argument("--offload-serve-args", default="", help="extra `moekit serve` flags for the offloaded setup")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MOEKIT_CACHE": str(args.work / "cache"),
           "TOKENIZERS_PARALLELISM": "false"}
    setups = args.setups.split(",")
    print(f"load average at start: {loadavg()}, {os.cpu_count()} cores")
    result = {"load_start": loadavg()}
    if "memory" in setups:
        result["memory"] = memory_setup(args, env)
        print_memory(result["memory"])
    if "offload" in setups:
        result["offload"] = {name: offload_setup(args, env, name, w) for name, w in offload_workloads(args).items()}
        for name, res in result["offload"].items():
            print_offload(name, res)
    result["load_end"] = loadavg()
    print(f"\nload average at end: {result['load_end']}")
    for row in result.get("memory", {}).values():
        for runs in row["runs"].values():
            for r in runs:
                r.pop("texts")
    for res in result.get("offload", {}).values():
        for key, row in res.items():
            if isinstance(key, int):
                for r in row["runs"]:
                    r.pop("texts")
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
