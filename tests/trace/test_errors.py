"""Damaged or foreign traces: one-line UserError naming the file and the fix; through the CLI, exit code 2."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import moekit.trace
from moekit.cli import main
from moekit.errors import UserError
from moekit.trace import TraceOptions
from tests.conftest import tiny_model
from tests.trace.helpers import char_tokenizer, write_corpus
from tests.trace.parquet_pages import data_pages


@pytest.fixture
def trace_dir(tmp_path):
    txt, _ = write_corpus(tmp_path / "data")
    out = tmp_path / "t"
    moekit.trace.record(tiny_model("qwen3_moe"), [str(txt)], out, tokenizer=char_tokenizer(),
                        options=TraceOptions(seq_len=32, chunk_tokens=64))
    return out


def _cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_truncated_chunk(trace_dir, capsys):
    chunk = trace_dir / "chunk-00001.parquet"
    chunk.write_bytes(chunk.read_bytes()[:-40])
    with pytest.raises(UserError, match="chunk-00001.parquet is truncated or corrupted.*--resume"):
        moekit.trace.open(trace_dir)
    assert "chunk-00001.parquet is truncated or corrupted" in _cli_error(capsys, "trace-info", str(trace_dir))


def test_corrupted_column_data(trace_dir, capsys):
    """Bytes flipped inside any data page's payload (found from the page headers, wherever the compressed layout puts
    them) are caught by that page's CRC, for every column."""
    chunk = trace_dir / "chunk-00000.parquet"
    original = chunk.read_bytes()
    covered = data_pages(chunk)
    assert {p.column.split(".")[0] for p in covered} >= {"seq_id", "token_id", "ids_L0", "weights_L0"}, covered
    for page in covered:
        data = bytearray(original)
        middle = page.payload + page.size // 2
        data[middle:middle + 2] = bytes(b ^ 0xFF for b in data[middle:middle + 2])
        chunk.write_bytes(bytes(data))
        t = moekit.trace.open(trace_dir)
        with pytest.raises(UserError, match="chunk-00000.parquet is truncated or corrupted"):
            for l in t.layers:
                t.ids(l), t.weights(l)
            t.seq_id, t.position, t.token_id, t.domain
    chunk.write_bytes(original)


def test_wrong_schema_version_in_a_chunk(trace_dir, capsys):
    chunk = trace_dir / "chunk-00000.parquet"
    table = pq.read_table(chunk)
    meta = {**table.schema.metadata, b"moekit.trace.schema_version": b"99"}
    pq.write_table(table.replace_schema_metadata(meta), chunk)
    err = _cli_error(capsys, "trace-info", str(trace_dir))
    assert "chunk-00000.parquet has trace schema version 99" in err and "record the trace again" in err


def test_wrong_schema_version_in_the_manifest(trace_dir, capsys):
    manifest = json.loads((trace_dir / "manifest.json").read_text())
    (trace_dir / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 0}))
    assert "manifest.json has trace schema version 0" in _cli_error(capsys, "trace-info", str(trace_dir))


def test_missing_manifest(trace_dir, capsys):
    (trace_dir / "manifest.json").unlink()
    err = _cli_error(capsys, "trace-info", str(trace_dir))
    assert "manifest.json is missing" in err and "moekit trace" in err


def test_missing_chunk_and_not_a_trace(trace_dir, tmp_path, capsys):
    (trace_dir / "chunk-00002.parquet").unlink()
    assert "chunk-00002.parquet is missing" in _cli_error(capsys, "trace-info", str(trace_dir))
    assert "no trace at" in _cli_error(capsys, "trace-info", str(tmp_path / "nowhere"))


def test_a_foreign_parquet_file(trace_dir):
    pq.write_table(pa.table({"x": [1, 2]}), trace_dir / "chunk-00000.parquet")
    with pytest.raises(UserError, match="schema version \\?"):
        moekit.trace.open(trace_dir)
