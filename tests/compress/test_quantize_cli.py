"""`moekit quantize`: end to end on a tiny checkpoint; the sidecar and plain from_pretrained agree."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from moekit.compress.quantize import load_quantized
from tests.compress.test_merge_cli import checkpoint, run_cli  # noqa: F401  (fixture)


def test_quantize_pmq_writes_dense_and_packed(checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "q"
    code, stdout, err = run_cli(["quantize", str(checkpoint / "model"), "--avg-bits", "2.5", "--method", "pmq",
                                 "--group-size", "16", "--calib", str(checkpoint / "calib.txt"), "--out", str(out),
                                 "--json"], capsys)
    assert code in (0, None), err
    summary = json.loads(stdout)
    assert summary["avg_bits_achieved"] <= 2.5 and summary["packed_bytes"] < summary["dense_bytes"]
    meta = json.loads((out / "quantized" / "quantization.json").read_text())
    assert meta["schema_version"] == 1 and meta["group_size"] == 16
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager").eval()(ids).logits
        packed = load_quantized(out)(ids).logits
    assert torch.equal(plain, packed)


def test_rtn_with_a_fractional_budget_is_one_line_exit_2(checkpoint, tmp_path, capsys):  # noqa: F811
    code, _, err = run_cli(["quantize", str(checkpoint / "model"), "--avg-bits", "2.5", "--method", "rtn",
                            "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "pmq" in err


def test_pmq_without_calibration_is_one_line_exit_2(checkpoint, tmp_path, capsys):  # noqa: F811
    code, _, err = run_cli(["quantize", str(checkpoint / "model"), "--avg-bits", "3", "--method", "pmq",
                            "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "--calib" in err
