"""`moekit info`: the summary table / JSON, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

from tests.conftest import tiny_model
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-deepseek-v3"
    tiny_model("deepseek_v3").save_pretrained(path)
    return path


def test_info_json_describes_the_model(deepseek_dir, capsys):
    code, out, _ = run_cli(["info", str(deepseek_dir), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["model_type"] == "deepseek_v3"
    assert info["moe_layers"] == [1, 2] and info["dense_layers"] == [0]
    assert info["experts_per_layer"] == 8 and info["top_k"] == 2
    assert info["routing_rule"].startswith("sigmoid(+bias for selection) -> group top-1/2")
    assert info["shared_experts"] == "shared expert"
    # one expert: gate + up [16, 32] each, down [32, 16], float32
    assert info["bytes_per_expert"] == 3 * 16 * 32 * 4
    routed = 2 * 8 * 3 * 16 * 32
    assert info["params_routed_experts"] == routed
    assert info["params_total"] - info["params_active_per_token"] == routed - 2 * 2 * 3 * 16 * 32


def test_info_table(deepseek_dir, capsys):
    code, out, _ = run_cli(["info", str(deepseek_dir)], capsys)
    assert code == 0
    for text in ("DeepseekV3ForCausalLM", "3 (2 MoE, 1 dense)", "top-k", "active per token", "6.00 KiB (float32)"):
        assert text in out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing", "no model at"),
        (lambda tmp: tmp, "has no config.json"),
        (lambda tmp: (tmp / "config.json").write_text("{not json") and tmp, "cannot read"),
    ],
)
def test_bad_paths_fail_with_one_line(tmp_path, capsys, make, message):
    code, _, err = run_cli(["info", str(make(tmp_path))], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_dense_model_is_rejected_naming_supported_families(tmp_path, capsys):
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(tmp_path)
    code, _, err = run_cli(["info", str(tmp_path)], capsys)
    assert code == 2
    assert "'llama' is not a supported MoE family" in err and "mixtral" in err and "qwen3_moe" in err


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moekit", "info", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no model at") and "Traceback" not in proc.stderr


def test_info_on_a_600b_config_reads_no_weights(tmp_path, capsys):
    """README: `info` "reads only the config (meta device): instant even for a 600B checkpoint". A folder holding only
    DeepSeek-V3's config.json (671B parameters): info must succeed without a weight file to read, write nothing, and
    count the published sizes (671B total, 37B activated per token, arXiv 2412.19437), in seconds (0.3 s measured
    once imports are warm; the bound is loose for a loaded shared machine)."""
    import time

    transformers.DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
        norm_topk_prob=True, max_position_embeddings=163840).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    t0 = time.perf_counter()
    code, out, err = run_cli(["info", str(tmp_path), "--json"], capsys)
    elapsed = time.perf_counter() - t0
    assert code == 0, err
    info = json.loads(out)
    assert info["experts_per_layer"] == 256 and info["top_k"] == 8 and len(info["moe_layers"]) == 58
    assert info["params_total"] == pytest.approx(671e9, rel=1e-3)
    assert 37e9 <= info["params_active_per_token"] < 38e9
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    assert elapsed < 20, f"info took {elapsed:.1f} s on a config alone"
