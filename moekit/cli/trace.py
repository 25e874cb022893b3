"""`moekit trace MODEL --data ... --out DIR` and `moekit trace-import-sglang DUMP --out DIR`: routing traces."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from moekit.cli import app, console, parse_dtype, print_json
from moekit.cli.experts import CALIB_HELP, ROUTING_HELP, STEER_HELP


@app.command()
def trace(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder of an MoE causal LM (with its tokenizer)"),
    data: list[str] = typer.Option(..., "--data", help="a .txt file (documents separated by a <|endoftext|> line), "
                                   "a .jsonl file with `text` (+ `domain`/`label`), or demo-corpus domains: code,prose"),
    out: Path = typer.Option(..., "--out", help="trace folder to write"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="stop after this many tokens, split equally across the data sources"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per sequence (non-overlapping windows of a document)"),
    batch_size: int = typer.Option(8, "--batch-size", help="sequences per forward pass"),
    chunk_tokens: int = typer.Option(65536, "--chunk-tokens", help="tokens per Parquet chunk (memory stays flat)"),
    logits: bool = typer.Option(False, "--logits", help="also store the full router logits (float16)"),
    activation_stats: bool = typer.Option(False, "--activation-stats",
                                          help="per layer x expert max |in| and max |out| of the down projection"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted trace in --out"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: checkpoint's)"),
    routing: Optional[str] = typer.Option(None, "--routing", help=ROUTING_HELP + "; the trace records its choice"),
    steer: Optional[Path] = typer.Option(None, "--steer", help=STEER_HELP),
    calib: Optional[list[str]] = typer.Option(None, "--calib", help=CALIB_HELP),
    json_out: bool = typer.Option(False, "--json", help="print the final summary as one JSON line"),
) -> None:
    """Record which experts every token is routed to, per MoE layer, into versioned Parquet chunks."""
    from moekit.routing import parse
    from moekit.routing.calibrate import batch_routing
    from moekit.trace import TraceOptions, record

    options = TraceOptions(seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, chunk_tokens=chunk_tokens,
                           logits=logits, activation_stats=activation_stats)
    torch_dtype = parse_dtype(dtype)
    policy = batch_routing(parse(routing, steer))  # a bad spec fails before the weights are read
    with _progress(enabled=console.is_terminal and not json_out, total=max_tokens) as advance:
        manifest = record(model, data, out, options=options, resume=resume, dtype=torch_dtype, on_tokens=advance,
                          routing=policy, calib=calib or None)
    _report(summary(out, manifest), json_out)


@app.command("trace-import-sglang")
def trace_import_sglang(
    dump: Path = typer.Argument(..., help="expert_distribution_recorder_*.pt written by SGLang (per_token or stat)"),
    out: Path = typer.Option(..., "--out", help="trace folder to write"),
    domain: str = typer.Option("sglang", "--domain", help="domain label of the imported tokens"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="stat dumps: the model's top-k, to count tokens"),
    json_out: bool = typer.Option(False, "--json", help="print the final summary as one JSON line"),
) -> None:
    """Convert an SGLang expert-distribution dump into a moekit trace."""
    from moekit.trace.sglang import import_sglang

    _report(summary(out, import_sglang(dump, out, domain=domain, top_k=top_k)), json_out)


@app.command("trace-info")
def trace_info(
    folder: Path = typer.Argument(..., help="a trace folder"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Check a trace folder (manifest, every chunk's schema and every page's checksum) and summarise it."""
    import moekit.trace

    t = moekit.trace.open(folder)
    t.verify()
    _report({**summary(folder, t.manifest), "model": t.manifest["model"], "domains": ",".join(t.domain_names)},
            json_out)


def summary(out: Path, manifest: dict) -> dict:
    files = [out / c["file"] for c in manifest["chunks"]] or list(out.glob("*.parquet"))
    size = sum(f.stat().st_size for f in files if f.exists())
    selections = (manifest["tokens"] or 0) * len(manifest["layers"]) * (manifest["top_k"] or 0)
    return {
        "out": str(out), "kind": manifest["kind"], "completed": manifest["completed"], "tokens": manifest["tokens"],
        "sequences": manifest["sequences"], "chunks": len(manifest["chunks"]), "layers": len(manifest["layers"]),
        "top_k": manifest["top_k"], "num_experts": manifest["num_experts"], "bytes": size,
        "bytes_per_selected_expert": round(size / selections, 3) if selections else None,
        **({"routing": manifest["routing"]["spec"]} if manifest.get("routing") else {}),
    }


def _report(s: dict, json_out: bool) -> None:
    if json_out:
        print_json(s)
        return
    table = Table(title=f"trace {s['out']}", show_header=False)
    for key, value in s.items():
        if key != "out":
            table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) and value > 9999 else str(value))
    console.print(table)


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} tokens/s" if task.speed else "- tokens/s")


class _progress:
    """A rich progress bar fed with token counts, drawn from the first tokens on (so nothing is drawn while the
    arguments and the checkpoint are checked); a no-op when disabled (not a TTY, or --json)."""

    def __init__(self, enabled: bool, total: int | None):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        return self.advance if self.enabled else None

    def advance(self, n: int) -> None:
        if self.bar is None:
            self.bar = Progress(TextColumn("tracing"), BarColumn(), TextColumn("{task.completed:,} tokens"), _Rate(),
                                TimeElapsedColumn(), console=console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("trace", total=self.total)
        self.bar.advance(self.task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
