"""Held-out evaluation of a checkpoint: perplexity and next-token accuracy per domain.

The protocol of docs/conventions.md §Evaluation protocol on the demo model: each domain's held-out documents are cut
into non-overlapping windows (moekit.trace.data.sequences: a window never crosses a document; the eos token ends each
document, as in training); within a window every position after the first predicts the next token. Per domain:
  perplexity = exp(mean NLL over every predicted token of every window), accuracy = share of argmax hits.
"overall" pools the tokens of all domains (so bigger domains weigh more); "macro" averages the domains' mean NLL.

Dimension legend: B windows in a batch, S window length, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import UserError, at_least
from moekit.models.validate import open_checkpoint

DEFAULT_SEQ_LEN = 256
DEFAULT_MAX_TOKENS = 16384  # per domain: ~45 s for the 8 demo domains on 2 CPU cores (benchmarks/compression.py)
DEFAULT_BATCH = 16

# ---------------------------------------------------------------- loading (one entry point, extensible)

Loader = Callable[[Path, "torch.dtype | None"], "tuple[nn.Module, object] | None"]
_LOADERS: list[Loader] = []


def register_loader(loader: Loader) -> Loader:
    """Register a checkpoint loader tried before the default one (e.g. quantised checkpoints): it returns
    (model, tokenizer) for folders it recognises and None for the rest."""
    _LOADERS.insert(0, loader)
    return loader


def load_for_eval(path: Path, dtype: torch.dtype | None = torch.float32) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) for any checkpoint moekit writes; registered loaders first."""
    path = Path(path)
    for loader in _LOADERS:
        loaded = loader(path, dtype)
        if loaded is not None:
            return loaded
    return _load_hf(path, dtype)


def _load_hf(path: Path, dtype) -> tuple[nn.Module, object]:
    import moekit.models

    checked = open_checkpoint(path, tokenizer=True)  # every check before the weights are read
    checked.view.require("eval", causal=True)
    view = moekit.models.load(path, dtype=dtype)  # eager experts: the fastest on CPU at these batch sizes
    # a wrapper scores text through its language model (Llama 4's own forward cannot take text alone)
    return moekit.models.language_model(view.model).eval(), checked.tokenizer


# ---------------------------------------------------------------- data


def domain_windows(sources, encode: Callable[[str], list[int]], seq_len: int,
                   max_tokens: int | None) -> dict[str, list[np.ndarray]]:
    """Non-overlapping windows grouped by domain, at most max_tokens tokens per source (so every domain of a
    multi-file --data gets its share; a JSONL source mixing domains shares one budget). Windows of one token predict
    nothing and are dropped."""
    from moekit.trace.data import sequences

    out: dict[str, list[np.ndarray]] = {}
    for source in sources:
        for seq in sequences([source], encode, seq_len, max_tokens):
            if len(seq.token_ids) >= 2:
                out.setdefault(seq.domain, []).append(seq.token_ids)
    if not out:
        raise UserError("the data holds no window of 2 or more tokens to evaluate on")
    return out


def batches(windows: Iterable[np.ndarray], batch_size: int = DEFAULT_BATCH) -> Iterator[torch.Tensor]:
    """Windows -> [B, S] int64 batches of equal-length windows (no padding, so no attention mask is needed)."""
    by_len: dict[int, list[np.ndarray]] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    for length in sorted(by_len, reverse=True):
        group = by_len[length]
        for i in range(0, len(group), batch_size):
            yield torch.from_numpy(np.stack(group[i:i + batch_size]).astype(np.int64))  # [B, S]


# ---------------------------------------------------------------- scoring


@dataclass
class DomainScore:
    tokens: int = 0  # predicted tokens
    nll: float = 0.0  # summed negative log-likelihood (nats)
    correct: int = 0  # argmax == next token
    windows: int = 0

    def add(self, other: DomainScore) -> None:
        self.tokens += other.tokens
        self.nll += other.nll
        self.correct += other.correct
        self.windows += other.windows

    def row(self) -> dict:
        mean = self.nll / max(self.tokens, 1)
        return {"tokens": self.tokens, "windows": self.windows, "nll": mean, "perplexity": math.exp(mean),
                "accuracy": self.correct / max(self.tokens, 1)}


