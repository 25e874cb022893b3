"""The simulator and the runtime agree exactly: record the runtime's routing while it generates, replay it in the
simulator with the same step grouping, compare hit/miss/eviction counters per layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.runtime.simulate import replay_layer
from tests.runtime.helpers import offloaded, prompt_ids


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru", "score"])
def test_simulator_replays_runtime_counters(policy, tmp_path):
    _, model, om = offloaded("qwen3_moe", tmp_path, budget=None, policy=policy, record=True)
    om_capacity = om.capacity
    with torch.no_grad():
        model.generate(prompt_ids(128, 7), max_new_tokens=12, do_sample=False)  # one prefill step + decode steps
    for rt in om.layers:
        steps = [r.shape[0] for r in rt.stats.routing]
        ids = np.concatenate(rt.stats.routing)
        weights = np.concatenate(rt.stats.routing_weights) if policy == "score" else None
        sim = replay_layer(ids, policy, om_capacity, weights, step_sizes=steps)
        assert sim.counters() == rt.policy.counters(), f"layer {rt.layer.index}"
        assert rt.policy.counters()["hits"] > 0
    om.close()
