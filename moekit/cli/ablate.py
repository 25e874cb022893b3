"""`moekit ablate MODEL --trace TRACE --experts super|random|top`: zero experts, report the perplexity change."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moekit.cli import app, console, err_console, print_json


@app.command()
def ablate(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder of an MoE causal LM"),
    trace_dir: Path = typer.Option(..., "--trace", help="a trace of MODEL recorded with --activation-stats"),
    data: list[str] = typer.Option(..., "--data", help="held-out text: .txt, .jsonl or demo-corpus domains"),
    experts: str = typer.Option("super", "--experts", help="super | random | top"),
    count: int = typer.Option(None, "--count", help="experts to zero for random/top (default: as many as super)"),
    seed: int = typer.Option(0, "--seed"),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="held-out tokens per data source"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Zero experts chosen by their activation outliers and report the held-out perplexity change (arXiv 2507.23279)."""
    import moekit.models
    import moekit.trace
    from moekit.compress.ablate import check_fits, choose_experts, zero_experts
    from moekit.compress.evaluate import domain_windows, evaluate
    from moekit.errors import at_least
    from moekit.models.validate import open_checkpoint
    from moekit.trace.data import encoder, resolve_data

    # everything cheap first: the trace and its experts, the data, the checkpoint and its tokenizer; then the weights
    at_least("--max-tokens", max_tokens)
    trace = moekit.trace.open(trace_dir)
    if count is None and experts != "super":
        count = len(choose_experts(trace, "super"))
    chosen = choose_experts(trace, experts, count, seed)
    sources = resolve_data(data)
    checked = open_checkpoint(model, tokenizer=True)
    checked.view.require("ablate", causal=True)
    check_fits(trace, checked.view)
    windows = domain_windows(sources, encoder(checked.tokenizer), 256, max_tokens)
    view = moekit.models.load(model, dtype="float32")
    lm = moekit.models.language_model(view.model)  # a wrapper scores text through its language model
    with err_console.status("evaluating the unablated model"):
        before = evaluate(lm, windows).to_dict()
    zero_experts(view, chosen)
    with err_console.status(f"evaluating with {len(chosen)} experts zeroed"):
        after = evaluate(lm, windows).to_dict()
    result = {"experts": experts, "zeroed": [list(p) for p in chosen], "before": before, "after": after}
    if json_out:
        print_json(result)
        return
    table = Table(title=f"{len(chosen)} {experts} experts zeroed: {chosen[:8]}{' ...' if len(chosen) > 8 else ''}")
    for col in ("domain", "perplexity before", "after", "change"):
        table.add_column(col, justify="right")
    for name in [*before["domains"], "overall"]:
        b = before["domains"].get(name, before["overall"])["perplexity"]
        a = after["domains"].get(name, after["overall"])["perplexity"]
        table.add_row(name, f"{b:.2f}", f"{a:.2f}", f"{(a / b - 1) * 100:+.1f}%")
    console.print(table)
