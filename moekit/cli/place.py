"""`moekit place TRACE --gpus G --out DIR` and `moekit place-eval PLAN --trace HELDOUT`: expert-parallel placement."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moekit.cli import app, console, err_console, print_json

ROWS = (("vLLM balancedness", "vllm_balancedness", 4), ("SGLang balancedness", "sglang_balancedness", 4),
        ("max / mean GPU load", "max_over_mean", 4), ("cross-GPU transitions", "cross_gpu_transitions", 4),
        ("  of which cross-node", "cross_node_fraction", 4), ("dispatch GPUs / token / layer",
                                                              "dispatch_gpus_per_token_layer", 3),
        ("dispatch bytes / token", "dispatch_bytes_per_token", 0), ("nodes / token / layer", "nodes_per_token", 3),
        ("est. MoE step (ms)", "moe_step_ms", 4))


@app.command()
def place(
    trace: Path = typer.Argument(..., help="trace folder (moekit trace / trace-import-sglang) or an SGLang stat dump "
                                 "(expert_distribution_recorder_*.pt)"),
    gpus: int = typer.Option(..., "--gpus", help="expert-parallel ranks G"),
    out: Path = typer.Option(..., "--out", help="output folder (must not exist or be empty)"),
    nodes: int = typer.Option(1, "--nodes", help="nodes N (G / N GPUs each)"),
    redundant: int = typer.Option(0, "--redundant", help="redundant expert slots per layer R ((E + R) % G == 0)"),
    method: str = typer.Option("eplb", "--method", help="eplb | exflow | balanced-affinity"),
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint folder for router groups, hidden size and "
                                         "layer count (default: --checkpoint, else the traced model)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="also write DIR/checkpoint: this model with "
                                              "experts permuted so that the engines' default placement is the plan"),
    time_limit: float = typer.Option(60.0, "--time-limit", help="seconds for the affinity search (MILPs included)"),
    seed: int = typer.Option(0, "--seed", help="seed of the search's random starts"),
    balance_slack: float = typer.Option(0.0, "--balance-slack", help="balanced-affinity: per-layer max GPU load "
                                        "may exceed EPLB's by this fraction"),
    align_groups: bool = typer.Option(False, "--align-groups", help="eplb: keep router groups whole on GPUs (needed "
                                      "by --checkpoint on grouped routers)"),
    json_out: bool = typer.Option(False, "--json", help="print plan.json as one JSON object"),
) -> None:
    """Plan where each expert lives on G GPUs; write sglang.json, eplb.safetensors and plan.json."""
    from moekit.placement import Cluster, PlanOptions
    from moekit.placement import place as run
    from moekit.placement.api import check_place

    opts = PlanOptions(time_limit=time_limit, seed=seed, balance_slack=balance_slack, align_groups=align_groups)
    cluster = Cluster(gpus, nodes, redundant)
    inputs = check_place(trace, out, cluster, method, model=model, checkpoint=checkpoint)  # before the spinner
    t0 = time.monotonic()
    with err_console.status(f"planning ({method})") as status:
        rep = run(trace, out, cluster, method, model=model, checkpoint=checkpoint, options=opts, inputs=inputs,
                  progress=lambda msg: status.update(f"planning ({method}, {time.monotonic() - t0:.0f} s): {msg}"))
    if json_out:
        print_json(rep)
        return
    fit = rep["metrics_on_fit_trace"]
    console.print(_table(f"{method} on {gpus} GPUs ({nodes} node{'s' if nodes > 1 else ''}, {redundant} redundant)",
                         [("plan", fit["plan"]), ("default", fit["default"])]))
    console.print(f"solver: {rep['solver']}", highlight=False)
    extra = ", checkpoint/" if rep["checkpoint"] else ""
    console.print(f"wrote {out}: sglang.json, eplb.safetensors, plan.json{extra} (metrics on the fit trace; score a "
                  f"held-out trace with `moekit place-eval {out} --trace HELDOUT`)")


@app.command("place-eval")
def place_eval(
    plan: Path = typer.Argument(..., help="a `moekit place` output folder, or an SGLang map JSON (with --gpus)"),
    trace: Path = typer.Option(..., "--trace", help="trace folder to score on (ideally not the one it was fitted on)"),
    hardware: str = typer.Option("dgx-h100", "--hardware", help="profile for the step-time estimate: dgx-a100, "
                                 "dgx-h100 or a YAML file with intra_node_gbs / inter_node_gbs"),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="tokens per step over all GPUs "
                                               "(default 128 per GPU)"),
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint folder for hidden size and expert size "
                                         "(default: what the plan recorded)"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="EP size of an SGLang map JSON"),
    nodes: int = typer.Option(1, "--nodes", help="nodes of an SGLang map JSON"),
    json_out: bool = typer.Option(False, "--json", help="print every metric as one JSON object"),
) -> None:
    """Score a placement and the engines' default one: balancedness, transitions, dispatch, nodes, step time."""
    from moekit.analysis.run import to_json
    from moekit.placement import place_eval as run
    from moekit.placement.api import check_place_eval

    inputs = check_place_eval(plan, trace, hardware=hardware, batch_tokens=batch_tokens, model=model, gpus=gpus,
                              nodes=nodes)  # every check before the spinner
    with err_console.status("scoring"):
        res = run(plan, trace, batch_tokens=batch_tokens, inputs=inputs)
    if json_out:
        print_json(to_json(res))
        return
    console.print(_table(f"{res['plan']['method']} vs default on {res['tokens']} tokens of {trace}",
                         [("plan", res["plan"]), ("default", res["default"])]))
    if res["batch_tokens"]:
        console.print(f"step time: {res['batch_tokens']} tokens per step on {res['hardware']['name']} "
                      f"(compute + network model, no overlap; see docs/placement.md)")


def _table(title: str, columns: list[tuple[str, dict]]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for name, _ in columns:
        table.add_column(name, justify="right")
    for label, key, digits in ROWS:
        if any(col.get(key) is not None for _, col in columns):
            table.add_row(label, *(_f(col.get(key), digits) for _, col in columns))
    return table


def _f(x, digits: int) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"
