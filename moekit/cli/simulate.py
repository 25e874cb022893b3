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
    if (view.num_experts, view.top_k, len(view.layers)) != (trace.num_experts, trace.top_k, len(trace.layers)):
        raise UserError(f"{candidate} has {len(view.layers)} MoE layers x {view.num_experts} experts top-{view.top_k}, "
                        f"the trace {len(trace.layers)} x {trace.num_experts} top-{trace.top_k}: it is not the trace's "
                        f"model; to see this routing at that model's size, pass --replay-on {candidate}")
    return view.bytes_per_expert(), view.layers[0].expert_numel()


@app.command()
def simulate(
    trace_dir: Path = typer.Argument(..., metavar="TRACE", help="trace folder written by `moekit trace`"),
    policy: str = typer.Option("lru,lfu,lfru,score,belady", "--policy", help="comma-separated cache policies"),
    capacity: str = typer.Option("1x,2x,4x", "--capacity", help="experts per layer, as multiples of top-k"),
    hardware: str = typer.Option("nvme-cpu", "--hardware", help="pcie4-gpu, pcie5-gpu, nvme-cpu, ddr5-cpu or a YAML"),
    model: Path = typer.Option(None, "--model", help="checkpoint of the trace (expert size), if not in the manifest"),
    replay_on: Path = typer.Option(None, "--replay-on", metavar="TARGET",
                                   help="what-if at another size: replay the trace on TARGET's experts, top-k, MoE "
                                        "layers and expert bytes (the replay=TRACE mapping, docs/routing.md); TARGET "
                                        "is a checkpoint or a folder with only config.json (no weights are read)"),
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
    if replay_on is not None:
        shape, ids, weights, (nbytes, nparams) = replayed(trace, replay_on, n, "score" in names)
    else:
        shape = {"num_experts": trace.num_experts, "top_k": trace.top_k, "layers": len(trace.layers)}
        ids = [np.asarray(trace.ids(li))[n].astype(np.int64) for li in trace.layers]
        weights = [trace.weights(li)[n] for li in trace.layers] if "score" in names else None
        nbytes, nparams = expert_size(trace, model)
    if not ids or ids[0].shape[0] == 0:
        raise UserError(f"{trace_dir} holds no traced tokens to replay: record some with `moekit trace`")
    if weights is not None and any(np.isnan(w).any() for w in weights):
        weights = None  # SGLang traces: uniform scores
    results = run_sim(ids, num_experts=shape["num_experts"], top_k=shape["top_k"], expert_bytes=nbytes,
                      policies_=names, capacities=caps, weights_per_layer=weights)
    rows = with_bounds(results, hw, layers=shape["layers"], top_k=shape["top_k"], expert_params=nparams)
    replay = ({"replay_on": str(replay_on), "trace_shape": {"num_experts": trace.num_experts, "top_k": trace.top_k,
                                                            "layers": len(trace.layers)}, "model_shape": shape}
              if replay_on is not None else {})
    if json_out:
        print_json({"trace": str(trace_dir), "tokens": int(ids[0].shape[0]), "hardware": hw.as_dict(),
                    "convention": "continuous stream, cold misses are misses", **replay, "rows": rows})
        return
    if replay_on is not None:
        console.print(f"replayed on {replay_on}: {len(trace.layers)} layers x {trace.num_experts} experts top-"
                      f"{trace.top_k} -> {shape['layers']} x {shape['num_experts']} top-{shape['top_k']} "
                      f"(replay mapping, docs/routing.md)")
    console.print(results_table(rows, hw, int(ids[0].shape[0])))


def replayed(trace, target: Path, n: slice, with_weights: bool):
    """The trace's routing mapped onto TARGET's shape (moekit.routing.replay): (shape, ids per layer, weights per layer
    or None, (expert bytes, expert parameters)), from TARGET's config alone."""
    import moekit.models
    from moekit.routing.replay import map_weights, mapped_layers

    view = moekit.models.load(target, meta=True)  # a bad TARGET: one line, before the trace's ids are read
    mapped = mapped_layers(trace, view, f"--replay-on {target}", rows=n)
    ids = [m for _, _, m in mapped]
    weights = None
    if with_weights:
        weights = [map_weights(trace.ids(src)[n], trace.weights(src)[n], m, trace.num_experts, view.num_experts)
                   for _, src, m in mapped]
    shape = {"num_experts": view.num_experts, "top_k": view.top_k, "layers": len(view.layers)}
    return shape, ids, weights, (view.bytes_per_expert(), view.layers[0].expert_numel())


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
