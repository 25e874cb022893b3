"""--routing / --steer / --scmoe on `moekit eval` and `moekit run`, end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import moekit.models
import moekit.routing as R
from tests.conftest import tiny_model
from tests.helpers import run_cli
from tests.trace.helpers import save_checkpoint, write_corpus


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen3", "qwen3_moe")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))[0]


def test_eval_with_a_policy_and_auto_skip(ckpt, corpus, capsys):
    base = json.loads(run_cli(["eval", str(ckpt), "--data", str(corpus), "--seq-len", "32", "--json"], capsys)[1])
    code, out, err = run_cli(["eval", str(ckpt), "--data", str(corpus), "--seq-len", "32", "--routing", "skip=auto",
                              "--calib", str(corpus), "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["routing"] == "skip=auto" and res["overall"]["tokens"] == base["overall"]["tokens"]
    assert res["overall"]["perplexity"] != base["overall"]["perplexity"]  # about half the tokens skip an expert
    code, out, _ = run_cli(["eval", str(ckpt), "--data", str(corpus), "--seq-len", "32", "--routing", "skip=0",
                            "--json"], capsys)
    assert json.loads(out)["overall"] == base["overall"]  # the identity case, through the CLI


def test_skip_auto_betas_are_medians(ckpt, corpus):
    from transformers import AutoTokenizer

    from moekit.routing.calibrate import prepare

    view = moekit.models.load(tiny_model("qwen3_moe"))
    routing = prepare(R.parse("skip=auto"), view, AutoTokenizer.from_pretrained(ckpt), [str(corpus)])
    skip = routing.policies[0]
    assert set(skip.betas) == {m.index for m in view.layers} and all(0 < b <= 1 for b in skip.betas.values())


def test_eval_scmoe_reports_accuracy_next_to_greedy(ckpt, corpus, capsys):
    code, out, err = run_cli(["eval", str(ckpt), "--data", str(corpus), "--seq-len", "32", "--scmoe", "beta=0",
                              "--json"], capsys)
    assert code == 0, err
    row = next(iter(json.loads(out)["domains"].values()))
    assert row["accuracy"] == row["greedy_accuracy"]  # beta = 0 is greedy


def test_run_with_routing_and_scmoe(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    code, out, err = run_cli(["run", str(ckpt), "--budget", "1MB", "--prompt", "abc", "--max-new-tokens", "4",
                              "--routing", "rank=0", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["routing"] == "rank=0" and res["new_tokens"] == 4
    view = moekit.models.load(tiny_model("qwen3_moe"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("abc", return_tensors="pt").input_ids
    with R.apply(view, R.parse("rank=0")), torch.no_grad():
        expect = view.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert res["text"] == tok.decode(expect[0], skip_special_tokens=True)
    code, out, err = run_cli(["run", str(ckpt), "--budget", "1MB", "--prompt", "abc", "--max-new-tokens", "3",
                              "--scmoe", "beta=0", "--json"], capsys)
    assert code == 0, err
    with torch.no_grad():
        greedy = tiny_model("qwen3_moe").generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    assert json.loads(out)["text"] == tok.decode(greedy[0], skip_special_tokens=True)


@pytest.mark.parametrize("args, match", [(["--routing", "top-p"], "needs a value"),
                                         (["--routing", "skip=x"], "beta must be a number"),
                                         (["--steer", "nofile.json"], "no such file"),
                                         (["--scmoe", "alpha=0"], "alpha")])
def test_run_bad_routing_is_one_line(ckpt, tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    code, _, err = run_cli(["run", str(ckpt), "--prompt", "a", *args], capsys)
    assert code == 2 and match in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # rejected before the store was built


def test_c3po_and_policy_traces_refuse_batch_commands(ckpt, corpus, tmp_path, capsys):
    import numpy as np

    from moekit.routing.c3po import Reference

    ref = tmp_path / "ref.npz"
    Reference(np.zeros((1, 384), np.float32), np.full((1, 3, 16), 1 / 16, np.float32), [0, 1, 2]).save(ref)
    code, _, err = run_cli(["eval", str(ckpt), "--data", str(corpus), "--routing", f"c3po={ref}"], capsys)
    assert code == 2 and "moekit run" in err
    out = tmp_path / "tp"
    assert run_cli(["trace", str(ckpt), "--data", str(corpus), "--out", str(out), "--seq-len", "32", "--routing",
                    "top-p=0.3"], capsys)[0] == 0
    code, _, err = run_cli(["analyze", str(out), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 2 and "fixed top-k" in err
