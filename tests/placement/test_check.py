"""The structural checker (written from the engines' rules) rejects every kind of broken file it guards against."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moekit.placement.check import eplb_problems, sglang_file_problems, sglang_map_problems
from moekit.placement.plan import Plan, Topology

KW = dict(num_hidden_layers=3, num_experts=4, gpus=2, moe_layers=[1, 2])
GOOD = [[0, 1, 2, 3, 0, 1], [3, 0, 1, 2, 0, 1], [2, 3, 0, 1, 1, 0]]  # row 0 (dense) trivial: arange(6) % 4


def test_good_map_passes():
    assert sglang_map_problems(GOOD, **KW) == []


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m[:2], "2 rows, the model has 3"),
    (lambda m: [m[0], m[1][:5], m[2]], "different lengths"),
    (lambda m: [r[:5] for r in m], "5 physical experts per row do not split over 2 GPUs"),
    (lambda m: [m[0], [3, 0, 1, 2, 0, 4], m[2]], r"entries outside \[0, 4\)"),
    (lambda m: [m[0], [3, 0, 1, 0, 0, 1], m[2]], r"experts \[2\] have no slot"),
    (lambda m: [m[0], [3, 0, 1, 2, 0, -1], m[2]], "outside"),
    (lambda m: [[1, 0, 2, 3, 0, 1], m[1], m[2]], "row 0 is a dense layer but not the trivial row"),
    (lambda m: [m[0], [3.0, 0, 1, 2, 0, 1], m[2]], "entries must be integers"),
])
def test_broken_maps_fail(mutate, message):
    problems = sglang_map_problems(mutate([list(r) for r in GOOD]), **KW)
    assert any(message in p or __import__("re").search(message, p) for p in problems), problems


def test_sglang_file_needs_exactly_one_key(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"physical_to_logical_map": GOOD, "logical_count": []}))
    assert "single key" in sglang_file_problems(tmp_path / "a.json", **KW)[0]
    (tmp_path / "b.json").write_text(json.dumps({"physical_to_logical_map": GOOD}))
    assert sglang_file_problems(tmp_path / "b.json", **KW) == []


def test_eplb_tensors():
    plan = Plan(Topology(4, 2, redundant=2), np.array(GOOD[1:]), [1, 2], 3)
    args = (plan.phy2log, plan.log2phy, plan.logcnt)
    assert eplb_problems(*args, num_experts=4, gpus=2) == []
    assert plan.log2phy[0, 0].tolist() == [1, 4] and plan.log2phy[0, 2].tolist() == [3, -1]
    bad_cnt = plan.logcnt.copy()
    bad_cnt[0, 0] += 1
    assert any("replica count" in p for p in eplb_problems(plan.phy2log, plan.log2phy, bad_cnt, num_experts=4, gpus=2))
    bad_l2p = plan.log2phy.copy()
    bad_l2p[1, 0, 0] = 5
    assert any("exactly its slots" in p for p in eplb_problems(plan.phy2log, bad_l2p, plan.logcnt, num_experts=4,
                                                               gpus=2))
    assert any("int64" in p for p in eplb_problems(plan.phy2log.astype(np.int32), plan.log2phy, plan.logcnt,
                                                   num_experts=4, gpus=2))
