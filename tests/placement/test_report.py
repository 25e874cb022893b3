"""`moekit analyze TRACE --placement PLAN`: the report gains a placement section (table, per-layer load figure)."""

from __future__ import annotations

import re

import moekit.placement as mp
from tests.helpers import run_cli


def test_report_has_a_placement_section(qwen_trace, tmp_path, capsys):
    model, trace = qwen_trace
    mp.place(trace, tmp_path / "p", mp.Cluster(2), "eplb")
    code, out, err = run_cli(["analyze", str(trace), "--out", str(tmp_path / "r.html"), "--placement",
                              str(tmp_path / "p")], capsys)
    assert code == 0, err
    text = (tmp_path / "r.html").read_text()
    assert "<h2>Expert placement</h2>" in text and 'id="table-placement"' in text
    assert re.search(r'<figure id="fig-placement-load">\s*<img alt="[^"]*" src="data:image/png;base64,', text)
    assert text.count("<tr>", text.index('id="table-placement-layers"')) >= 3 + 1  # a row per MoE layer
    code, out, err = run_cli(["analyze", str(trace), "--out", str(tmp_path / "r2.html")], capsys)
    assert "Expert placement" not in (tmp_path / "r2.html").read_text()  # no plan, no section


def test_bad_plan_is_refused_before_the_analysis(qwen_trace, tmp_path, capsys):
    model, trace = qwen_trace
    (tmp_path / "p").mkdir()
    code, out, err = run_cli(["analyze", str(trace), "--out", str(tmp_path / "r.html"), "--placement",
                              str(tmp_path / "p")], capsys)
    assert code == 2 and "no placement plan at" in err and not (tmp_path / "r.html").exists()
