"""Expert merging (M-SMoE, HC-SMoE): permutation invariance, G = E identity, alignment helps, groupings on constructed
cases, and merged checkpoints that reload with plain from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moekit.models
from moekit.compress.calib import collect
from moekit.compress.checkpoint import save_checkpoint
from moekit.compress.merge import (
    alignment,
    apply_merge,
    hcsmoe_groups,
    low_rank,
    merge,
    merge_group,
    msmoe_groups,
    permute,
    plan_merge,
)
from moekit.errors import UserError
from moekit.ops.reference import expert_mlp
from tests.conftest import tiny_model
from tests.helpers import token_ids


def _cal(view, n=4):
    return collect(view, [token_ids(view.model, 2, 16, seed=i) for i in range(n)])


from tests.helpers import logits as _logits  # noqa: E402


def test_permuted_expert_computes_the_same_function(family):
    layer = moekit.models.load(tiny_model(family)).layers[0]
    w = layer.get_expert(1)
    perm = torch.randperm(w["down"].shape[1], generator=torch.Generator().manual_seed(0))
    x = torch.randn(7, w["down"].shape[0])
    torch.testing.assert_close(expert_mlp(x, permute(w, perm), layer.activation), expert_mlp(x, w, layer.activation),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_alignment_recovers_a_hidden_permutation(model_type):
    w = moekit.models.load(tiny_model(model_type)).layers[0].get_expert(0)
    hidden = torch.randperm(w["down"].shape[1], generator=torch.Generator().manual_seed(1))
    shuffled = permute(w, hidden)
    aligned = permute(shuffled, alignment(w, shuffled))
    assert all(torch.equal(aligned[k], w[k]) for k in w)


@pytest.mark.parametrize("method", ["msmoe", "hcsmoe"])
def test_g_equals_e_reproduces_logits_exactly(family, method):
    model = tiny_model(family)
    view = moekit.models.load(model)
    if view.seq2seq or view.adapter.fixed_count or not all(m.predictable for m in view.layers):
        with pytest.raises(UserError, match=f"moekit merge`.*{view.model_type}"):
            merge(view, None, view.num_experts, method=method)  # refused before calibration data is used
        pytest.skip(f"{family}: merging does not apply (refused in one line)")
    ids = token_ids(model)
    before = _logits(model, ids)
    merge(view, _cal(view, 2), view.num_experts, method=method, router="average")
    assert torch.equal(_logits(model, ids), before)


def test_msmoe_groups_follow_usage_and_router_similarity():
    f = torch.tensor([0.4, 0.3, 0.2, 0.1])
    sim = torch.eye(4)
    sim[2, 1] = sim[1, 2] = 0.9  # expert 2 routes like 1
    sim[3, 0] = sim[0, 3] = 0.8  # expert 3 routes like 0
    assert msmoe_groups(f, sim, 2) == [[0, 3], [1, 2]]


def test_hcsmoe_groups_cluster_expert_outputs():
    features = torch.tensor([[0.0, 0], [0.1, 0], [5, 5], [5.1, 5], [5, 5.2]], dtype=torch.float64)
    f = torch.tensor([0.1, 0.3, 0.1, 0.1, 0.4])
    assert hcsmoe_groups(features, f, 2) == [[1, 0], [4, 2, 3]]  # dominant (most used) first


def test_merge_weights_are_usage_weighted():
    a = {"gate": torch.ones(2, 3), "up": torch.ones(2, 3), "down": torch.ones(3, 2)}
    b = {k: 4 * v for k, v in a.items()}
    out = merge_group([a, b], torch.tensor([3.0, 1.0]), align=False)
    assert all(torch.allclose(v, torch.full_like(v, 1.75)) for v in out.values())


def _permuted_copies_model(noise=0.0):
    """A model whose experts are permuted (and slightly perturbed) copies of expert 0: merging should lose ~nothing
    once aligned, and a lot without alignment."""
    model = tiny_model("qwen3_moe")
    view = moekit.models.load(model)
    g = torch.Generator().manual_seed(0)
    for layer in view.layers:
        base = layer.get_expert(0)
        for e in range(1, layer.num_experts):
            w = permute(base, torch.randperm(base["down"].shape[1], generator=g))
            layer.set_expert(e, {k: v + noise * torch.randn(v.shape, generator=g) for k, v in w.items()})
    return model, view


def test_alignment_helps_merging_permuted_copies():
    errors = {}
    for align in (True, False):
        _, view = _permuted_copies_model(noise=1e-3)
        cal = _cal(view)
        report = merge(view, cal, 4, method="msmoe", align=align)
        errors[align] = max(report["layer_relative_error"].values())
    assert errors[True] < 0.05 < errors[False], errors


@pytest.mark.parametrize("router", ["dominant", "average"])
@pytest.mark.parametrize("model_type", ["deepseek_v3", "gpt_oss"])  # correction bias; router bias + expert biases
def test_merged_checkpoint_reloads_with_same_logits(tmp_path, router, model_type):
    model = tiny_model(model_type)
    view = moekit.models.load(model)
    layer = view.layers[0]
    rows, bias = layer.router.weight.detach().clone(), layer.correction_bias
    bias = None if bias is None else bias.clone()
    cal = _cal(view)
    plan = plan_merge(view, cal, 4, "msmoe")
    f, groups = plan.usage[layer.index], plan.groups[layer.index]
    apply_merge(view, plan, router=router)
    assert view.num_experts == 4 and view.config.num_experts_per_tok <= 4
    for slot, members in enumerate(groups):
        idx = torch.tensor(members)
        c = f[idx] / f[idx].sum() if router == "average" and f[idx].sum() > 0 else None
        want = rows[members[0]] if c is None or len(members) == 1 else (c[:, None] * rows[idx].double()).sum(0).float()
        torch.testing.assert_close(layer.router.weight[slot].detach(), want)
        if bias is not None and router == "dominant":
            assert layer.correction_bias[slot] == bias[members[0]]
    ids = token_ids(model)
    expected = _logits(model, ids)
    out = save_checkpoint(model, tmp_path / "merged", report={"method": "merge"})
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager").eval()
    assert torch.equal(_logits(reloaded, ids), expected)


def test_report_lists_groups_bytes_and_policy():
    view = moekit.models.load(tiny_model("mixtral"))
    report = merge(view, _cal(view), 4, method="hcsmoe", router="average", rank=4)
    json.dumps(report)
    assert report["router_policy"] == "average" and report["aligned"] is False
    members = sorted(e for g in report["groups_per_layer"]["0"] for e in g["members"])
    assert members == list(range(8))
    assert report["after"]["expert_bytes"] == report["before"]["expert_bytes"] // 2
    assert report["low_rank_expert_params"] < sum(p.numel() for m in view.layers for p in m.expert_params())


def test_low_rank_is_the_best_rank_r_approximation():
    w = torch.randn(12, 8, dtype=torch.float64)
    assert torch.linalg.matrix_rank(low_rank(w, 3)) == 3
    torch.testing.assert_close(low_rank(w, 8), w)


def test_bad_group_counts_are_user_errors():
    view = moekit.models.load(tiny_model("mixtral"))
    with pytest.raises(UserError, match="between top-k"):
        plan_merge(view, _cal(view, 1), 1, "msmoe")
    with pytest.raises(UserError, match="unknown merge method"):
        plan_merge(view, _cal(view, 1), 4, "nope")
