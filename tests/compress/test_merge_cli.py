"""`moekit merge`: end to end on a tiny checkpoint with a tokenizer; one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_model
from tests.helpers import run_cli

TEXT = "The quick brown fox jumps over the lazy dog.\ndef f(x):\n    return x * 2 + 1\n"


def char_tokenizer():
    """A character-level fast tokenizer (98 ids) that fits the tiny models' 128-token vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen3-MoE checkpoint (16 experts, top-4) with a tokenizer, and a calibration text file."""
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model("qwen3_moe").save_pretrained(path / "model")
    char_tokenizer().save_pretrained(path / "model")
    (path / "calib.txt").write_text(f"{TEXT}\n<|endoftext|>\n{TEXT[::-1]}\n" * 4)
    return path



@pytest.mark.parametrize("method, router", [("msmoe", "dominant"), ("hcsmoe", "average")])
def test_merge_writes_a_checkpoint_with_g_experts(checkpoint, tmp_path, capsys, method, router):
    out = tmp_path / "merged"
    code, stdout, err = run_cli(["merge", str(checkpoint / "model"), "--groups", "8", "--method", method,
                                 "--router", router, "--calib", str(checkpoint / "calib.txt"), "--out", str(out),
                                 "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["after"]["experts"] == 8 and summary["router_policy"] == router
    report = json.loads((out / "compression.json").read_text())
    assert len(report["groups_per_layer"]["0"]) == 8
    model = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager")
    assert model.config.num_experts == 8 and (out / "tokenizer.json").is_file()
    # the saved checkpoint is what the Python API computes from the same calibration, and it is not the input model
    expected, original = _merged_in_memory(checkpoint, method, router), tiny_model("qwen3_moe")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        got = model(ids).logits
        assert torch.equal(got, expected(ids)) and not torch.allclose(got, original(ids).logits)


def _merged_in_memory(checkpoint, method, router):
    import moekit.models
    from moekit.compress import merge as merging
    from moekit.compress.calibdata import calibrate, token_batches

    view = moekit.models.load(tiny_model("qwen3_moe"))
    batches = token_batches(char_tokenizer(), [str(checkpoint / "calib.txt")], seq_len=256, max_tokens=8192)
    merging.merge(view, calibrate(view, batches), 8, method=method, router=router)
    return lambda ids: view.model(ids).logits


@pytest.mark.parametrize("args, message", [
    (["--groups", "2"], "between top-k"),
    (["--groups", "8", "--method", "nope"], "unknown merge method"),
    (["--groups", "8", "--router", "nope"], "unknown --router"),
])
def test_bad_merge_input_is_one_line_exit_2(checkpoint, tmp_path, capsys, args, message):
    code, _, err = run_cli(["merge", str(checkpoint / "model"), "--calib", str(checkpoint / "calib.txt"),
                            "--out", str(tmp_path / "x"), *args], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_calibration_shares_tokens_between_sources(tmp_path):
    from moekit.compress.calibdata import token_batches

    for name, ch in (("a", "x"), ("b", "y")):
        (tmp_path / f"{name}.txt").write_text((ch * 50 + "\n") * 20)
    batches = token_batches(char_tokenizer(), [f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}"], seq_len=32,
                            max_tokens=256)
    ids = torch.cat([b.reshape(-1) for b in batches])
    x, y = char_tokenizer().convert_tokens_to_ids(["x", "y"])
    assert (ids == x).sum() > 64 and (ids == y).sum() > 64 and ids.numel() <= 256
