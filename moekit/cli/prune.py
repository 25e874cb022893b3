"""`moekit prune MODEL --keep N|FRACTION --method M --calib DATA --out DIR`: drop experts, write a checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moekit.cli import app, binary_bytes, console, print_json, progress_bar
from moekit.errors import at_least


@app.command()
def prune(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder of an MoE causal LM"),
    keep: str = typer.Option(..., "--keep", help="experts to keep per layer: a count (24) or a fraction (0.75)"),
    method: str = typer.Option(..., "--method", help="random | frequency | tcess | easy-ep | naee"),
    calib: list[str] = typer.Option(..., "--calib", help=".txt / .jsonl file or demo-corpus domain(s), comma-separated"),
    out: Path = typer.Option(..., "--out", help="output checkpoint folder (must not exist)"),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="calibration tokens, shared across the --calib sources"),
    seq_len: int = typer.Option(256, "--seq-len", help="calibration window length"),
    seed: int = typer.Option(0, "--seed", help="seed of the random method"),
    threads: int = typer.Option(0, "--threads", help="CPU threads (0: torch's default; 1 is fastest on a busy machine)"),
    json_out: bool = typer.Option(False, "--json", help="print the compression report as one JSON object"),
) -> None:
    """Keep N of E experts in every MoE layer, chosen by a calibration-based score; save the pruned checkpoint."""
    import torch

    from moekit.compress.prune import PruneOptions, prune_checkpoint

    at_least("--threads", threads, 0)
    if threads > 0:
        torch.set_num_threads(threads)
    rep = prune_checkpoint(model, keep, method, calib, out, max_tokens=max_tokens, seq_len=seq_len,
                           opts=PruneOptions(seed=seed), progress_factory=progress_bar)
    if json_out:
        print_json(rep)
        return
    table = Table(title=f"{rep['method_label']}: {rep['experts_before']} -> {rep['experts_after']} experts per layer")
    for col in ("layer", "kept", "dropped"):
        table.add_column(col)
    for index, row in rep["layers"].items():
        table.add_row(index, _ids(row["kept"]), _ids(row["dropped"]))
    console.print(table)
    console.print(f"wrote {out}; parameters {binary_bytes(rep['bytes_before'])} -> {binary_bytes(rep['bytes_after'])}; "
                  f"calibration: {rep['calibration']['tokens']} tokens of {', '.join(rep['calibration']['data'])}")


def _ids(ids: list[int]) -> str:
    return " ".join(map(str, ids)) if len(ids) <= 24 else " ".join(map(str, ids[:24])) + f" ... (+{len(ids) - 24})"
