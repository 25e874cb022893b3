"""The engines' constraints, refused with one line before anything is written."""

from __future__ import annotations

import pytest

from moekit.errors import UserError
from moekit.placement.plan import Topology


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=32, gpus=3), r"\(E \+ R\) % G == 0\): use --redundant 1, 4, 7"),
    (dict(num_experts=32, gpus=4, redundant=3), r"35 physical experts do not split evenly over 4 GPUs"),
    (dict(num_experts=32, gpus=6, nodes=4, redundant=4), "not a multiple of --nodes 4"),
    (dict(num_experts=30, gpus=2, num_groups=4), "4 expert groups do not divide 30 experts"),
    (dict(num_experts=32, gpus=4, num_groups=8, topk_group=1, top_k=8), r"top-8 is more than topk_group x experts"),
    (dict(num_experts=32, gpus=4, num_groups=8, topk_group=9), r"topk_group 9 must be in \[1, n_group = 8\]"),
    (dict(num_experts=32, gpus=0), "need --gpus >= 1"),
])
def test_refusals(kwargs, message):
    with pytest.raises(UserError, match=message):
        Topology(**kwargs)


def test_valid_shapes():
    t = Topology(num_experts=256, gpus=32, nodes=4, redundant=32, num_groups=8, topk_group=4, top_k=8)
    assert (t.slots, t.slots_per_gpu, t.gpus_per_node) == (288, 9, 8)
    assert t.gpu_of_slot()[[0, 8, 9, 287]].tolist() == [0, 0, 1, 31]
    assert t.node_of_gpu()[[0, 7, 8, 31]].tolist() == [0, 0, 1, 3]
    assert t.hierarchical() and not Topology(256, 32, nodes=4, num_groups=2, top_k=8, topk_group=2).hierarchical()
    assert Topology(num_experts=32, gpus=4, num_groups=8, topk_group=1, top_k=4).top_k == 4  # 4 <= 1 x 32 / 8
