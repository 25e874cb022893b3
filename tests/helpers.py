"""Helpers shared by the test modules."""

from __future__ import annotations

import pytest

from moekit.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `moekit ARGS` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err
