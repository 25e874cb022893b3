"""`moekit info MODEL`: what an MoE checkpoint is made of."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moekit.cli import app, binary_bytes, console, print_json


@app.command()
def info(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder of an MoE causal LM"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Architecture, MoE layers, experts, routing rule, parameters total vs active, bytes per expert."""
    import moekit.models
    from moekit.models.summary import summarise

    summary = summarise(moekit.models.load(model, meta=True))  # meta device: shapes only, no weights read
    if json_out:
        print_json(summary)
        return
    table = Table(title=f"{model}", show_header=False)
    rows = [
        ("architecture", f"{summary['architecture']} ({summary['model_type']}"
                         + (f", MoE language model {summary['moe_family']})" if summary["moe_family"] !=
                            summary["model_type"] else ")")),
        ("layers", f"{summary['layers']} ({len(summary['moe_layers'])} MoE, {len(summary['dense_layers'])} dense)"),
        ("experts per layer", str(summary["experts_per_layer"])),
        ("top-k", str(summary["top_k"])),
        ("routing rule", summary["routing_rule"]),
        ("shared experts", summary["shared_experts"]),
        ("parameters", f"{_count(summary['params_total'])} total, {_count(summary['params_active_per_token'])} "
                       f"active per token"),
        ("bytes per expert", f"{binary_bytes(summary['bytes_per_expert'])} ({summary['dtype']})"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
