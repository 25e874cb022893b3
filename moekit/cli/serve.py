"""`moekit serve MODEL [--budget 8GB] [--port 8000]`: an OpenAI-compatible server on the offloaded runtime."""

from __future__ import annotations

from pathlib import Path

import typer

from moekit.cli import app, err_console
from moekit.cli.runtime_flags import runtime_options


@app.command()
@runtime_options
def serve(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder of an MoE causal LM"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (this machine only by default)"),
    port: int = typer.Option(8000, "--port", help="port to listen on (0: a free one, printed at start)"),
    served_name: str = typer.Option(None, "--served-name", help="model name clients use (default: the folder name)"),
    api_key: str = typer.Option(None, "--api-key", envvar="MOEKIT_API_KEY",
                                help="require Authorization: Bearer KEY on the API routes (/health and /metrics "
                                     "stay open); needed to bind a non-loopback --host"),
    allow_no_api_key: bool = typer.Option(False, "--allow-no-api-key",
                                          help="bind a non-loopback --host without an API key anyway"),
    max_batch: int = typer.Option(16, "--max-batch", help="sequences decoded together in one step"),
    max_queue: int = typer.Option(64, "--max-queue", help="sequences waiting; past it requests get 503 + Retry-After"),
    max_kv_tokens: int = typer.Option(65536, "--max-kv-tokens",
                                      help="KV-cache bound: tokens (prompt + max_tokens) reserved by the running "
                                           "sequences together"),
    max_step_tokens: int = typer.Option(512, "--max-step-tokens",
                                        help="tokens in one forward (chunked prefill: long prompts in chunks)"),
    max_model_len: int = typer.Option(None, "--max-model-len", help="context length (default: the model's)"),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="largest request body (413 past it)"),
    runtime=None,
) -> None:
    """Serve MODEL over OpenAI's API (completions, chat, streaming) with continuous batching over its experts."""
    from moekit.serve.app import Limits
    from moekit.serve.scheduler import EngineConfig
    from moekit.serve.server import ServeOptions, serve as run_server

    options = ServeOptions(host=host, port=port, served_name=served_name, api_key=api_key,
                           allow_no_api_key=allow_no_api_key, max_model_len=max_model_len,
                           engine=EngineConfig(max_batch=max_batch, max_queue=max_queue, max_kv_tokens=max_kv_tokens,
                                               max_step_tokens=max_step_tokens),
                           limits=Limits(max_body_bytes=max_body_bytes))
    run_server(model, runtime, options, announce=lambda line: err_console.print(line, highlight=False, soft_wrap=True))
