"""Shared test data for the trace tests: a tiny checkpoint with a character tokenizer, and a small corpus."""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from tests.conftest import tiny_model

CHARS = string.ascii_letters + string.digits + " .,;:!?'\"()\n-_=+*/#"


def char_tokenizer():
    """A character-level `tokenizers` tokenizer whose ids fit the tiny models' vocabulary (128)."""
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return tok


def save_checkpoint(folder: Path, model_type: str = "qwen3_moe") -> Path:
    """A tiny random model saved with a transformers tokenizer, as `moekit trace MODEL` expects."""
    from transformers import PreTrainedTokenizerFast

    tiny_model(model_type).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=char_tokenizer(), eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    return folder


def write_corpus(folder: Path) -> tuple[Path, Path]:
    """A .txt file of three documents and a .jsonl file with two domains."""
    folder.mkdir(parents=True, exist_ok=True)
    txt = folder / "prose.txt"
    docs = ["It was the best of times, it was the worst of times. " * 4, "Call me Ishmael.",
            "The quick brown fox jumps over the lazy dog; " * 6]
    txt.write_text("\n<|endoftext|>\n".join(docs) + "\n")
    jsonl = folder / "mixed.jsonl"
    rows = [{"text": "def f(x):\n    return x * 2\n" * 3, "domain": "code"},
            {"text": "2 + 2 = 4, and 3 * 7 = 21.", "label": "math"},
            {"text": "for i in range(10): print(i)", "domain": "code"}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return txt, jsonl


def record_small_trace(folder: Path, seq_len: int) -> Path:
    """`folder`/trace: the tiny qwen3_moe checkpoint (16 experts top-4, 3 MoE layers) traced over write_corpus's
    three domains (prose, code, math) in windows of `seq_len` tokens."""
    import moekit.trace

    ckpt = save_checkpoint(folder / "ckpt")
    txt, jsonl = write_corpus(folder / "data")
    moekit.trace.record(ckpt, [str(txt), str(jsonl)], folder / "trace",
                        options=moekit.trace.TraceOptions(seq_len=seq_len))
    return folder / "trace"
