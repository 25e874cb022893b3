"""HOBBIT's low-bit misses in the engine: off by default (lossless, tested in test_lossless.py); on, only misses whose
routing weight is below the threshold are read as low-bit copies (fewer bytes), never cached, and the output stays
close to the full-precision one."""

from __future__ import annotations

import torch

import moekit.models
import moekit.runtime as rt
from moekit.runtime.lowbit import build_lowbit
from tests.conftest import tiny_model
from tests.runtime.helpers import prompt_ids


def _run(tmp_path, threshold, bits=8):
    ref, model = tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
    view = moekit.models.load(model)
    rt.build_store(view, tmp_path)
    build_lowbit(tmp_path, bits, group_size=16)
    budget = rt.min_budget(view, rt.ExpertStore(tmp_path).expert_bytes)
    om = rt.offload(view, tmp_path, budget, prefetch=False, lowbit=bits, lowbit_threshold=threshold, record=True)
    return om, _decode(model), _decode(ref)


def _decode(model, n=12):
    """Logits of n tokens fed one at a time (decode steps: one token's routing weights per step) [n, V]."""
    past, out = None, []
    with torch.no_grad():
        for tok in prompt_ids(128, n)[0]:
            res = model(tok.view(1, 1), past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(res.logits[0, -1])
    return torch.stack(out)


def test_threshold_zero_reads_no_low_bit_copy_and_is_exact(tmp_path):
    om, got, want = _run(tmp_path, 0.0)
    assert om.totals()["lowbit_reads"] == 0 and torch.equal(got, want)
    om.close()


def test_low_weight_misses_read_low_bit_copies_only(tmp_path):
    threshold = 0.25  # the tiny model routes near-uniformly: top-4 weights 0.22-0.30, median 0.25
    om, got, want = _run(tmp_path, threshold)
    t = om.totals()
    assert t["lowbit_reads"] > 0, "no miss was below the threshold: the test would not exercise the path"
    assert not torch.equal(got, want)  # the output changed, which is why it is off by default
    rel = (got - want).norm() / want.norm()
    # measured 1.0e-4 (70 of 122 misses low-bit); 4-bit copies give 2.7e-3 and zeroed experts 1.4e-2, so 5e-4 tells an
    # 8-bit copy from a wrong or missing one (the bound was 1e-2, which zeroing nearly passed)
    assert rel < 5e-4, f"8-bit copies moved the logits by {rel:.3g}"
    full = rt.ExpertStore(tmp_path).expert_bytes
    for row, layer in zip(om.stats(), om.layers):
        assert layer.lowbit.expert_bytes < full / 3  # 8-bit codes + scales of a float32 expert
        # every miss is read once: full copies for important ones, low-bit copies for the rest
        assert row["bytes_read"] == (row["misses"] - row["lowbit_reads"]) * full + row["lowbit_reads"] * layer.lowbit.expert_bytes
        assert not set(layer.cache) - set(layer.policy.resident)  # low-bit copies never enter the cache
    # one decode-like step: a lone token's misses below the threshold go low-bit, the others full precision
    layer = om.layers[0]
    before = layer.stats.lowbit_reads
    h = torch.randn(1, layer.layer.experts.gate_up_proj.shape[-1])
    ids = torch.tensor([[0, 1, 2, 3]])
    weights = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    layer.cache.clear()
    for e in list(layer.policy.resident):
        layer.policy.discard(e)
    layer.forward(h, ids, weights)
    assert layer.stats.lowbit_reads - before == 2  # experts 2 and 3
    assert {0, 1} <= set(layer.cache) and not {2, 3} & set(layer.cache)
    om.close()
