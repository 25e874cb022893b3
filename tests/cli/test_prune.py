"""`moekit prune`: an end-to-end run writes a checkpoint + compression.json that plain transformers reloads; bad input is
one line on stderr with exit code 2, before any weight is read."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.compress.test_eval import save_tiny_checkpoint, write_data
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    save_tiny_checkpoint(root / "qwen", "qwen3_moe")  # 16 experts, top-4
    save_tiny_checkpoint(root / "deepseek", "deepseek_v3")  # 8 experts, top-2, 2 groups
    return root, ",".join(write_data(root))


@pytest.mark.parametrize("method", ["frequency", "naee"])
def test_prune_writes_a_reloadable_checkpoint(workdir, method, capsys):
    root, data = workdir
    out = root / f"pruned-{method}"
    code, stdout, _ = run_cli(["prune", str(root / "qwen"), "--keep", "0.5", "--method", method, "--calib", data,
                               "--out", str(out), "--max-tokens", "128", "--seq-len", "32", "--json"], capsys)
    assert code == 0
    rep = json.loads(stdout)
    assert rep == json.loads((out / "compression.json").read_text())
    assert rep["method"] == method and rep["experts_before"] == 16 and rep["experts_after"] == 8
    assert rep["calibration"]["tokens"] == 128 and set(rep["calibration"]["domains"]) == {"alpha", "beta"}
    assert rep["bytes_after"] < rep["bytes_before"]
    assert rep["search"] == ("greedy" if method == "naee" else "top-n")  # C(16, 8) = 12870 > 5000 candidate sets
    assert all(len(row["kept"]) == 8 and len(row["dropped"]) == 8 for row in rep["layers"].values())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_experts == 8 and (out / "tokenizer.json").is_file()


def test_prune_table_output(workdir, capsys):
    root, data = workdir
    code, stdout, _ = run_cli(["prune", str(root / "deepseek"), "--keep", "4", "--method", "tcess", "--calib", data,
                               "--out", str(root / "ds-tcess"), "--max-tokens", "64"], capsys)
    assert code == 0
    text = " ".join(stdout.split())  # rich wraps at the terminal width
    assert "tcess: 8 -> 4 experts per layer" in text and "calibration: 64 tokens" in text


@pytest.mark.parametrize("model, keep, message", [
    ("qwen", "0", "keeps no expert"),
    ("qwen", "17", "only 16 experts"),
    ("qwen", "2", "keep at least 4"),
    ("qwen", "2.5", "fraction in (0, 1]"),
    ("deepseek", "3", "keep a multiple of 2"),
])
def test_bad_keep_is_one_line_exit_2(workdir, model, keep, message, capsys):
    root, data = workdir
    code, _, err = run_cli(["prune", str(root / model), "--keep", keep, "--method", "frequency", "--calib", data,
                            "--out", str(root / "never")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (root / "never").exists()


def test_bad_method_lists_the_known_ones(workdir, capsys):
    root, data = workdir
    code, _, err = run_cli(["prune", str(root / "qwen"), "--keep", "8", "--method", "magic", "--calib", data,
                            "--out", str(root / "never")], capsys)
    assert code == 2 and "unknown pruning method 'magic'" in err
    assert all(name in err for name in ("random", "frequency", "tcess", "easy-ep", "naee"))


def test_existing_out_is_refused(workdir, capsys):
    root, data = workdir
    (root / "taken").mkdir(exist_ok=True)
    code, _, err = run_cli(["prune", str(root / "qwen"), "--keep", "8", "--method", "random", "--calib", data,
                            "--out", str(root / "taken")], capsys)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1


def test_bad_calib_is_one_line(workdir, capsys):
    root, _ = workdir
    code, _, err = run_cli(["prune", str(root / "qwen"), "--keep", "8", "--method", "random", "--calib",
                            str(root / "missing.txt"), "--out", str(root / "never")], capsys)
    assert code == 2 and "no such file" in err
