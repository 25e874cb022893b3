"""Calibration text -> token batches -> `Calibration` (MoE block inputs and outputs).

Shared by `moekit merge` and `moekit quantize`. Data specs are the trace stage's (`moekit.trace.data.resolve_data`): a
.txt / .jsonl file or a demo-corpus domain name; windows never cross a document.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moekit.compress.calib import Calibration, collect
from moekit.errors import at_least
from moekit.models.view import MoEView


def calib_windows(tokenizer, sources, *, seq_len: int, max_tokens: int) -> dict[str, list[np.ndarray]]:
    """Resolved data sources -> calibration windows per domain; every source gets an equal share of max_tokens, so
    `--calib code,prose` really mixes both."""
    from moekit.compress.evaluate import domain_windows
    from moekit.trace.data import encoder

    return domain_windows(sources, encoder(tokenizer), seq_len, -(-max_tokens // len(sources)))


def token_batches(tokenizer, specs: Sequence[str], *, seq_len: int = 256, max_tokens: int = 8192) -> list[torch.Tensor]:
    """Data specs -> token-id batches [B, S] of equal-length calibration windows (see calib_windows)."""
    from moekit.compress.evaluate import batches
    from moekit.trace.data import resolve_data

    at_least("--calib-tokens", max_tokens)
    windows = calib_windows(tokenizer, resolve_data(specs), seq_len=seq_len, max_tokens=max_tokens)
    return list(batches([w for ws in windows.values() for w in ws]))


def calibrate(view: MoEView, batches: list[torch.Tensor], *, progress=None) -> Calibration:
    """Run the model over the batches, keeping every MoE block's input and output; `progress(n_tokens)` after each."""

    def stream():
        for b in batches:
            yield b
            if progress is not None:
                progress(b.numel())

    return collect(view, stream(), max_tokens=sum(b.numel() for b in batches))
