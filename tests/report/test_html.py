"""The HTML report: one self-contained file with every expected figure and table, written atomically."""

from __future__ import annotations

import re

import numpy as np
import pytest

from moekit.analysis.run import analyze_arrays
from moekit.report import render_report

FIGURES = ["fig-usage", "fig-domain-usage", "fig-domain-jsd", "fig-affinity", "fig-lrc", "fig-hit-rates"]
TABLES = ["table-summary", "table-cache", "table-super-experts"]


def _results(rng, n_layers=3, with_optional=True):
    lengths = [60, 45, 30]
    n_tok, n_experts, top_k = sum(lengths), 8, 2
    layers = []
    for _ in range(n_layers):
        ids = np.argsort(rng.random((n_tok, n_experts)) + 0.5 * (np.arange(n_experts) % 3 == 0), axis=1)[:, :top_k]
        layers.append({"ids": ids, "weights": np.tile([0.7, 0.3], (n_tok, 1)),
                       "logits": rng.normal(size=(n_tok, n_experts)).astype(np.float32)})
    seq = np.repeat(np.arange(3), lengths)
    extra = {}
    if with_optional:
        out_max = np.ones((n_layers, n_experts))
        out_max[0, 3] = 50.0
        extra = {"token_id": rng.integers(0, 15, n_tok), "domain": np.repeat([0, 1, 1], lengths),
                     "domain_names": ["code", "<prose & math>"], "output_max": out_max}
    names = ["a", "b<1> & c", "d"][:n_layers]
    return analyze_arrays(layers, seq, n_experts, segment_lengths=(4, 16), npmi_min_count=2, layer_names=names, **extra)


def test_report_is_self_contained_and_complete(tmp_path):
    out = render_report(_results(np.random.default_rng(0)), tmp_path / "report.html", title="demo <model>")
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.IGNORECASE)  # no external assets
    assert "<link" not in text and "<script" not in text
    for fig_id in FIGURES:
        block = re.search(rf'<figure id="{fig_id}">(.*?)</figure>', text, re.DOTALL)
        assert block, fig_id
        assert 'src="data:image/png;base64,' in block.group(1) and "<figcaption>" in block.group(1)
    for table_id in TABLES:
        assert f'id="{table_id}"' in text, table_id
    assert "b<1> & c" not in text and "<td class=\"l\">b&lt;1&gt; &amp; c</td>" in text  # layer names are escaped
    assert "demo &lt;model&gt;" in text
    assert "Token-expert association" in text and "Definitions and conventions" in text
    assert '<td class="l">0</td><td>3</td><td>50.00</td>' in text  # the planted super expert
    assert list(tmp_path.iterdir()) == [out]  # the temporary file was renamed, nothing left behind


def test_report_without_optional_parts(tmp_path):
    out = render_report(_results(np.random.default_rng(1), n_layers=1, with_optional=False), tmp_path / "r.html")
    text = out.read_text(encoding="utf-8")
    for fig_id in ("fig-usage", "fig-lrc", "fig-hit-rates"):
        assert f'<figure id="{fig_id}">' in text
    for fig_id in ("fig-domain-usage", "fig-affinity"):  # no domains; a single layer has no affinity
        assert f'<figure id="{fig_id}">' not in text
    assert 'id="table-super-experts"' not in text


def test_report_overwrites_atomically_and_checks_input(tmp_path):
    target = tmp_path / "r.html"
    target.write_text("old")
    render_report(_results(np.random.default_rng(2), n_layers=2, with_optional=False), target)
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(ValueError):
        render_report({"not": "results"}, tmp_path / "x.html")
    with pytest.raises(ValueError):
        render_report(_results(np.random.default_rng(3), n_layers=1, with_optional=False),
                      tmp_path / "missing" / "x.html")
