"""The runtime flags are defined once (moekit/cli/runtime_flags.py) and reach every command that opens a model."""

from __future__ import annotations

import dataclasses
import inspect

import typer.main

import moekit.cli
from moekit.cli.runtime_flags import FLAGS
from moekit.runtime import RuntimeOptions


def test_every_runtime_option_has_its_flag_with_the_same_default():
    fields = {f.name: f.default for f in dataclasses.fields(RuntimeOptions)}
    assert set(FLAGS) == set(fields)
    for name, (_, option) in FLAGS.items():
        assert option.default == fields[name], name


def test_run_and_serve_take_every_runtime_flag():
    from moekit.cli import run, serve  # noqa: F401  (registers them)

    group = typer.main.get_command(moekit.cli.app)
    for command in ("run", "serve"):
        names = {p.name for p in group.commands[command].params}
        assert set(FLAGS) <= names, (command, set(FLAGS) - names)
        assert "runtime" not in names


def test_the_command_receives_one_checked_options_object():
    from moekit.cli import run

    assert "runtime" in inspect.signature(run.run.__wrapped__).parameters
