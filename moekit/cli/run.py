"""`moekit run MODEL --budget 512MB --prompt "..."`: generate with routed experts offloaded to an on-disk store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from moekit.cli import app, console, print_json, progress_bar
from moekit.errors import UserError


@app.command()
def run(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder of an MoE causal LM"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="text to continue"),
    budget: str = typer.Option("512MB", "--budget", help="bytes of routed experts kept in memory, e.g. 512MB, 2GiB"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    policy: str = typer.Option("lru", "--policy", help="expert cache policy: lru, lfu, lfru, score"),
    prefetch: bool = typer.Option(None, "--prefetch/--no-prefetch",
                                  help="pre-gating prefetch of the next layer (default: on with a GPU; off on the CPU, "
                                       "where speculative reads slowed decoding in every measurement: docs/runtime.md)"),
    store: Path = typer.Option(None, "--store", help="expert store folder (default: a cache dir, built on first run)"),
    fiddler: bool = typer.Option(False, "--fiddler", help="GPU only: compute misses on the CPU when that is faster"),
    io_threads: int = typer.Option(4, "--io-threads", min=1, help="threads reading experts from the store"),
    threads: int = typer.Option(None, "--threads", min=1,
                                help="torch compute threads (default: all cores but one, which the reads need: with "
                                     "every core computing, OpenMP barriers stall behind the I/O threads)"),
    lowbit: int = typer.Option(None, "--lowbit", help="HOBBIT: read low-weight misses as BITS-bit copies (2, 3, 4, 8; "
                                                      "changes the output; copies built once next to the store)"),
    lowbit_threshold: float = typer.Option(0.1, "--lowbit-threshold", min=0.0,
                                           help="routing weight below which a miss uses its low-bit copy"),
    eam_trace: Path = typer.Option(None, "--eam-trace",
                                   help="MoE-Infinity: prefetch the experts of the request in this trace (recorded "
                                        "with this model) whose activation matrix best matches, instead of pre-gating"),
    stats: bool = typer.Option(False, "--stats", help="print per-layer cache and prefetch counters"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object (text + counters) instead"),
) -> None:
    """Greedy generation with experts on disk behind a byte budget (experts unfused into a store once)."""
    import time

    import torch
    from transformers import TextStreamer

    import moekit.runtime as rt

    if not prompt:
        raise UserError("--prompt is empty: give the text to continue, e.g. --prompt \"def fibonacci(n):\"")
    options = rt.RuntimeOptions(budget=budget, policy=policy, prefetch=prefetch, store=store, fiddler=fiddler,
                                io_threads=io_threads, threads=threads, lowbit=lowbit,
                                lowbit_threshold=lowbit_threshold, eam_trace=eam_trace)
    om = rt.open_offloaded(model, options, progress=progress_bar)
    tok, view = om.tokenizer, om.view
    ids = tok(prompt, return_tensors="pt").input_ids.to(options.resolved_device())
    if ids.shape[1] == 0:
        om.close()
        raise UserError(f"--prompt {prompt!r} gives no tokens with {model}'s tokenizer: give some text")
    streamer = None if json_out else TextStreamer(tok, skip_prompt=False, skip_special_tokens=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = view.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    seconds = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    summary = {"budget": om.budget, "experts_per_layer": om.capacity, "policy": policy, "new_tokens": new,
               "seconds": seconds, "tokens_per_s": new / seconds, **om.totals()}
    if json_out:
        print_json({"text": tok.decode(out[0], skip_special_tokens=True), **summary,
                    **({"layers": om.stats()} if stats else {})})
    elif stats:
        console.print(stats_table(om.stats(), summary))
    om.close()


def stats_table(rows: list[dict], summary: dict) -> Table:
    """Per-layer counters; the prefetch columns only when something was prefetched, the low-bit one only when used."""
    from moekit.runtime import format_bytes

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,  # every column fits 80 characters
                  title=f"{summary['new_tokens']} tokens in {summary['seconds']:.2f} s "
                        f"({summary['tokens_per_s']:.2f} tok/s), policy {summary['policy']}, "
                        f"{summary['experts_per_layer']} experts/layer")
    columns = {"layer": lambda r: str(r["layer"]), "hits": lambda r: str(r["hits"]),
               "misses": lambda r: str(r["misses"]), "rate": lambda r: f"{r['hit_rate']:.3f}",
               "read": lambda r: format_bytes(r["bytes_read"])}
    if summary["prefetch_reads"]:
        columns.update({"pre P": lambda r: f"{r['prefetch_precision']:.2f}",
                        "pre R": lambda r: f"{r['prefetch_recall']:.2f}"})
    if summary["lowbit_reads"]:
        columns["low-bit"] = lambda r: str(r["lowbit_reads"])
    columns.update({"comp s": lambda r: f"{r['compute_s']:.3f}", "wait s": lambda r: f"{r['wait_s']:.3f}"})
    table.caption = "rate: hit rate; " + ("pre P / R: prefetch precision / recall; " if "pre P" in columns else "") \
        + "comp s / wait s: seconds computing / waiting for reads"
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows + [{**summary, "layer": "all"}]:
        table.add_row(*(cell(r) for cell in columns.values()))
    return table
