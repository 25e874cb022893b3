"""`moekit merge MODEL --groups G --method msmoe|hcsmoe --calib DATA --out DIR`: merge experts into G per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moekit.cli import app, console, parse_dtype, print_json, progress_bar


@app.command()
def merge(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder of an MoE causal LM (with its tokenizer)"),
    groups: int = typer.Option(..., "--groups", help="merged experts per MoE layer (G)"),
    method: str = typer.Option("msmoe", "--method", help="msmoe (arXiv 2310.01334) | hcsmoe (arXiv 2410.08589)"),
    calib: list[str] = typer.Option(..., "--calib", help="calibration data: .txt / .jsonl files or demo-corpus "
                                    "domains (code,prose)"),
    out: Path = typer.Option(..., "--out", help="checkpoint folder to write"),
    router: str = typer.Option("dominant", "--router", help="router row per group: the dominant expert's row "
                               "(dominant) or the usage-weighted mean of the members' rows (average)"),
    align: Optional[bool] = typer.Option(None, "--align/--no-align", help="permutation-align members to the "
                                         "dominant before averaging (default: msmoe yes, hcsmoe no, as the papers)"),
    low_rank: Optional[int] = typer.Option(None, "--low-rank", help="truncated SVD of each merged matrix at this "
                                           "rank (stored dense: HF has no low-rank format)"),
    calib_tokens: int = typer.Option(8192, "--calib-tokens", help="calibration tokens"),
    seq_len: int = typer.Option(256, "--seq-len", help="tokens per calibration window"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: checkpoint's)"),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """Merge each MoE layer's experts into G (M-SMoE or HC-SMoE) and save a checkpoint with G experts per layer."""
    import moekit.models
    from moekit.compress import merge as merging
    from moekit.compress.calibdata import calibrate, token_batches
    from moekit.compress.checkpoint import save_checkpoint
    from moekit.errors import at_least
    from moekit.files import check_out
    from moekit.models.validate import open_checkpoint
    from moekit.trace.data import resolve_data

    # everything cheap first: options, --out, the data, the checkpoint and its tokenizer; then the weights
    merging.check_options(method, router, low_rank)
    torch_dtype = parse_dtype(dtype)
    at_least("--seq-len", seq_len)
    check_out(out)
    resolve_data(calib)
    checked = open_checkpoint(model, tokenizer=True, dtype=torch_dtype)
    checked.view.require("merge", resize=True, causal=True, routing=True)
    merging.check_groups(checked.view, groups)
    batches = token_batches(checked.tokenizer, calib, seq_len=seq_len, max_tokens=calib_tokens)
    view = moekit.models.load(model, dtype=torch_dtype)
    with progress_bar("calibrating", sum(b.numel() for b in batches)) as tick:
        cal = calibrate(view, batches, progress=tick)
    with progress_bar(f"merging ({method})", len(view.layers)) as step:
        report = merging.merge(view, cal, groups, method=method, router=router, align=align, rank=low_rank,
                               progress=step)
    report["source"], report["calibration"] = str(model), calib
    save_checkpoint(view.model, out, source=model, report=report)
    if json_out:
        print_json({"out": str(out), **{k: v for k, v in report.items() if k != "groups_per_layer"}})
        return
    table = Table(title=f"{model} -> {out}", show_header=False)
    b, a = report["before"], report["after"]
    errors = list(report["layer_relative_error"].values())
    for key, value in [("method", f"{method} (router: {router}, aligned: {report['aligned']})"),
                       ("experts per layer", f"{b['experts']} -> {a['experts']}"),
                       ("model bytes", f"{b['model_bytes']:,} -> {a['model_bytes']:,}"),
                       ("layer output error", f"mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f} "
                                              f"(relative, on {report['calibration_tokens']} calibration tokens)")]:
        table.add_row(key, value)
    console.print(table)
