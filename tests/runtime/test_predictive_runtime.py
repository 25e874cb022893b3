"""The `predictive` policy in the runtime: the simulator replays its counters exactly, logits stay lossless, the
predictor's prefetch targets, and the options' one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moekit.models
import moekit.runtime as rt
from moekit.errors import UserError
from moekit.runtime.simulate import replay_layer
from tests.runtime.helpers import offloaded, prompt_ids, random_predictor


def _offloaded(tmp_path, multiple: int = 2, **options):
    """The tiny Qwen3-MoE offloaded with `multiple` x top-k experts per layer (at 1x every eviction is forced)."""
    from tests.conftest import tiny_model

    view = moekit.models.load(tiny_model("qwen3_moe"))
    budget = multiple * rt.min_budget(view, view.bytes_per_expert())
    return offloaded("qwen3_moe", tmp_path, policy="predictive", predictor=random_predictor(view), budget=budget,
                     **options)


def test_simulator_replays_the_runtime_counters(tmp_path):
    _, model, om = _offloaded(tmp_path, record=True, prefetch=False)
    lfru = []
    with torch.no_grad():
        model.generate(prompt_ids(128, 7), max_new_tokens=12, do_sample=False)  # one prefill step + decode steps
    for layer in om.layers:
        steps = [r.shape[0] for r in layer.stats.routing]
        ids = np.concatenate(layer.stats.routing)
        forecasts = np.full((ids.shape[0], om.view.num_experts), np.nan, np.float16)
        forecasts[np.cumsum(steps) - 1] = np.stack(layer.stats.forecasts)  # a step's forecast sits on its last token
        sim = replay_layer(ids, "predictive", om.capacity, step_sizes=steps, forecasts=forecasts)
        assert sim.counters() == layer.policy.counters(), f"layer {layer.layer.index}"
        assert layer.policy.counters()["hits"] > 0
        lfru.append(replay_layer(ids, "lfru", om.capacity, step_sizes=steps).counters() != sim.counters())
    assert any(lfru), "the forecasts never changed a decision: this test could not tell them from LFRU"
    om.close()


@pytest.mark.parametrize("prefetch", [False, True])
def test_logits_stay_lossless(tmp_path, prefetch):
    ref, model, om = _offloaded(tmp_path, prefetch=prefetch)
    x = prompt_ids(128, 11)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
        out = model.generate(x, max_new_tokens=10, do_sample=False)
        assert torch.equal(out, ref.generate(x, max_new_tokens=10, do_sample=False))
    t = om.totals()
    assert t["evictions"] > 0
    assert (t["prefetch_reads"] > 0) == prefetch
    om.close()


def test_prefetch_follows_the_predictor_into_the_next_token(tmp_path):
    """With a predictor, every layer's prefetch set is the previous layer's routing-head prediction, and the last layer
    prefetches the next token's first layer (pre-gating cannot: layer 0 has no earlier layer)."""
    _, model, om = _offloaded(tmp_path, prefetch=True)
    seen = []
    first = om.layers[0]
    original = first.prefetch
    first.prefetch = lambda x, predicted=None: (seen.append(predicted), original(x, predicted))[1]
    with torch.no_grad():
        model.generate(prompt_ids(128, 5), max_new_tokens=4, do_sample=False)
    assert len(seen) == 4 and all(isinstance(p, set) and p for p in seen)  # after each token's last layer
    assert first.stats.predicted > 0
    om.close()


def test_options_need_a_predictor_for_predictive(tmp_path):
    with pytest.raises(UserError, match="pass --predictor"):
        rt.RuntimeOptions(policy="predictive")
    with pytest.raises(UserError, match="no predictor at"):
        rt.RuntimeOptions(policy="predictive", predictor=tmp_path / "none.safetensors")


def test_open_refuses_a_predictor_of_another_model_before_building_the_store(tmp_path, monkeypatch):
    from tests.conftest import tiny_model
    from tests.trace.helpers import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "ckpt", "qwen3_moe")
    other = random_predictor(moekit.models.load(tiny_model("mixtral"))).save(tmp_path / "p.safetensors")
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="trained for a mixtral"):
        rt.open_offloaded(ckpt, rt.RuntimeOptions(policy="predictive", predictor=other))
    assert not (tmp_path / "cache").exists()
