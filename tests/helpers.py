"""Helpers shared by the test modules."""

from __future__ import annotations

import pytest
import torch

from moekit.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `moekit ARGS` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def token_ids(model, n: int = 2, s: int = 16, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids [n, s] within the model's vocabulary."""
    return torch.randint(0, model.config.vocab_size, (n, s), generator=torch.Generator().manual_seed(seed))
