"""Saved checkpoints carry the per-expert key names vLLM and SGLang load (README: "per-expert keys (the format vLLM and
SGLang load)").

Both engines load routed experts through `FusedMoE.make_expert_params_mapping(ckpt_gate_proj_name, ckpt_down_proj_name,
ckpt_up_proj_name, num_experts)`, which matches checkpoint names containing `experts.{expert_id}.{weight_name}.`:
gate_proj / down_proj / up_proj for Qwen-MoE and DeepSeek (vllm/model_executor/models/qwen3_moe.py, deepseek_v2.py;
sglang/srt/models/qwen3_moe.py), w1 / w2 / w3 for Mixtral (vllm/model_executor/models/mixtral.py). GPT-OSS is the
exception: its checkpoints and both loaders use fused `experts.gate_up_proj` / `experts.down_proj` tensors, so it is
not in this table. For every pruned, merged and quantised checkpoint below, each MoE layer must hold exactly
experts 0..E'-1 with the three projections under those names, and no fused expert tensor."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

import moekit.models
from moekit.compress import merge as merging
from moekit.compress import prune as pruning
from moekit.compress.calib import collect
from moekit.compress.checkpoint import save_checkpoint
from moekit.compress.quantize import quantize
from tests.conftest import tiny_model
from tests.helpers import token_ids

# model_type -> (MoE module path under model.layers.{L}, the three checkpoint names vLLM's mapping is built with)
EXPERT_KEYS = {
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v3": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
}


def _keys(folder) -> set[str]:
    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            keys |= set(s.keys())
    return keys


def _assert_vllm_expert_keys(folder, family: str, layers: list[int], num_experts: int) -> None:
    block, names = EXPERT_KEYS[family]
    keys = _keys(folder)
    assert not [k for k in keys if re.search(r"\.experts\.(gate_up_proj|down_proj|up_proj)\b", k)], "fused experts"
    pattern = re.compile(rf"^model\.layers\.(\d+)\.{block}\.experts\.(\d+)\.(\w+)\.weight$")
    found = {}
    for k in keys:
        if m := pattern.match(k):
            found.setdefault(int(m[1]), set()).add((int(m[2]), m[3]))
    assert sorted(found) == layers
    for layer, got in found.items():
        assert got == {(e, n) for e in range(num_experts) for n in names}, f"layer {layer}"


def _saved(model, tmp_path, name, **kw):
    return save_checkpoint(model, tmp_path / name, report={}, **kw)


@pytest.mark.parametrize("family", sorted(EXPERT_KEYS))
def test_pruned_merged_and_quantised_checkpoints_have_vllm_expert_keys(family, tmp_path):
    def fresh():
        model = tiny_model(family)
        view = moekit.models.load(model)
        return model, view, [m.index for m in view.layers], view.num_experts

    model, view, layers, e = fresh()
    stats = pruning.collect_stats(view, [token_ids(model, 2, 16)], 32)
    pruning.prune_view(view, stats, e - 2, "frequency")  # keeps a multiple of n_group (2) for deepseek_v3
    _assert_vllm_expert_keys(_saved(model, tmp_path, "pruned"), family, layers, e - 2)

    model, view, layers, e = fresh()
    merging.merge(view, collect(view, [token_ids(model, 2, 16)]), e // 2)
    _assert_vllm_expert_keys(_saved(model, tmp_path, "merged"), family, layers, e // 2)

    model, view, layers, e = fresh()
    q = quantize(view, 4, method="rtn", group_size=16)
    out = _saved(model, tmp_path, "quantised", extra=q.write)
    _assert_vllm_expert_keys(out, family, layers, e)
    assert (out / "quantized").is_dir()
    reloaded = moekit.models.load(out)  # and the names are not just names: transformers loads them back, fused
    assert torch.equal(reloaded.layers[-1].get_expert(e - 1)["down"], view.layers[-1].get_expert(e - 1)["down"])
