"""moekit eval: perplexity and next-token accuracy match a by-hand computation over the same non-overlapping windows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moekit.compress import evaluate as ev
from tests.conftest import tiny_model

TEXT = {
    "alpha": "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs.\n",
    "beta": "def f(x):\n    return x * 2 + 1\n\nprint(f(3))\n",
}


def char_tokenizer():
    """A character-level fast tokenizer (98 ids) that fits the tiny models' 128-token vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def save_tiny_checkpoint(path, family="qwen3_moe"):
    """A tiny random checkpoint with a tokenizer, as moekit commands read them."""
    tiny_model(family).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def write_data(folder):
    """Two .txt sources (domain = file stem), two documents each, separated as in the demo corpus."""
    paths = []
    for name, text in TEXT.items():
        p = folder / f"{name}.txt"
        p.write_text(f"{text}\n<|endoftext|>\n{text[::-1]}\n")
        paths.append(str(p))
    return paths


def by_hand(model, windows):
    """exp(mean NLL) and argmax accuracy, one window at a time, log-softmax written out."""
    nll, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.as_tensor(w, dtype=torch.long)[None]
            logits = model(ids).logits[0, :-1].double()  # [S-1, V]
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            target = ids[0, 1:]
            nll -= logp[torch.arange(len(target)), target].sum().item()
            hits += int((logits.argmax(-1) == target).sum())
            n += len(target)
    return math.exp(nll / n), hits / n, n


def test_perplexity_and_accuracy_match_hand_computation():
    model = tiny_model("qwen3_moe")
    rng = np.random.default_rng(0)
    windows = {"a": [rng.integers(0, 128, 16), rng.integers(0, 128, 16), rng.integers(0, 128, 7)],
               "b": [rng.integers(0, 128, 5)]}
    result = ev.evaluate(model, windows, batch_size=2).to_dict()
    for domain, ws in windows.items():
        ppl, acc, n = by_hand(model, ws)
        row = result["domains"][domain]
        assert row["tokens"] == n == sum(len(w) - 1 for w in ws)
        assert row["perplexity"] == pytest.approx(ppl, rel=1e-5)
        assert row["accuracy"] == pytest.approx(acc)
    ppl_all, acc_all, n_all = by_hand(model, [w for ws in windows.values() for w in ws])
    assert result["overall"]["perplexity"] == pytest.approx(ppl_all, rel=1e-5)
    assert result["overall"]["accuracy"] == pytest.approx(acc_all) and result["overall"]["tokens"] == n_all


def test_accuracy_counts_argmax_hits():
    class Fixed(torch.nn.Module):  # predicts token (id + 1) % V everywhere
        device = torch.device("cpu")

        def forward(self, ids):
            logits = torch.nn.functional.one_hot((ids + 1) % 10, 10).float() * 5
            return type("Out", (), {"logits": logits})()

    windows = {"d": [np.array([1, 2, 3, 9, 4])]}  # predictions 2, 3, 4, 0 vs targets 2, 3, 9, 4: 2 of 4
    row = ev.evaluate(Fixed(), windows).to_dict()["domains"]["d"]
    assert row["tokens"] == 4 and row["accuracy"] == 0.5


def test_eval_command_matches_hand_computation(tmp_path, capsys):
    from moekit.cli import main
    from moekit.trace.data import encoder, resolve_data, sequences

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    data = write_data(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(ckpt), "--data", ",".join(data), "--seq-len", "24", "--json"])
    assert exit_info.value.code in (0, None)
    result = json.loads(capsys.readouterr().out)
    model, tok = ev.load_for_eval(ckpt)
    for source in resolve_data(data):
        windows = [s.token_ids for s in sequences([source], encoder(tok), 24) if len(s.token_ids) > 1]
        ppl, acc, n = by_hand(model, windows)
        row = result["domains"][source.domain]
        assert row["tokens"] == n and row["perplexity"] == pytest.approx(ppl, rel=1e-5)
        assert row["accuracy"] == pytest.approx(acc)


def test_max_tokens_caps_each_source(tmp_path):
    tok = char_tokenizer()
    from moekit.trace.data import encoder, resolve_data

    windows = ev.domain_windows(resolve_data(write_data(tmp_path)), encoder(tok), 8, max_tokens=20)
    assert set(windows) == {"alpha", "beta"}
    assert all(sum(len(w) for w in ws) == 20 for ws in windows.values())
    assert all(len(w) <= 8 for ws in windows.values() for w in ws)


def test_registered_loader_is_tried_first(tmp_path, monkeypatch):
    sentinel = (object(), object())
    monkeypatch.setattr(ev, "_LOADERS", [])
    ev.register_loader(lambda path, dtype: sentinel if (path / "QUANT").exists() else None)
    (tmp_path / "QUANT").touch()
    assert ev.load_for_eval(tmp_path) is sentinel
