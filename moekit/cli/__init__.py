"""The `moekit` command: one thin typed function per subcommand, each calling the Python API.

Bad input raises moekit.errors.UserError, printed here as one line on stderr with exit code 2 (no traceback); usage
errors (a missing option, a value out of range) are printed the same way.
Subcommands live in one module per pipeline stage and register themselves on `app`.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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


@contextmanager
def progress_bar(description: str, total: int):
    """A transient progress bar on stderr (stdout stays clean for --json); yields tick(n=1)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def binary_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


DTYPES = ("float32", "bfloat16", "float16")


def parse_dtype(name: str | None):
    """--dtype NAME -> torch dtype (None: the checkpoint's own)."""
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def main(argv: list[str] | None = None) -> None:
    # registers the subcommands, listed in --help in pipeline order
    from moekit.cli import info  # noqa: F401
    from moekit.cli import trace  # noqa: F401
    from moekit.cli import analyze, ablate  # noqa: F401
    from moekit.cli import eval, prune, merge, quantize  # noqa: F401,A004
    from moekit.cli import run, serve, simulate  # noqa: F401
    from moekit.cli import experts  # noqa: F401
    from moekit.cli import place  # noqa: F401
    from moekit.cli import predictor  # noqa: F401

    try:
        code = app(args=argv, prog_name="moekit", standalone_mode=False)  # errors come back here, not printed
    except typer.TyperException as err:  # click's (typer bundles it): a missing option, a value out of range, ...
        if type(err).__name__ == "NoArgsIsHelpError":  # `moekit` alone: the help, as before
            typer.echo(err.ctx.get_help())
            sys.exit(0)
        if not hasattr(err, "format_message"):
            raise
        ctx = getattr(err, "ctx", None)
        _fail(f"{err.format_message()} (see `{ctx.command_path if ctx is not None else 'moekit'} --help`)")
    except (KeyboardInterrupt, typer.Abort) as err:
        if isinstance(err.__cause__, EOFError):  # click turns an EOFError escaping a reader into Abort: a bug, not ^C
            raise err.__cause__
        err_console.print("interrupted")
        sys.exit(130)
    except UserError as err:
        _fail(str(err))
    except Exception as err:  # a full disk in a write no writer wrapped (moekit.files.disk_errors wraps moekit's own)
        from moekit.files import write_failure

        full = write_failure(getattr(err, "filename", None) or "a file", err, full_only=True)
        if full is None:
            raise
        _fail(str(full))
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    """Bad input: one line on stderr, exit code 2 (what scripts and the tests rely on)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # [x] stays [x]
    sys.exit(2)
