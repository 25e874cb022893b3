"""The offloaded runtime reproduces the in-memory model exactly (float32): logits and greedy generation, at the minimum
budget (every step evicts) and with every expert resident, with and without prefetch (STYLE.md principle 2)."""

from __future__ import annotations

import pytest
import torch

import moekit.runtime as rt
from tests.runtime.helpers import offloaded, prompt_ids

FAMILIES = ["qwen3_moe", "deepseek_v3", "gpt_oss", "mixtral"]  # plain, shared experts + groups, biases/interleave/T


def _assert_equal(a, b, what):
    diff = (a - b).abs()
    assert torch.equal(a, b), f"{what}: max diff {diff.max():.3g}, mean diff {diff.mean():.3g}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", ["min", "all"])
def test_logits_and_generation_match_in_memory(family, budget, tmp_path):
    ref, model, om = offloaded(family, tmp_path, budget=None if budget == "min" else "1GB")
    x = prompt_ids(128, 13)
    with torch.no_grad():
        _assert_equal(model(x).logits, ref(x).logits, f"{family} logits, {budget} budget")
        out = model.generate(x, max_new_tokens=10, do_sample=False)
        assert torch.equal(out, ref.generate(x, max_new_tokens=10, do_sample=False)), f"{family} generation"
    t = om.totals()
    assert t["misses"] > 0
    if budget == "min":
        assert t["evictions"] > 0 and om.capacity == model.config.num_experts_per_tok
    om.close()


@pytest.mark.parametrize("policy", ["lfu", "lfru", "score"])
def test_every_policy_is_lossless_without_prefetch(policy, tmp_path):
    ref, model, om = offloaded("qwen3_moe", tmp_path, policy=policy, prefetch=False)
    x = prompt_ids(128, 9)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=8, do_sample=False)
        assert torch.equal(out, ref.generate(x, max_new_tokens=8, do_sample=False))
    assert om.totals()["prefetch_reads"] == 0
    om.close()


def test_fused_expert_weights_are_freed(tmp_path):
    _, model, om = offloaded("mixtral", tmp_path)
    for rt_layer in om.layers:
        assert all(p.device.type == "meta" for p in rt_layer.layer.expert_params())
    resident = sum(p.numel() for p in model.parameters() if p.device.type != "meta")
    assert resident < sum(p.numel() for p in model.parameters())
    om.close()


def test_store_files_are_plain_safetensors(tmp_path):
    from safetensors import safe_open

    import moekit.models
    from tests.conftest import tiny_model

    view = moekit.models.load(tiny_model("gpt_oss"))
    rt.build_store(view, tmp_path)
    store = rt.ExpertStore(tmp_path)
    layer = view.layers[1]
    w = store.read(layer.index, 5)
    with safe_open(str(tmp_path / f"layer_{layer.index:03d}.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("00005.gate_up"), w["gate_up"])
    from moekit.runtime.store import canonical

    expect = layer.get_expert(5)
    got = canonical(w, layer.layout)
    assert set(got) == set(expect) and all(torch.equal(got[k], expect[k]) for k in expect)
    store.close()


def test_llama4_is_declared_unsupported(tmp_path):
    import moekit.models
    from moekit.errors import UserError
    from tests.conftest import tiny_model

    view = moekit.models.load(tiny_model("llama4_text"))
    with pytest.raises(UserError, match="not supported"):
        rt.offload(view, tmp_path, "1GB")


@pytest.mark.parametrize("drop_cache", [False, True])
def test_store_reads_are_exact_buffered_and_uncached(drop_cache, tmp_path):
    import moekit.models
    from tests.conftest import tiny_model

    view = moekit.models.load(tiny_model("qwen3_moe"))
    rt.build_store(view, tmp_path)
    store = rt.ExpertStore(tmp_path, drop_cache=drop_cache)
    from moekit.runtime.store import canonical

    for layer in view.layers:
        for e in (0, 7, layer.num_experts - 1):  # first, middle, last (the aligned read runs past the end of file)
            got = canonical(store.read(layer.index, e), layer.layout)
            assert all(torch.equal(got[k], v) for k, v in layer.get_expert(e).items())
    store.close()
