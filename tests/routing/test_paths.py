"""Where routing policies meet the other stages on wrapper, encoder-decoder, loop and hash-routed checkpoints: a
`--routing` a family cannot take is refused before any weight is read; `trace --routing` through a wrapper records
the policy and its layer kinds, `simulate` and `experts find` read it and the steering file runs; `experts find` folds
a loop layer's passes and skips hash-routed layers; `place` refuses what SGLang / vLLM cannot take."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import transformers

import moekit.trace
from tests.helpers import run_cli
from tests.trace.helpers import save_checkpoint, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return lambda family: save_checkpoint(root / family, family) if not (root / family).exists() else root / family


def _trace(ckpt, corpus, out, capsys, *extra):
    code, _, err = run_cli(["trace", str(ckpt), "--data", str(corpus), "--out", str(out), "--seq-len", "24",
                            "--max-tokens", "192", *extra], capsys)
    assert code == 0, err
    return moekit.trace.open(out)


def _one_line_error(code, err, *needles):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("family, argv", [
    ("switch_transformers", ["trace", "{m}", "--data", "{d}", "--out", "{o}", "--routing", "topk=1"]),
    ("doge", ["eval", "{m}", "--data", "{d}", "--routing", "skip=0.5"]),
    ("doge", ["run", "{m}", "--prompt", "a", "--routing", "topk=2"]),
    ("deepseek_v4", ["trace", "{m}", "--data", "{d}", "--out", "{o}", "--routing", "topk=1,layers=0"]),
])
def test_a_policy_the_model_cannot_take_is_refused_before_any_weight_is_read(family, argv, checkpoints, corpus,
                                                                              tmp_path, capsys, monkeypatch):
    ckpt = checkpoints(family)

    def read_weights(*args, **kwargs):  # the checkpoint validator reads safetensors headers only
        raise AssertionError("weights read before the routing policy was refused")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(read_weights))
    monkeypatch.setattr(safetensors.torch, "load_file", read_weights)
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()  # the fixture's save_pretrained progress
    code, _, err = run_cli([a.format(m=ckpt, d=corpus, o=tmp_path / "out") for a in argv], capsys)
    why = "hash-routed" if family == "deepseek_v4" else f"routing policies do not apply to {family}"
    _one_line_error(code, err, why)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_wrapper_policy_trace_feeds_simulate_and_experts_find_and_its_steering_file_runs(checkpoints, corpus,
                                                                                          tmp_path, capsys):
    ckpt = checkpoints("qwen3_vl_moe")
    stock = _trace(ckpt, corpus, tmp_path / "stock", capsys)
    policy = _trace(ckpt, corpus, tmp_path / "policy", capsys, "--routing", "top-p=0.5")
    assert policy.manifest["routing"]["spec"] == "top-p=0.5" and policy.sentinel == policy.num_experts
    assert policy.layer_kinds == stock.layer_kinds == {l: "decoder" for l in stock.layers}
    assert policy.manifest["model_type"] == "qwen3_vl_moe_text" and policy.width > policy.top_k
    code, out, err = run_cli(["simulate", str(tmp_path / "policy"), "--policy", "lru", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["tokens"] == policy.num_tokens
    steer = tmp_path / "steer.json"
    code, out, err = run_cli(["experts", "find", "--contrast", str(tmp_path / "policy"), "--contrast",
                              str(tmp_path / "stock"), "--top", "3", "--out", str(steer), "--json"], capsys)
    assert code == 0, err
    steered = _trace(ckpt, corpus, tmp_path / "steered", capsys, "--steer", str(steer))
    assert steered.manifest["routing"]["spec"].startswith("force=")
    code, _, err = run_cli(["place", str(tmp_path / "policy"), "--gpus", "2", "--out", str(tmp_path / "p")], capsys)
    _one_line_error(code, err, "recorded under a routing policy")


def test_experts_find_folds_loop_passes_and_skips_hash_routed_layers(checkpoints, corpus, tmp_path, capsys):
    for family, passes in (("inkling2_loop_text", True), ("deepseek_v4", False)):
        ckpt = checkpoints(family)
        a = _trace(ckpt, corpus, tmp_path / f"{family}-a", capsys)
        b = _trace(ckpt, corpus, tmp_path / f"{family}-b", capsys, "--routing", "topk=1")
        assert any(" pass " in k for k in a.layer_kinds.values()) == passes
        steer = tmp_path / f"{family}.json"
        code, out, err = run_cli(["experts", "find", "--contrast", str(tmp_path / f"{family}-a"), "--contrast",
                                  str(tmp_path / f"{family}-b"), "--top", "40", "--action", "steer", "--out",
                                  str(steer), "--json"], capsys)
        assert code == 0, err
        layers = {e["layer"] for e in json.loads(out)["experts"]}
        assert layers == set(a.layer_of.values()) - a.hash_routed  # decoder layers only, every steerable one
        assert len(layers) < len(a.layers)  # fewer than the trace's entries: passes folded / hash layers left out
        _trace(ckpt, corpus, tmp_path / f"{family}-s", capsys, "--steer", str(steer))  # the file runs
    code, _, err = run_cli(["place", str(tmp_path / "inkling2_loop_text-a"), "--gpus", "2", "--out",
                            str(tmp_path / "p")], capsys)
    _one_line_error(code, err, "loop layers several times a forward")


def test_encoder_decoder_traces_simulate_but_refuse_placement_and_steering(checkpoints, corpus, tmp_path, capsys):
    ckpt = checkpoints("switch_transformers")
    t = _trace(ckpt, corpus, tmp_path / "t", capsys)
    assert set(t.layer_kinds.values()) == {"encoder", "decoder"}
    code, out, err = run_cli(["simulate", str(tmp_path / "t"), "--policy", "lru", "--json"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["place", str(tmp_path / "t"), "--gpus", "2", "--out", str(tmp_path / "p")], capsys)
    _one_line_error(code, err, "encoder-decoder model (switch_transformers)", "decoder-only")
    assert not (tmp_path / "p").exists()
    code, _, err = run_cli(["experts", "find", "--contrast", str(tmp_path / "t"), "--contrast", str(tmp_path / "t"),
                            "--out", str(tmp_path / "s.json")], capsys)
    _one_line_error(code, err, "takes no routing policy")
    assert not (tmp_path / "s.json").exists()
