"""Calibration text -> token batches -> `Calibration` (MoE block inputs and outputs), with a progress bar.

Shared by `moekit merge` and `moekit quantize`. Data specs are the trace stage's (`moekit.trace.data.resolve_data`): a
.txt / .jsonl file or a demo-corpus domain name; windows never cross a document.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from moekit.compress.calib import Calibration, collect
from moekit.errors import UserError
from moekit.models.view import MoEView


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]}") from None


def token_batches(tokenizer, specs: Sequence[str], *, seq_len: int = 256, max_tokens: int = 8192) -> list[torch.Tensor]:
    """Data specs -> token-id batches [1, S] (S <= seq_len), max_tokens in all."""
    from moekit.trace.data import encoder, resolve_data, sequences

    seqs = sequences(resolve_data(specs), encoder(tokenizer), seq_len, max_tokens)
    batches = [torch.as_tensor(s.token_ids, dtype=torch.long)[None] for s in seqs]  # each [1, S]
    if not batches:
        raise UserError(f"calibration data {', '.join(specs)} holds no tokens")
    return batches


def calibrate(view: MoEView, batches: list[torch.Tensor], *, label: str = "calibration") -> Calibration:
    """Run the model over the batches under a progress bar, keeping every MoE block's input and output."""
    from rich.progress import Progress

    total = sum(b.numel() for b in batches)
    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=total)

        def stream():
            for b in batches:
                yield b
                progress.advance(task, b.numel())

        return collect(view, stream(), max_tokens=total)
