"""A killed run continued with --resume ends with the same trace as an uninterrupted one; chunks flush as they go."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import moekit.trace
from moekit.errors import UserError
from moekit.trace import TraceOptions
from tests.conftest import tiny_model
from tests.trace.helpers import char_tokenizer, write_corpus

OPTIONS = TraceOptions(seq_len=24, batch_size=2, chunk_tokens=48, activation_stats=True)  # 2 sequences per chunk


def _record(model, data, out, **kw):
    return moekit.trace.record(model, data, out, tokenizer=char_tokenizer(), options=kw.pop("options", OPTIONS), **kw)


def assert_same_trace(a, b):
    assert a.layers == b.layers and a.domain_names == b.domain_names and a.num_tokens == b.num_tokens
    for name in ("seq_id", "position", "token_id", "domain"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for l in a.layers:
        assert np.array_equal(a.ids(l), b.ids(l)), f"ids L{l}"
        assert np.array_equal(a.weights(l), b.weights(l)), f"weights L{l}"
    assert (a.activation_stats is None) == (b.activation_stats is None)
    for x, y in zip(a.activation_stats or (), b.activation_stats or ()):
        assert np.array_equal(x, y)
    strip = lambda m: {k: v for k, v in m.items() if k != "model"}  # noqa: E731
    assert strip(a.manifest) == strip(b.manifest)


@pytest.fixture
def setup(tmp_path):
    txt, jsonl = write_corpus(tmp_path / "data")
    return tiny_model("qwen3_moe"), [str(txt), str(jsonl)], tmp_path


def test_chunks_are_flushed_as_the_run_goes(setup):
    model, data, tmp = setup
    manifest = _record(model, data, tmp / "t")
    files = sorted(p.name for p in (tmp / "t").glob("chunk-*.parquet"))
    assert len(files) >= 5 and files == [c["file"] for c in manifest["chunks"]]
    assert manifest["completed"] and sum(c["tokens"] for c in manifest["chunks"]) == manifest["tokens"]
    assert all(pq.ParquetFile(tmp / "t" / f).metadata.num_rows <= OPTIONS.chunk_tokens for f in files)


def test_resume_after_kill_gives_the_same_trace(setup):
    model, data, tmp = setup
    _record(model, data, tmp / "full")
    killed = _record(model, data, tmp / "resumed", _stop_after_chunks=2)
    assert not killed["completed"] and len(killed["chunks"]) == 2
    # what a kill can leave: a half-written temp file, and a chunk renamed into place before the manifest listed it
    (tmp / "resumed" / "chunk-00002.parquet.tmp").write_bytes(b"PAR1 half a file")
    (tmp / "full" / "chunk-00002.parquet").replace(tmp / "resumed" / "chunk-00002.parquet")
    _record(model, data, tmp / "full2")  # a second uninterrupted reference (the move above took one of its chunks)
    _record(model, data, tmp / "resumed", resume=True)
    assert not list((tmp / "resumed").glob("*.tmp"))
    assert_same_trace(moekit.trace.open(tmp / "resumed"), moekit.trace.open(tmp / "full2"))


def test_resume_rewrites_a_damaged_chunk(setup):
    model, data, tmp = setup
    _record(model, data, tmp / "a")
    _record(model, data, tmp / "b")
    damaged = tmp / "b" / "chunk-00001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])
    _record(model, data, tmp / "b", resume=True)
    assert_same_trace(moekit.trace.open(tmp / "a"), moekit.trace.open(tmp / "b"))


def test_resume_of_a_completed_trace_does_nothing(setup):
    model, data, tmp = setup
    first = _record(model, data, tmp / "t")
    mtime = (tmp / "t" / "chunk-00000.parquet").stat().st_mtime_ns
    assert _record(model, data, tmp / "t", resume=True)["chunks"] == first["chunks"]
    assert (tmp / "t" / "chunk-00000.parquet").stat().st_mtime_ns == mtime


def test_existing_output_needs_resume(setup):
    model, data, tmp = setup
    _record(model, data, tmp / "t", _stop_after_chunks=1)
    with pytest.raises(UserError, match="--resume"):
        _record(model, data, tmp / "t")


def test_resume_refuses_other_options_or_data(setup):
    model, data, tmp = setup
    _record(model, data, tmp / "t", _stop_after_chunks=1)
    with pytest.raises(UserError, match="manifest.s options differs"):
        _record(model, data, tmp / "t", resume=True, options=TraceOptions(seq_len=16, chunk_tokens=48))
    with pytest.raises(UserError, match="manifest.s data differs"):
        _record(model, data[:1], tmp / "t", resume=True)


def test_max_tokens_cuts_the_stream(setup):
    model, data, tmp = setup
    manifest = _record(model, data, tmp / "t", options=TraceOptions(seq_len=24, chunk_tokens=48, max_tokens=100))
    t = moekit.trace.open(tmp / "t")
    assert manifest["tokens"] == t.num_tokens == len(t.seq_id) == 100
    assert json.loads((tmp / "t" / "manifest.json").read_text())["completed"]