@dataclass
class EvalResult:
    domains: dict[str, DomainScore] = field(default_factory=dict)

    def to_dict(self) -> dict:
        overall = DomainScore()
        for score in self.domains.values():
            overall.add(score)
        rows = {d: s.row() for d, s in self.domains.items()}
        macro = sum(r["nll"] for r in rows.values()) / len(rows)
        return {"domains": rows, "overall": overall.row(), "macro_perplexity": math.exp(macro)}


def score_batch(model: nn.Module, ids: torch.Tensor) -> DomainScore:
    """NLL and argmax hits of every next-token prediction in ids [B, S]."""
    logits = model(ids.to(model.device)).logits[:, :-1].float()  # [B, S-1, V]
    target = ids[:, 1:].to(logits.device)  # [B, S-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    correct = (logits.argmax(-1) == target).sum()
    return DomainScore(tokens=target.numel(), nll=nll.item(), correct=int(correct), windows=ids.shape[0])


def evaluate(model: nn.Module, windows: dict[str, list[np.ndarray]], batch_size: int = DEFAULT_BATCH,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    """Perplexity and next-token accuracy per domain; `progress(n_tokens)` is called after each batch."""
    result = EvalResult()
    model.eval()
    with torch.inference_mode():
        for domain, ws in windows.items():
            score = result.domains.setdefault(domain, DomainScore())
            for ids in batches(ws, batch_size):
                score.add(score_batch(model, ids))
                if progress is not None:
                    progress(ids.numel())
    return result


def check_evaluation(path: Path, data: list[str], seq_len: int, max_tokens: int | None, batch_size: int,
                     routings=(), calib: list[str] | None = None) -> list:
    """What `moekit eval` checks before a weight is read: the data, the options, the calibration data, and every
    routing policy given (moekit.routing.Routing or None) against the model's layers and experts on its meta-device
    view. Returns the data sources."""
    import moekit.models
    from moekit.models.validate import check_routing
    from moekit.trace.data import resolve_data

    sources = resolve_data(data)
    at_least("--seq-len", seq_len)
    at_least("--batch-size", batch_size)
    if max_tokens is not None:
        at_least("--max-tokens", max_tokens, 0)
    if calib:
        resolve_data(calib)
    routings = [r for r in routings if r is not None]
    if routings:
        meta = moekit.models.load(path, meta=True)
        meta.require("eval", causal=True)  # the command's own refusal first: removing --routing would not fix it
        for routing in routings:
            check_routing(routing, meta)
    return sources


def evaluate_path(path: Path, data: list[str], seq_len: int = DEFAULT_SEQ_LEN,
                  max_tokens: int | None = DEFAULT_MAX_TOKENS, batch_size: int = DEFAULT_BATCH,
                  progress_factory=None, routing=None, calib: list[str] | None = None) -> dict:
    """load_for_eval + tokenised --data + evaluate, as the CLI runs it; under a moekit.routing.Routing if given
    (calibrated on `calib` when it needs it: skip=auto)."""
    from contextlib import nullcontext

    import moekit.models
    from moekit.trace.data import encoder

    sources = check_evaluation(path, data, seq_len, max_tokens, batch_size, [routing], calib)
    model, tokenizer = load_for_eval(path)
    windows = domain_windows(sources, encoder(tokenizer), seq_len, max_tokens)
    total = sum(len(w) for ws in windows.values() for w in ws)
    context = nullcontext()
    if routing is not None:  # a moekit.routing.Routing (duck-typed)
        view = moekit.models.load(model)
        context = routing.prepare(view, tokenizer, calib, per_prompt=False).applied(view)
    with context:
        if progress_factory is None:
            result = evaluate(model, windows, batch_size)
        else:
            with progress_factory(total) as advance:
                result = evaluate(model, windows, batch_size, advance)
    extra = {"routing": routing.spec()} if routing is not None else {}
    return {"model": str(path), "seq_len": seq_len, "max_tokens_per_source": max_tokens, **extra, **result.to_dict()}
