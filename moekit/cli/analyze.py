"""`moekit analyze TRACE`: every routing metric of a trace, a summary table, and the self-contained HTML report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moekit.cli import app, console, err_console, print_json
from moekit.errors import UserError


@app.command()
def analyze(
    trace_dir: Path = typer.Argument(..., help="trace folder written by `moekit trace`"),
    out: Path = typer.Option(None, "--out", help="write the HTML report here (default: TRACE/report.html)"),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="decode nPMI tokens with this tokenizer folder "
                                   "(default: the traced model's, when its folder is readable; else token ids)"),
    placement: Path = typer.Option(None, "--placement", help="also score this `moekit place` plan on the trace "
                                   "(a placement section in the report)"),
    json_out: bool = typer.Option(False, "--json", help="print the full results as one JSON object"),
) -> None:
    """Load balance, entropy, co-activation, affinity, specialisation, nPMI, locality (SRP/SCH) and cache curves."""
    import moekit.trace
    from moekit.analysis.run import analyze_trace, check_analysable, to_json
    from moekit.files import check_out_file
    from moekit.models.validate import load_tokenizer
    from moekit.report.html import render_report

    trace = moekit.trace.open(trace_dir)
    check_analysable(trace)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else _tokenizer(trace.manifest.get("model"))
    target = check_out_file(out or trace_dir / "report.html")  # before the analysis, not after it
    if placement is not None:  # cheap checks (the plan's files, the plan against the trace) before the analysis
        from moekit.placement import place_eval
        from moekit.placement.api import check_place_eval

        if placement.is_file() and placement.name != "plan.json":  # an SGLang map needs --gpus, which is place-eval's
            raise UserError(f"--placement {placement}: give a `moekit place` output folder; score an SGLang map with "
                            f"`moekit place-eval {placement} --gpus G --trace {trace_dir}`")
        scoring = check_place_eval(placement, trace_dir)
    with err_console.status("analysing routing"):
        results = analyze_trace(trace, tokenizer=tok)
        if placement is not None:
            results["placement"] = to_json(place_eval(placement, trace_dir, inputs=scoring))
    report = render_report(results, target, title=f"moekit routing analysis: {trace_dir}")
    if json_out:
        print_json({**results, "report": str(report)})
        return
    console.print(_summary(results))
    err_console.print(f"report: {report}")


def _tokenizer(path):
    if path is None or not Path(path).is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None  # no tokenizer there: nPMI tables show token ids


def _summary(res: dict) -> Table:
    cache, loc = res["cache"], res["locality"]
    two_x = cache["multiples"].index(2) if 2 in cache["multiples"] else 0
    m16 = loc["segment_lengths"].index(16) if 16 in loc["segment_lengths"] else 0
    table = Table(title=f"{res['n_tokens']} tokens, {res['n_sequences']} sequences, {res['n_experts']} experts")
    for col in ("layer", "entropy", "LBL global", "LBL seq", "MaxVio", "unused", "SRP m=16",
                f"hit@{cache['multiples'][two_x]}xK LRU / LFU / Belady / opt"):
        table.add_column(col, justify="right")
    for i, (name, row) in enumerate(zip(res["layer_names"], res["layers"])):
        hits = " / ".join(_f(cache[p][i][two_x]) for p in ("lru", "lfu", "belady", "opt"))
        table.add_row(name, _f(row["layer_entropy_bits"]), _f(row["global_lbl"]), _f(row["sequence_lbl"]),
                      _f(row["max_vio_global"]), str(row["unused_experts"]), _f(loc["srp"][i][m16]), hits)
    return table


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"
