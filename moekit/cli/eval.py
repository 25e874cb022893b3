"""`moekit eval MODEL --data DATA`: held-out perplexity and next-token accuracy per domain."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moekit.cli import app, console, print_json, progress_bar
from moekit.cli.experts import CALIB_HELP, ROUTING_HELP, STEER_HELP
from moekit.errors import at_least


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="checkpoint folder (original, pruned, merged, ...)"),
    data: list[str] = typer.Option(..., "--data", help=".txt / .jsonl file or demo-corpus domain(s), comma-separated"),
    seq_len: int = typer.Option(256, "--seq-len", help="window length (non-overlapping windows)"),
    max_tokens: int = typer.Option(16384, "--max-tokens", help="tokens per --data source (0: all)"),
    batch_size: int = typer.Option(16, "--batch-size", help="windows per forward pass"),
    threads: int = typer.Option(0, "--threads", help="CPU threads (0: torch's default; 1 is fastest on a busy machine)"),
    routing: str = typer.Option(None, "--routing", help=ROUTING_HELP),
    steer: Path = typer.Option(None, "--steer", help=STEER_HELP),
    calib: list[str] = typer.Option(None, "--calib", help=CALIB_HELP),
    scmoe: str = typer.Option(None, "--scmoe", help="self-contrast decoding (SCMoE): 'alpha=0.1,beta=0.5,rank=2' or "
                                                    "'default'; reports its next-token accuracy next to greedy's"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Perplexity (exp of the mean next-token NLL) and top-1 accuracy per domain and overall."""
    import torch

    from moekit.compress.evaluate import evaluate_path
    from moekit.routing import parse
    from moekit.routing.calibrate import batch_routing
    from moekit.routing.scmoe import parse_contrast

    at_least("--threads", threads, 0)
    if threads > 0:
        torch.set_num_threads(threads)
    # before any weight is read; check_evaluation checks both against the model's meta-device view
    policy, contrast = batch_routing(parse(routing, steer)), parse_contrast(scmoe)
    if contrast is not None:
        from moekit.compress.evaluate import check_evaluation

        check_evaluation(model, data, seq_len, max_tokens or None, batch_size, [policy, contrast.weak()], calib)
        return _contrast(model, data, contrast, policy, seq_len, max_tokens, batch_size, json_out)
    result = evaluate_path(model, data, seq_len=seq_len, max_tokens=max_tokens or None, batch_size=batch_size,
                           progress_factory=lambda total: progress_bar("evaluating", total), routing=policy,
                           calib=calib or None)
    if json_out:
        print_json(result)
        return
    table = Table(title=f"{model}  (windows of {seq_len} tokens)"
                  + (f", routing {result['routing']}" if "routing" in result else ""))
    for col in ("domain", "tokens", "perplexity", "accuracy"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    rows = [*result["domains"].items(), ("overall", result["overall"])]
    for domain, row in rows:
        table.add_row(domain, str(row["tokens"]), f"{row['perplexity']:.3f}", f"{row['accuracy']:.2%}")
    console.print(table)


def _contrast(model, data, contrast, policy, seq_len, max_tokens, batch_size, json_out) -> None:
    from moekit.routing.scmoe import evaluate_path

    result = evaluate_path(model, data, contrast, policy, seq_len, max_tokens or None, batch_size)
    if json_out:
        print_json(result)
        return
    table = Table(title=f"{model}: {result['decoding']} (strong routing {result['routing']})")
    for col in ("domain", "tokens", "scmoe accuracy", "greedy accuracy"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for domain, row in result["domains"].items():
        table.add_row(domain, str(row["tokens"]), f"{row['accuracy']:.2%}", f"{row['greedy_accuracy']:.2%}")
    console.print(table)
