"""`moekit trace` end to end on a saved tiny checkpoint, data resolution, and the DuckDB query of docs/traces.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import moekit.trace
from moekit.cli import main
from moekit.errors import UserError
from moekit.trace.data import resolve_data
from tests.trace.helpers import save_checkpoint, write_corpus


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


def _run(*argv) -> None:
    with pytest.raises(SystemExit) as exc:  # typer's standalone mode exits 0 on success
        main(list(argv))
    assert exc.value.code == 0


def _run_json(capsys, *argv) -> dict:
    _run(*argv)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_trace_then_resume_then_info(checkpoint, tmp_path, capsys):
    txt, jsonl = write_corpus(tmp_path / "data")
    out = tmp_path / "t"
    args = ["trace", str(checkpoint), "--data", str(txt), "--data", str(jsonl), "--out", str(out), "--seq-len", "32",
            "--batch-size", "4", "--chunk-tokens", "64", "--logits", "--activation-stats", "--json"]
    s = _run_json(capsys, *args)
    assert s["completed"] and s["chunks"] >= 3 and s["layers"] == 3 and s["top_k"] == 4 and s["num_experts"] == 16
    t = moekit.trace.open(out)
    assert t.num_tokens == s["tokens"] and t.domain_names == ["prose", "code", "math"]
    second_doc = np.flatnonzero(t.position == 0)[1]
    assert t.token_id[second_doc - 1] == 1, "documents end with the tokenizer's eos, as in training"
    assert t.manifest["model"] == str(checkpoint) and len(t.manifest["config_hash"]) == 64
    with pytest.raises(SystemExit) as exc:  # same command again: the folder is taken
        main(args)
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err
    assert _run_json(capsys, *args, "--resume")["tokens"] == s["tokens"]
    info = _run_json(capsys, "trace-info", str(out), "--json")
    assert info["tokens"] == s["tokens"] and info["domains"] == "prose,code,math"


def test_demo_domains_resolve_by_name(tmp_path):
    (tmp_path / "code.txt").write_text("x = 1\n")
    (tmp_path / "prose.txt").write_text("Once.\n")
    sources = resolve_data(["code,prose"], corpus_dirs=[tmp_path])
    assert [(s.domain, s.path.name) for s in sources] == [("code", "code.txt"), ("prose", "prose.txt")]
    with pytest.raises(UserError, match="demo-corpus domains: code, prose"):
        resolve_data(["klingon"], corpus_dirs=[tmp_path])


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    from moekit.trace.data import documents

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2: each JSONL line needs a string field `text`"):
        list(documents(resolve_data([str(bad)])[0]))


ROOT = Path(__file__).resolve().parents[2]


def documented_sql(path: Path) -> list[str]:
    """The ```sql blocks of a document, verbatim (what users copy), their trace path left to the caller."""
    return re.findall(r"```sql\n(.*?)```", (ROOT / path).read_text(), flags=re.S)


def on_trace(sql: str, trace: Path) -> str:
    """The documented query pointed at `trace` instead of the documented folder."""
    pointed = re.sub(r"'[^']*/chunk-\*\.parquet'", f"'{trace}/chunk-*.parquet'", sql)
    assert pointed != sql, f"no '.../chunk-*.parquet' path in {sql!r}"
    return pointed


@pytest.mark.parametrize("doc", ["README.md", "docs/traces.md"])
def test_duckdb_query_of_the_docs(doc, checkpoint, tmp_path, capsys):
    """The expert-frequency query as README.md and docs/traces.md print it, read out of the file and run on a trace:
    it must give the trace's own counts per layer and expert."""
    duckdb = pytest.importorskip("duckdb")
    (sql,) = documented_sql(Path(doc))
    txt, jsonl = write_corpus(tmp_path / "data")
    out = tmp_path / "t"
    _run("trace", str(checkpoint), "--data", str(txt), "--data", str(jsonl), "--out", str(out), "--seq-len", "32",
         "--chunk-tokens", "64", "--json")
    capsys.readouterr()
    t = moekit.trace.open(out)
    rows = duckdb.sql(on_trace(sql, out)).fetchall()
    got = np.zeros((len(t.layers), t.num_experts), np.int64)
    for layer, expert, n in rows:
        got[t.layers.index(layer), expert] = n
    assert np.array_equal(got, t.counts())
    per_domain = duckdb.sql(f"SELECT domain, count(*) FROM '{out}/chunk-*.parquet' GROUP BY domain ORDER BY domain")
    names = [t.domain_names[c] for c in t.domain]
    assert per_domain.fetchall() == sorted((d, names.count(d)) for d in set(names))
    if doc == "docs/traces.md":  # its one-layer-per-domain query, inline in the text
        (inline,) = re.findall(r"`(SELECT domain, expert, count\(\*\)[^`]*)`", (ROOT / doc).read_text())
        rows = duckdb.sql(on_trace(inline, out)).fetchall()
        assert sum(n for *_, n in rows) == t.counts()[0].sum() and {d for d, *_ in rows} == set(names)
