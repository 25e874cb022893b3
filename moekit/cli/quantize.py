"""`moekit quantize MODEL --avg-bits B --method rtn|pmq --out DIR`: mixed-precision expert quantisation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moekit.cli import app, console, parse_dtype, print_json, progress_bar


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder of an MoE causal LM (with its tokenizer)"),
    avg_bits: float = typer.Option(..., "--avg-bits", help="average bits per expert weight: 2, 3, 4, 8 (rtn), any "
                                   "value >= 2 such as 2.5 (pmq); 16 keeps the experts as they are"),
    method: str = typer.Option("rtn", "--method", help="rtn (every expert at --avg-bits) | pmq (MC-MoE, arXiv "
                               "2410.06270: per-expert widths from an integer program)"),
    out: Path = typer.Option(..., "--out", help="checkpoint folder to write"),
    group_size: int = typer.Option(128, "--group-size", help="weights per scale/zero group along the input dim"),
    calib: Optional[list[str]] = typer.Option(None, "--calib", help="calibration data (needed by pmq): .txt / "
                                              ".jsonl files or demo-corpus domains"),
    calib_tokens: int = typer.Option(8192, "--calib-tokens", help="calibration tokens"),
    seq_len: int = typer.Option(256, "--seq-len", help="tokens per calibration window"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: checkpoint's)"),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """Quantise the routed experts group-wise (round-to-nearest) at per-expert widths; writes the dequantised model
    (loads with plain from_pretrained) plus a packed `quantized/` sidecar (what a quantised runtime holds)."""
    import moekit.models
    from moekit.compress import quantize as q
    from moekit.compress.calibdata import calibrate, token_batches
    from moekit.compress.checkpoint import save_checkpoint
    from moekit.errors import UserError, at_least
    from moekit.files import check_out
    from moekit.models.validate import open_checkpoint
    from moekit.trace.data import resolve_data

    # everything cheap first: options, --out, the data, the checkpoint (and its tokenizer); then the weights
    q.check_bits(avg_bits, method)
    q.check_group_size(group_size)
    calibrated = method == "pmq" and avg_bits < q.DENSE
    if calibrated and not calib:
        raise UserError("--method pmq needs calibration data: pass --calib DATA")
    torch_dtype = parse_dtype(dtype)
    at_least("--seq-len", seq_len)
    check_out(out)
    if calibrated:
        resolve_data(calib)
    checked = open_checkpoint(model, tokenizer=calibrated, dtype=torch_dtype)
    checked.view.require("quantize", causal=True, routing=calibrated)
    batches = None
    if calibrated:
        batches = token_batches(checked.tokenizer, calib, seq_len=seq_len, max_tokens=calib_tokens)
    view = moekit.models.load(model, dtype=torch_dtype)
    cal = None
    if calibrated:
        with progress_bar("calibrating", sum(b.numel() for b in batches)) as tick:
            cal = calibrate(view, batches, progress=tick)
    with progress_bar(f"quantising ({method})", len(view.layers) * view.num_experts) as step:
        result = q.quantize(view, avg_bits, method=method, group_size=group_size, cal=cal, progress=step)
    report = {**result.report, "source": str(model), "calibration": calib}
    save_checkpoint(view.model, out, source=model, report=report, extra=result.write)
    if json_out:
        print_json({"out": str(out), **{k: v for k, v in report.items() if k not in ("pmq", "bits_per_layer")}})
        return
    table = Table(title=f"{model} -> {out}", show_header=False)
    for key, value in [("method", f"{method}, group {group_size}"),
                       ("average bits", f"{report['avg_bits_achieved']:.3f} (budget {avg_bits:g})"),
                       ("dense bytes (safetensors, dequantised)", f"{report['dense_bytes']:,}"),
                       ("packed bytes (quantized/ sidecar + dense rest)", f"{report['packed_bytes']:,}")]:
        table.add_row(key, value)
    console.print(table)
