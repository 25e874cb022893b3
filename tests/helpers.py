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


RTOL = 1e-6  # of the largest |expected|: float32 reference paths land within 2e-7 of it (tests/models/test_families.py)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """max |actual - expected| <= rtol x max |expected|: a bound relative to the output's own scale (tiny random models'
    outputs range from 1e-4 to 2, so no absolute tolerance fits them all), reporting max and mean difference."""
    diff, scale = (actual - expected).abs(), expected.abs().max()
    assert scale > 0, f"{what}: the expected output is all zero, nothing to compare"
    assert diff.max() <= rtol * scale, (f"{what}: max diff {diff.max():.3g} = {diff.max() / scale:.3g} x max "
                                        f"|expected| {scale:.3g}, mean diff {diff.mean():.3g} (rtol {rtol})")
