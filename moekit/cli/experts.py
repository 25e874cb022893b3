"""`moekit experts find --contrast TRACE_A TRACE_B --out FILE`: a steering file for `--steer FILE`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moekit.cli import app, console, print_json
from moekit.errors import UserError

experts_app = typer.Typer(help="Find experts to steer from routing traces.", no_args_is_help=True)
app.add_typer(experts_app, name="experts")

ROUTING_HELP = ("routing policy: topk=K, top-p=P[,renorm], skip=BETA|auto, rank=R, mask=L:E,..., force=L:E,..., "
                "steer=LAMBDA@L:E,..., scale=BETA@L:E,..., replay=TRACE, c3po=REF; join with '+' (docs/routing.md)")
STEER_HELP = "steering file written by `moekit experts find` (forced, masked, steered or scaled experts)"
CALIB_HELP = "calibration data for skip=auto (default: the demo corpus, every domain)"


def layer_range(text: str | None) -> list[int] | None:
    """--layers a-b (or a single layer) -> [a, ..., b]."""
    if text is None:
        return None
    a, dash, b = text.partition("-")
    try:
        lo, hi = int(a), int(b) if dash else int(a)
    except ValueError:
        raise UserError(f"--layers {text!r}: write a decoder-layer range such as 1-3") from None
    if lo > hi:
        raise UserError(f"--layers {text!r}: the range is empty")
    return list(range(lo, hi + 1))


@experts_app.command("find")
def find(
    contrast: list[Path] = typer.Option(..., "--contrast", help="two traces: A (promote) and B (the rest)"),
    method: str = typer.Option("risk-diff", "--method", help="risk-diff (SteerMoE) | frequency (MoTE) | npmi (RICE)"),
    layers: str = typer.Option(None, "--layers", help="decoder-layer range, e.g. 1-2 (default: every MoE layer)"),
    top: int = typer.Option(10, "--top", help="(layer, expert) pairs to keep, largest score first"),
    action: str = typer.Option(None, "--action", help="force | mask | steer | scale (default: the method's)"),
    strength: float = typer.Option(None, "--strength", help="lambda of steer, beta of scale (default: the method's)"),
    tokens: str = typer.Option(None, "--tokens",
                               help="npmi: token ids of A to contrast (RICE's <think>), comma-separated"),
    out: Path = typer.Option(..., "--out", help="steering file to write (JSON)"),
    json_out: bool = typer.Option(False, "--json", help="print the entries as one JSON object"),
) -> None:
    """Rank (layer, expert) pairs by how much more trace A selects them than trace B; write the top ones."""
    import moekit.trace
    from moekit.files import check_out_file
    from moekit.routing import find as finder
    from moekit.routing.spec import write_steering

    check_out_file(out)  # before the traces are read
    if len(contrast) != 2:
        raise UserError(f"--contrast takes two traces (--contrast A --contrast B), got {len(contrast)}")
    token_ids = None
    if tokens:
        try:
            token_ids = [int(t) for t in tokens.split(",")]
        except ValueError:
            raise UserError(f"--tokens {tokens!r}: comma-separated token ids") from None
    a, b = moekit.trace.open(contrast[0]), moekit.trace.open(contrast[1])
    entries = finder.find(a, b, method, layer_range(layers), top, action, strength, token_ids)
    meta = {"method": method, "trace_a": str(contrast[0]), "trace_b": str(contrast[1]), "model": a.manifest["model"],
            "layers": layers}
    write_steering(out, entries, meta)
    if json_out:
        print_json({"out": str(out), **meta, "experts": entries})
        return
    table = Table(title=f"{out}: {method}, {contrast[0]} vs {contrast[1]}")
    for col in ("layer", "expert", "action", "strength", "score"):
        table.add_column(col, justify="right")
    for e in entries:
        table.add_row(str(e["layer"]), str(e["expert"]), e["action"], f"{e['strength']:g}", f"{e['score']:.4f}")
    console.print(table)

