"""Policies on the offloaded runtime, in traces and in the simulator: offloaded logits under a policy equal in-memory
logits under it, dropped slots cost no read and no cache access, traces record what the policy selected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moekit.models
import moekit.routing as R
import moekit.trace
from moekit.runtime.simulate import simulate
from tests.runtime.helpers import offloaded, prompt_ids
from tests.trace.helpers import save_checkpoint, write_corpus


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("spec", ["top-p=0.15", "skip=0.9", "rank=1"])
def test_offloaded_logits_under_a_policy_equal_in_memory(family, spec, tmp_path):
    ref, model, om = offloaded(family, tmp_path, budget="1GB", record=True, prefetch=False)
    x = prompt_ids(128, 13)
    routing = R.parse(spec)
    with R.apply(moekit.models.load(ref), routing), torch.no_grad():
        want = ref(x).logits
    with R.apply(om.view, routing), torch.no_grad():
        got = model(x).logits
    if family in R.NO_SENTINEL:  # in memory a dropped slot runs as the token's first expert x 0 (apply.py): one more
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # GEMM row, rounding may differ by an ulp
    else:
        assert torch.equal(got, want), f"{family} {spec}: max diff {(got - want).abs().max():.3g}"
    # dropped slots: no read, no lookup -- the lookups are exactly the distinct real experts of each step
    E = om.view.num_experts
    routing_ids = om.routing()
    assert any(((ids < E).sum(1) < om.view.top_k).any() for ids in routing_ids), "no token kept fewer than K"
    for rt_layer, ids in zip(om.layers, routing_ids):
        real = len(set(ids[ids < E].tolist()))
        c = rt_layer.policy.counters()
        assert c["hits"] + c["misses"] == real
        assert rt_layer.stats.demand_bytes == c["misses"] * rt_layer.store.expert_bytes
    om.close()


def test_fewer_active_experts_read_fewer_bytes(tmp_path):
    """At the minimum budget, rank=0 (one expert per token) reads less than the stock top-4."""
    read = {}
    for spec in (None, "rank=0"):
        _, model, om = offloaded("qwen3_moe", tmp_path / str(spec), prefetch=False)
        om_hooks = R.attach(om.view)
        om_hooks.set_all(R.parse(spec))
        with torch.no_grad():
            model.generate(prompt_ids(128, 8), max_new_tokens=12, do_sample=False)
        read[spec] = om.totals()["bytes_read"]
        om.close()
    assert read["rank=0"] < read[None]


def test_trace_records_the_policy_and_the_simulator_replays_it(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt")
    txt, _ = write_corpus(tmp_path / "data")
    out = moekit.trace.record(ckpt, [str(txt)], tmp_path / "trace", routing=R.parse("top-p=0.5"),
                              options=moekit.trace.TraceOptions(seq_len=32))
    t = moekit.trace.open(tmp_path / "trace")
    assert out["routing"]["spec"] == "top-p=0.5" and t.width == t.num_experts == 16 and t.sentinel == 16
    ids, w = t.ids(t.layers[0]), t.weights(t.layers[0])
    kept = (ids < 16).sum(1)
    assert kept.min() >= 1 and kept.max() > 4 and kept.min() < kept.max()  # variable K
    assert (w[ids == 16] == 0).all() and (np.diff(w, axis=1) <= 0).all()
    assert t.counts().shape == (len(t.layers), 16) and t.counts().sum() == sum((t.ids(l) < 16).sum() for l in t.layers)
    layers = [t.ids(l) for l in t.layers]
    (r,) = simulate(layers, num_experts=16, top_k=t.top_k, expert_bytes=1, policies_=("lru",), capacities=(2,))
    assert r.hits + r.misses == sum(
        len(set(row[row < 16].tolist())) for ids in layers for row in ids)  # one token a step: sentinels unseen


def test_trace_resume_refuses_another_policy(tmp_path):
    from moekit.errors import UserError

    ckpt = save_checkpoint(tmp_path / "ckpt")
    txt, _ = write_corpus(tmp_path / "data")
    opts = moekit.trace.TraceOptions(seq_len=32)
    moekit.trace.record(ckpt, [str(txt)], tmp_path / "t", routing=R.parse("skip=0.5"), options=opts)
    with pytest.raises(UserError, match="routing differs"):
        moekit.trace.record(ckpt, [str(txt)], tmp_path / "t", routing=R.parse("skip=0.6"), options=opts, resume=True)
