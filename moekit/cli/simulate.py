"""`moekit simulate TRACE`: replay a routing trace through the runtime's cache policies; hit rates, bytes per token and
the tokens/s bound on a hardware profile, Belady as the ceiling."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moekit.cli import app, console, print_json
from moekit.errors import UserError, at_least


def parse_capacities(text: str) -> list[float]:
    """'1x,2x,4x' -> [1.0, 2.0, 4.0] (multiples of top-k per layer)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower().removesuffix("x")
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"cannot read capacity {part!r}: give multiples of top-k like 1x,2x,4x") from None
        if not 0 < value < float("inf"):
            raise UserError(f"capacity must be a multiple > 0 such as 2x, got {part!r}")
        out.append(value)
    return out


def expert_size(trace, model: Path | None) -> tuple[int, int]:
    """(bytes, parameters) of one routed expert, from --model or the model the trace names."""
    import moekit.models

    candidate = model or (Path(trace.manifest["model"]) if trace.manifest.get("model") else None)
    if model is None and (candidate is None or not (candidate / "config.json").is_file()):
        raise UserError("cannot tell the size of an expert: pass --model MODEL (the checkpoint the trace came from)")
    view = moekit.models.load(candidate, meta=True)  # an explicit --model is checked like any checkpoint
    return view.bytes_per_expert(), view.layers[0].expert_numel()


@app.command()
def simulate(
    trace_dir: Path = typer.Argument(..., metavar="TRACE", help="trace folder written by `moekit trace`"),
    policy: str = typer.Option("lru,lfu,lfru,score,belady", "--policy",
                               help="comma-separated cache policies (predictive: on a trace recorded with --predictor)"),
    capacity: str = typer.Option("1x,2x,4x", "--capacity", help="experts per layer, as multiples of top-k"),
    hardware: str = typer.Option("nvme-cpu", "--hardware", help="pcie4-gpu, pcie5-gpu, nvme-cpu, ddr5-cpu or a YAML"),
    model: Path = typer.Option(None, "--model", help="checkpoint of the trace (expert size), if not in the manifest"),
    max_tokens: int = typer.Option(0, "--max-tokens", help="replay only the first N tokens (0: all)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Cache what-if on a recorded trace: continuous token stream, cold misses count as misses (a running system)."""
    import numpy as np

    import moekit.trace
    from moekit.runtime.hardware import load_profile
    from moekit.runtime.policies import policy_class
    from moekit.runtime.simulate import simulate as run_sim
    from moekit.runtime.simulate import with_bounds

    at_least("--max-tokens", max_tokens, 0)
    names = [p.strip() for p in policy.split(",") if p.strip()]
    if not names:
        raise UserError("--policy names no policy: give e.g. --policy lru,lfu")
    for name in names:
        policy_class(name)  # unknown names fail before the trace is read
    caps, hw = parse_capacities(capacity), load_profile(hardware)
    trace = moekit.trace.open(trace_dir)
    n = slice(None, max_tokens or None)
    ids = [np.asarray(trace.ids(li))[n].astype(np.int64) for li in trace.layers]
    if not ids or ids[0].shape[0] == 0:
        raise UserError(f"{trace_dir} holds no traced tokens to replay: record some with `moekit trace`")
    weights = None
    if "score" in names:
        weights = [trace.weights(li)[n] for li in trace.layers]
        weights = None if any(np.isnan(w).any() for w in weights) else weights  # SGLang traces: uniform scores
    # predictive replays the forecasts `moekit trace --predictor` recorded (the reader refuses a trace without them)
    forecasts = [trace.forecasts(li)[n] for li in trace.layers] if "predictive" in names else None
    nbytes, nparams = expert_size(trace, model)
    results = run_sim(ids, num_experts=trace.num_experts, top_k=trace.top_k, expert_bytes=nbytes, policies_=names,
                      capacities=caps, weights_per_layer=weights, forecasts_per_layer=forecasts)
    rows = with_bounds(results, hw, layers=len(trace.layers), top_k=trace.top_k, expert_params=nparams)
    if json_out:
        print_json({"trace": str(trace_dir), "tokens": int(ids[0].shape[0]), "hardware": hw.as_dict(),
                    "convention": "continuous stream, cold misses are misses", "rows": rows})
        return
    console.print(results_table(rows, hw, int(ids[0].shape[0])))


def results_table(rows: list[dict], hw, tokens: int) -> Table:
    from moekit.runtime import format_bytes

    table = Table(title=f"{tokens} tokens, {hw.name}: {hw.slow_tier} {hw.slow_gbs:g} GB/s -> {hw.fast_tier}")
    for col in ("policy", "capacity", "experts/layer", "hit rate", "of Belady", "read/token", "tok/s bound", "limit"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["policy"], r["capacity"], str(r["experts_per_layer"]), f"{r['hit_rate']:.3f}",
                      f"{r['of_belady']:.2f}" if "of_belady" in r else "-", format_bytes(r["bytes_per_token"]),
                      f"{r['bound_tok_s']:.1f}", r["limited_by"])
    return table
