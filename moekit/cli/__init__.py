"""The `moekit` command: one thin typed function per subcommand, each calling the Python API.

Bad input raises moekit.errors.UserError, printed here as one line on stderr with exit code 2 (no traceback).
Subcommands live in one module per pipeline stage and register themselves on `app`.
"""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console

from moekit.errors import UserError

app = typer.Typer(
    name="moekit",
    help="Profile, shrink and run Mixture-of-Experts language models on the hardware you have.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Profile, shrink and run Mixture-of-Experts language models on the hardware you have."""


def print_json(obj) -> None:
    """Machine-readable output: one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


def main(argv: list[str] | None = None) -> None:
    # registers the subcommands, listed in --help in pipeline order
    from moekit.cli import info  # noqa: F401
    from moekit.cli import trace  # noqa: F401
    from moekit.cli import analyze, ablate  # noqa: F401
    from moekit.cli import eval, prune, merge, quantize  # noqa: F401,A004
    from moekit.cli import run, simulate  # noqa: F401

    try:
        app(args=argv, prog_name="moekit")  # standalone: click reports usage errors itself (exit 2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except UserError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
