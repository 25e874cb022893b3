"""`moekit predictor train TRACE... --out P`: the routing predictor behind `--policy predictive` (runtime/predictor.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moekit.cli import app, console, err_console, parse_dtype, print_json, progress_bar
from moekit.errors import UserError
from moekit.files import check_out_file

predictor_app = typer.Typer(help="Train the routing predictor that `--policy predictive` evicts by.",
                            no_args_is_help=True)
app.add_typer(predictor_app, name="predictor")

MIN_AGREEMENT = 0.9  # recomputed routing vs the trace's: below this the trace came from another model


@predictor_app.command("train")
def train(
    traces: list[Path] = typer.Argument(..., metavar="TRACE...", help="trace folders written by `moekit trace`"),
    out: Path = typer.Option(..., "--out", help="predictor file to write (safetensors)"),
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint the traces came from (default: the one "
                                                               "their manifest names)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: the one the "
                                                              "trace was recorded in)"),
    width: int = typer.Option(128, "--width", help="hidden units of the routing heads, per MoE layer"),
    reuse_width: int = typer.Option(64, "--reuse-width", help="hidden units of the reuse heads (the cache forecast)"),
    lookahead: int = typer.Option(1, "--lookahead", help="routing heads: the next N MoE layers in execution order"),
    steps: int = typer.Option(4000, "--steps", help="minibatches of 512 tokens per MoE layer and head group"),
    validation: float = typer.Option(0.1, "--validation", help="fraction of sequences held out to report recall"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="use at most this many tokens (every n-th "
                                                                        "sequence)"),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Fit, per MoE layer, a small MLP predicting the next layers' experts and each expert's next use."""
    from moekit.runtime import predictor_train as pt

    options = pt.TrainOptions(width=width, reuse_width=reuse_width, lookahead=lookahead, steps=steps,
                              validation=validation, seed=seed)
    parse_dtype(dtype)
    check_out_file(out)  # not a folder, in a folder that exists and is writable: before the model is read
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--max-tokens must be >= 2, got {max_tokens}")
    text = pt.read_traces(traces, max_tokens)
    view = _load(model, text.model, parse_dtype(dtype or text.dtype))
    data = pt.collect(view, text.sequences, text.batch_size, progress=progress_bar)
    agreement = pt.routing_agreement(data, text)
    if agreement < MIN_AGREEMENT:
        raise UserError(f"recomputed routing matches the trace on only {agreement:.0%} of token-layers: the traces "
                        f"were recorded with another model or dtype; pass the right --model / --dtype")
    predictor = pt.train(view, data, options, progress=progress_bar,
                         training={"traces": [str(t) for t in traces], "routing_agreement": agreement})
    predictor.save(out)
    _report(out, predictor, json_out)


def _load(model: Path | None, named: str | None, dtype):
    import moekit.models

    path = model or (Path(named) if named else None)
    if path is None or not (path / "config.json").is_file():
        raise UserError(f"cannot find the model the traces came from ({named!r}): pass --model CHECKPOINT")
    view = moekit.models.load(path, dtype=dtype)
    view.model.eval()
    return view


def _report(out: Path, predictor, json_out: bool) -> None:
    t, s = predictor.training, predictor.spec
    held, cache = t.get("held_out", {}), t.get("held_out_cache") or {}
    _warn_if_worse_than_lfru(cache)
    row = {"out": str(out), "bytes": out.stat().st_size, "tokens": t["tokens"], "held_out_tokens": t["held_out_tokens"],
           "routing_agreement": t["routing_agreement"],
           "macs_per_token_layer": {"forecast": s.macs("reuse"), "next_layers": s.macs("route")},
           **{f"hit_rate_{cache['capacity']}_{k}": v for k, v in cache.items() if k != "capacity"},
           **{f"recall_{k}": v["recall"] for k, v in held.items()}}
    if json_out:
        print_json({**row, "held_out": held})
        return
    table = Table(title=f"predictor {out}: {s.num_layers} MoE layers x {s.num_experts} experts, width {s.width}",
                  show_header=False)
    for key, value in row.items():
        if key != "out":
            table.add_row(key.replace("_", " "), f"{value:.3f}" if isinstance(value, float) else
                          ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in value.items()) if isinstance(value, dict)
                          else str(value))
    table.caption = f"recall at top-{s.top_k} and cache hit rates on the held-out sequences"
    console.print(table)


def _warn_if_worse_than_lfru(cache: dict) -> None:
    """The held-out cache check (predictor_train.cache_check): say so when the forecasts make the cache worse."""
    if cache and cache["predictive"] < cache["lfru"]:
        err_console.print(f"[yellow]warning:[/] on the held-out sequences `predictive` with this predictor hits "
                          f"{cache['predictive']:.3f} at {cache['capacity']} top-k, LFRU without it {cache['lfru']:.3f}: "
                          f"use --policy lfru, or train on more text or with more --steps")
