"""analyze_arrays: one JSON-serialisable results dict consistent with the individual functions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moekit.analysis import (
    cache_hit_rates,
    coactivation,
    segment_cache_hit_rate,
    segment_routing_performance,
    summarise_layer,
)
from moekit.analysis.run import analyze_arrays, to_json


def _trace(rng, n_tok=120, n_experts=6, top_k=2, n_layers=3):
    seq = np.repeat([0, 1, 2], [50, 40, 30])[:n_tok]
    layers = []
    for _ in range(n_layers):
        ids = np.argsort(rng.random((n_tok, n_experts)), axis=1)[:, :top_k]
        w = rng.random((n_tok, top_k)) + 0.1
        layers.append({"ids": ids, "weights": -np.sort(-w, axis=1), "logits": rng.normal(size=(n_tok, n_experts))})
    meta = {"position": np.concatenate([np.arange(50), np.arange(40), np.arange(30)]),
                "token_id": rng.integers(0, 20, n_tok), "domain": np.repeat([0, 1, 0], [50, 40, 30])}
    return layers, seq, meta


def test_results_are_json_and_match_the_functions():
    rng = np.random.default_rng(0)
    layers, seq, meta = _trace(rng)
    timings = {}
    res = analyze_arrays(layers, seq, 6, domain_names=["code", "prose"], output_max=rng.random((3, 6)) + 1,
                         segment_lengths=(4, 16), npmi_min_count=2, timings=timings, **meta)
    json.dumps(res, allow_nan=False)  # strictly valid JSON: NaN became null
    assert (res["n_tokens"], res["n_layers"], res["n_experts"], res["n_sequences"]) == (120, 3, 6, 3)
    assert res["cache"]["capacities"][0] == [2, 4, 6, 8]
    for layer, tr in enumerate(layers):
        s = summarise_layer(tr["ids"], 6, seq, tr["weights"], tr["logits"])
        assert res["layers"][layer]["global_lbl"] == pytest.approx(s.global_lbl)
        assert res["coactivation"][layer] == coactivation(tr["ids"], 6).tolist()
        for policy in ("lru", "lfu", "belady", "opt"):
            np.testing.assert_allclose(res["cache"][policy][layer], cache_hit_rates(tr["ids"], seq, 6, [2, 4, 6, 8],
                                                                                    policy))
        np.testing.assert_allclose(res["locality"]["sch"][layer],
                                   segment_cache_hit_rate(tr["ids"], seq, 6, [2, 4, 6, 8], (4, 16)))
        np.testing.assert_allclose(res["locality"]["srp"][layer],
                                   segment_routing_performance(tr["ids"], seq, 6, (4, 16)).f1)
    assert len(res["affinity"]) == 2 and res["affinity"][0]["from"] == 0
    assert res["domains"]["names"] == ["code", "prose"] and len(res["domains"]["jsd"]) == 3
    assert len(res["npmi"]) == 3 and len(res["npmi"][0]["token_ids"]) == 6
    assert {"srp", "sch m=4", "cache opt"} <= set(timings)
    assert all(v["wall"] >= 0 and v["cpu"] >= 0 for v in timings.values())


def test_optional_parts_and_mixed_top_k():
    rng = np.random.default_rng(1)
    layers, seq, _ = _trace(rng)
    layers[1] = {"ids": np.argsort(rng.random((120, 6)), axis=1)[:, :3]}  # top-3 layer, no weights or logits
    res = analyze_arrays(layers, seq, 6, segment_lengths=(4,))
    json.dumps(res, allow_nan=False)
    assert "domains" not in res and "npmi" not in res and "super_experts" not in res
    assert res["cache"]["capacities"][1] == [3, 6, 9, 12] and res["cache"]["capacities"][0] == [2, 4, 6, 8]
    assert res["layers"][1]["entropy_source"] == "none" and res["layers"][1]["global_lbl"] is None
    np.testing.assert_allclose(res["cache"]["lru"][1], cache_hit_rates(layers[1]["ids"], seq, 6, [3, 6, 9, 12]))


def test_to_json_replaces_non_finite():
    assert to_json({"a": np.array([1.0, np.nan]), "b": np.float32(np.inf), "c": (np.int64(2),)}) == {
        "a": [1.0, None], "b": None, "c": [2]}


@pytest.mark.parametrize("bad", ["positions", "tokens", "empty"])
def test_bad_input_raises(bad):
    rng = np.random.default_rng(2)
    layers, seq, meta = _trace(rng)
    if bad == "positions":
        meta["position"] = meta["position"][::-1].copy()
    elif bad == "tokens":
        layers[2] = {"ids": layers[2]["ids"][:-1]}
    else:
        layers = []
    with pytest.raises(ValueError):
        analyze_arrays(layers, seq, 6, **meta)
