"""The predictor end to end through the CLI: `trace --predictor` records forecasts, `simulate --policy predictive`
replays them, `predictor train` writes a predictor, `run --policy predictive --predictor` uses it; one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import moekit.models
import moekit.trace
from moekit.runtime import predictor as pr
from moekit.runtime import predictor_train as pt
from tests.helpers import run_cli
from tests.runtime.helpers import random_predictor
from tests.trace.helpers import save_checkpoint, write_corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predictive")
    ckpt = save_checkpoint(root / "ckpt", "qwen3_moe")
    txt, _ = write_corpus(root / "data")
    view = moekit.models.load(ckpt, dtype="float32")
    path = random_predictor(view).save(root / "random.safetensors")
    return ckpt, txt, path


def _trace(setup, out, capsys, *extra):
    ckpt, txt, path = setup
    code, _, err = run_cli(["trace", str(ckpt), "--data", str(txt), "--out", str(out), "--seq-len", "48",
                            "--batch-size", "2", "--json", *extra], capsys)
    assert code == 0, err
    return moekit.trace.open(out)


def test_trace_records_the_predictors_forecasts(setup, tmp_path, capsys):
    ckpt, _, path = setup
    t = _trace(setup, tmp_path / "t", capsys, "--predictor", str(path))
    predictor = pr.load(path)
    assert t.manifest["predictor"]["sha256"] == predictor.digest()
    text = pt.read_traces([tmp_path / "t"])
    data = pt.collect(moekit.models.load(ckpt), text.sequences, text.batch_size)  # the same forward, recomputed
    for pos, layer in enumerate(t.layers):
        want = predictor.forecast(pos, data.x[pos].astype(np.float32), data.ids[pos], data.weights[pos])
        got = t.forecasts(layer)
        assert got.shape == (t.num_tokens, t.num_experts) and got.dtype == np.float16
        assert np.abs(got.astype(np.float32) - want.astype(np.float32)).max() <= 4e-3  # float16 of equal inputs


def test_simulate_replays_predictive(setup, tmp_path, capsys):
    ckpt = setup[0]
    _trace(setup, tmp_path / "t", capsys, "--predictor", str(setup[2]))
    code, out, err = run_cli(["simulate", str(tmp_path / "t"), "--policy", "predictive,lfru,belady", "--capacity",
                              "1.5x", "--model", str(ckpt), "--json"], capsys)
    assert code == 0, err
    rows = {r["policy"]: r for r in json.loads(out)["rows"]}
    assert rows["predictive"]["hits"] + rows["predictive"]["misses"] == rows["lfru"]["hits"] + rows["lfru"]["misses"]
    assert rows["predictive"]["hits"] <= rows["belady"]["hits"]


def test_simulate_predictive_needs_recorded_forecasts(setup, tmp_path, capsys):
    _trace(setup, tmp_path / "t", capsys)
    code, _, err = run_cli(["simulate", str(tmp_path / "t"), "--policy", "predictive", "--model", str(setup[0])],
                           capsys)
    assert code == 2 and "no predictor forecasts" in err and "--predictor" in err and "Traceback" not in err


def test_a_trace_without_the_predictor_key_still_reads_and_resumes(setup, tmp_path, capsys):
    """Traces written before forecasts existed have no "predictor" in their manifest."""
    t = _trace(setup, tmp_path / "t", capsys)
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    del manifest["predictor"]
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(manifest))
    old = moekit.trace.open(tmp_path / "t")
    np.testing.assert_array_equal(old.ids(old.layers[0]), t.ids(t.layers[0]))
    assert _trace(setup, tmp_path / "t", capsys, "--resume").num_tokens == t.num_tokens


def test_resume_refuses_another_predictor(setup, tmp_path, capsys):
    _trace(setup, tmp_path / "t", capsys, "--predictor", str(setup[2]))
    ckpt, txt, _ = setup
    other = random_predictor(moekit.models.load(ckpt), seed=1).save(tmp_path / "other.safetensors")
    code, _, err = run_cli(["trace", str(ckpt), "--data", str(txt), "--out", str(tmp_path / "t"), "--seq-len", "48",
                            "--batch-size", "2", "--resume", "--predictor", str(other)], capsys)
    assert code == 2 and "predictor differs" in err


def test_train_then_run_predictive(setup, tmp_path, capsys, monkeypatch):
    ckpt = setup[0]
    _trace(setup, tmp_path / "t", capsys)
    out = tmp_path / "p.safetensors"
    code, stdout, err = run_cli(["predictor", "train", str(tmp_path / "t"), "--out", str(out), "--steps", "30",
                                 "--width", "8", "--validation", "0.5", "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["routing_agreement"] == 1.0 and 0 <= report["recall_next_layer"] <= 1
    assert pr.load(out).spec.layers == tuple(m.index for m in moekit.models.load(ckpt, meta=True).layers)
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    code, stdout, err = run_cli(["run", str(ckpt), "--budget", "1MB", "--prompt", "abc", "--max-new-tokens", "4",
                                 "--policy", "predictive", "--predictor", str(out), "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["policy"] == "predictive"


@pytest.mark.parametrize("args, message", [
    (["run", "{ckpt}", "--prompt", "a", "--policy", "predictive"], "pass --predictor"),
    (["predictor", "train", "{trace}", "--out", "{tmp}"], "is a folder"),
    (["predictor", "train", "{tmp}/none", "--out", "{tmp}/p.safetensors"], "no trace at"),
    (["predictor", "train", "{trace}", "--out", "{tmp}/p.safetensors", "--model", "{tmp}"], "cannot find the model"),
    (["simulate", "{tmp}", "--policy", "lru,predictive", "--replay-on", "{ckpt}"], "leave predictive out"),
])
def test_one_line_errors(setup, tmp_path, capsys, args, message):
    trace = tmp_path / "t"
    if "{trace}" in " ".join(args):
        _trace(setup, trace, capsys)
    argv = [a.format(ckpt=setup[0], trace=trace, tmp=tmp_path) for a in args]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
