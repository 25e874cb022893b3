"""What the compression benchmarks share: the demo model and its held-out text, from a fresh clone.

Evaluation windows are the first tokens of each domain's held-out file. Calibration windows come from the training
split (demo/corpus/train, rebuilt by scripts/build_corpus.py) when it is there, else from the second half of the
held-out files, which never overlaps the evaluation and needs nothing outside the repository (`--calib-split`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.trace.data import encoder, resolve_data, sequences  # noqa: E402

DOMAINS = ["prose", "code", "math", "german", "french", "russian", "japanese", "dialogue"]
SEQ = 256


def load_demo(model_arg: str | None):
    """(model in float32 eval mode with eager experts, tokenizer, its path): --model, else demo/model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_arg) if model_arg else ROOT / "demo/model"
    if not (path / "config.json").is_file():
        sys.exit(f"no checkpoint at {path}: pass --model DIR")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", experts_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(path), str(path.relative_to(ROOT) if path.is_relative_to(ROOT)
                                                                   else path)


def default_calib_split() -> str:
    return "train" if (ROOT / "demo/corpus/train").is_dir() else "heldout"


def _domain_windows(tok, domain: str, split: str = "heldout") -> list[np.ndarray]:
    src = resolve_data([str(ROOT / f"demo/corpus/{split}/{domain}.txt")])
    return [s.token_ids for s in sequences(src, encoder(tok), SEQ) if len(s.token_ids) >= 2]


def eval_windows(tok, tokens_per_domain: int, domains=DOMAINS) -> dict[str, list[np.ndarray]]:
    """The first `tokens_per_domain` held-out tokens of each domain, in non-overlapping windows."""
    return {d: _take(_domain_windows(tok, d), tokens_per_domain) for d in domains}


def calib_windows(tok, tokens_per_domain: int, domains=DOMAINS, split: str = "heldout") -> dict[str, list[np.ndarray]]:
    """`tokens_per_domain` tokens per domain: the first of the training split, or from the second half of the
    held-out windows (disjoint from eval)."""
    out = {}
    for d in domains:
        ws = _domain_windows(tok, d, split)
        out[d] = _take(ws if split == "train" else ws[len(ws) // 2:], tokens_per_domain)
    return out


def _take(ws: list[np.ndarray], tokens: int) -> list[np.ndarray]:
    out, total = [], 0
    for w in ws:
        if total >= tokens:
            break
        w = w[: tokens - total]
        if len(w) >= 2:
            out.append(w)
        total += len(w)
    return out


def fit_predictor(view, tok, tokens_per_domain: int, split: str, steps: int = 4000, width: int = 128):
    """The routing predictor (moekit predictor train's recipe) fitted on `tokens_per_domain` calibration tokens per
    domain (calib_windows: never the evaluation text); returns (predictor, calibration tokens, seconds)."""
    import time

    from moekit.runtime import predictor_train as pt

    t0 = time.perf_counter()
    windows = [w for ws in calib_windows(tok, tokens_per_domain, DOMAINS, split).values() for w in ws]
    data = pt.collect(view, windows)
    predictor = pt.train(view, data, pt.TrainOptions(width=width, steps=steps))
    return predictor, data.tokens, time.perf_counter() - t0
