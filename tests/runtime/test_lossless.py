"""The offloaded runtime reproduces the in-memory model exactly (float32): logits and greedy generation, at the minimum
budget (every step evicts) and with every expert resident, with and without prefetch (a fast path reproduces its slow
reference)."""

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


@pytest.mark.parametrize("reorder_bytes", [0, 1 << 30])
def test_large_steps_in_id_order_and_small_steps_hits_first_are_both_exact(reorder_bytes, tmp_path, monkeypatch):
    """forward computes small steps' hits before their misses and large steps (prefill) in expert-id order; both sum in
    eager's order, so both reproduce the in-memory logits bit for bit."""
    import moekit.runtime.engine as engine

    monkeypatch.setattr(engine, "_REORDER_BYTES", reorder_bytes)
    ref, model, om = offloaded("mixtral", tmp_path, prefetch=False)
    x = prompt_ids(128, 17)
    with torch.no_grad():
        _assert_equal(model(x).logits, ref(x).logits, f"reorder limit {reorder_bytes}")
        out = model.generate(x, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, ref.generate(x, max_new_tokens=6, do_sample=False))
    assert om.totals()["misses"] > 0
    om.close()


def test_hits_computed_before_misses_still_sum_in_eager_order(tmp_path):
    """A step whose highest expert is resident and whose lower ones are misses: the hit is computed first, yet the
    output equals transformers' eager experts bit for bit (summed in ascending id)."""
    ref, model, om = offloaded("qwen3_moe", tmp_path, budget="1GB", prefetch=False)
    layer = om.layers[0]
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, hidden, generator=g)  # [T, H]
    weights = torch.rand(64, 4, generator=g)  # [T, K]
    layer.forward(x[:1], torch.tensor([[7, 8, 9, 10]]), weights[:1])  # makes 7 resident
    assert 7 in layer.cache and not {0, 1, 2} & set(layer.cache)
    ids = torch.tensor([[0, 1, 2, 7]]).repeat(64, 1)  # [T, K]: three misses, then the hit
    got = layer.forward(x, ids, weights)
    experts = ref.model.layers[layer.layer.index].mlp.experts
    assert torch.equal(got, experts(x, ids, weights))
    om.close()
