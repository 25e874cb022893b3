"""The runtime's flags, defined once for every command that opens a model through `open_offloaded` (`run`, `serve`).

    @app.command()
    @runtime_options
    def run(model: Path = typer.Argument(...), ..., runtime: RuntimeOptions = None): ...

`runtime_options` appends the flags below to the command's signature (typer reads `__signature__`) and hands the
command one checked `RuntimeOptions` built from them (its `__post_init__` runs the cheap checks before any weight is
read). A new runtime option is one RuntimeOptions field plus one entry in FLAGS; tests/cli/test_runtime_flags.py
checks that every field has its flag and that both commands take them all.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import typer

from moekit.cli.experts import ROUTING_HELP, STEER_HELP

# RuntimeOptions field -> (type, typer.Option): the flag's default is the field's default
FLAGS: dict[str, tuple[type, typer.models.OptionInfo]] = {
    "budget": (str, typer.Option("512MB", "--budget",
                                 help="bytes of routed experts kept in memory, e.g. 512MB, 2GiB; all: every expert")),
    "policy": (str, typer.Option("lru", "--policy", help="expert cache policy: lru, lfu, lfru, score")),
    "prefetch": (bool, typer.Option(None, "--prefetch/--no-prefetch",
                                    help="pre-gating prefetch of the next layer (default: on with a GPU; off on the "
                                         "CPU, where speculative reads slowed decoding in every measurement: "
                                         "docs/runtime.md)")),
    "store": (Path, typer.Option(None, "--store", help="expert store folder (default: a cache dir, built on first run)")),
    "device": (str, typer.Option(None, "--device", help="tier the cached experts live on: cpu or cuda "
                                                          "(default: cuda when torch sees a GPU)")),
    "fiddler": (bool, typer.Option(False, "--fiddler",
                                   help="GPU only: compute misses on the CPU when that is faster")),
    "io_threads": (int, typer.Option(4, "--io-threads", min=1, help="threads reading experts from the store")),
    "threads": (int, typer.Option(None, "--threads", min=1,
                                  help="torch compute threads (default: all cores but one, which the reads need: "
                                       "with every core computing, OpenMP barriers stall behind the I/O threads)")),
    "lowbit": (int, typer.Option(None, "--lowbit", help="HOBBIT: read low-weight misses as BITS-bit copies (2, 3, 4, "
                                                        "8; changes the output; copies built once next to the store)")),
    "lowbit_threshold": (float, typer.Option(0.1, "--lowbit-threshold", min=0.0,
                                             help="routing weight below which a miss uses its low-bit copy")),
    "eam_trace": (Path, typer.Option(None, "--eam-trace",
                                     help="MoE-Infinity: prefetch the experts of the request in this trace (recorded "
                                          "with this model) whose activation matrix best matches, instead of "
                                          "pre-gating")),
    "routing": (str, typer.Option(None, "--routing", help=ROUTING_HELP)),
    "steer": (Path, typer.Option(None, "--steer", help=STEER_HELP)),
    "page_cache": (bool, typer.Option(True, "--page-cache/--no-page-cache",
                                      help="read experts through the OS page cache, so RAM beyond --budget keeps "
                                           "experts for free (default); --no-page-cache reads with O_DIRECT (for a "
                                           "memory-capped container, where page cache counts against the limit)")),
}


def runtime_options(command):
    """Give `command` the runtime flags; it receives them as one RuntimeOptions in its `runtime` parameter."""
    sig = inspect.signature(command, eval_str=True)
    own = [p for name, p in sig.parameters.items() if name != "runtime"]
    added = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=typ)
             for name, (typ, option) in FLAGS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs):
        from moekit.runtime import RuntimeOptions

        runtime = RuntimeOptions(**{name: kwargs.pop(name) for name in FLAGS})
        return command(**kwargs, runtime=runtime)

    wrapper.__signature__ = sig.replace(parameters=[*own, *added])
    wrapper.__annotations__ = {**{p.name: p.annotation for p in own}, **{n: t for n, (t, _) in FLAGS.items()}}
    return wrapper
