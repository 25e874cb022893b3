"""`moekit eval MODEL --data DATA`: held-out perplexity and next-token accuracy per domain."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moekit.cli import app, console, print_json, progress_bar
from moekit.errors import at_least


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="checkpoint folder (original, pruned, merged, ...)"),
    data: list[str] = typer.Option(..., "--data", help=".txt / .jsonl file or demo-corpus domain(s), comma-separated"),
    seq_len: int = typer.Option(256, "--seq-len", help="window length (non-overlapping windows)"),
    max_tokens: int = typer.Option(16384, "--max-tokens", help="tokens per --data source (0: all)"),
    batch_size: int = typer.Option(16, "--batch-size", help="windows per forward pass"),
    threads: int = typer.Option(0, "--threads", help="CPU threads (0: torch's default; 1 is fastest on a busy machine)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Perplexity (exp of the mean next-token NLL) and top-1 accuracy per domain and overall."""
    import torch

    from moekit.compress.evaluate import evaluate_path

    at_least("--threads", threads, 0)
    if threads > 0:
        torch.set_num_threads(threads)

    result = evaluate_path(model, data, seq_len=seq_len, max_tokens=max_tokens or None, batch_size=batch_size,
                           progress_factory=lambda total: progress_bar("evaluating", total))
    if json_out:
        print_json(result)
        return
    table = Table(title=f"{model}  (windows of {seq_len} tokens)")
    for col in ("domain", "tokens", "perplexity", "accuracy"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    rows = [*result["domains"].items(), ("overall", result["overall"])]
    for domain, row in rows:
        table.add_row(domain, str(row["tokens"]), f"{row['perplexity']:.3f}", f"{row['accuracy']:.2%}")
    console.print(table)
