"""A permuted checkpoint is the same model: it reloads with plain from_pretrained, its experts, router rows and biases
moved together, every token picks the same experts (through the permutation), and the logits are the original ones:
bit for bit where nothing sums over the expert axis (DeepSeek-V3's sigmoid router, GPT-OSS's softmax over the top-k,
two experts per token), within float32 rounding where the router's softmax over all E experts (computed in float32 by
HF even in a float64 model) or HF's eager loop over the top-4 (adding experts in id order) adds in a new order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import moekit.models
import moekit.placement as mp
from moekit.errors import UserError
from moekit.placement.checkpoint import checkpoint_order, write_permuted
from moekit.placement.plan import Plan, Topology
from tests.conftest import tiny_model
from tests.helpers import token_ids

DEMO = Path(__file__).resolve().parents[2] / "demo" / "model"


def _group_preserving_perm(rng, E, n_group):
    size = E // n_group
    return np.concatenate([g * size + rng.permutation(size) for g in rng.permutation(n_group)])


def _plan(view, seed=0, gpus=2):
    rng = np.random.default_rng(seed)
    rule = view.layers[0].rule
    rows = np.stack([_group_preserving_perm(rng, view.num_experts, rule.n_group) for _ in view.layers])
    topo = Topology(view.num_experts, gpus, num_groups=rule.n_group, topk_group=rule.topk_group, top_k=rule.top_k)
    return Plan(topo, rows, [m.index for m in view.layers], view.num_layers)


BIT_EXACT = {"deepseek_v3", "gpt_oss"}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _routing(model, ids) -> list[torch.Tensor]:
    """The experts each MoE layer's router picked, per token (sorted), [T, K] per layer."""
    view, picked = moekit.models.load(model), []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out, m=m: picked.append(m.parse_router_output(out)[2]))
             for m in view.layers]
    try:
        _logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return [p.sort(dim=-1).values for p in picked]


def _same_routing(original, permuted, ids, order) -> bool:
    old, new = _routing(original, ids), _routing(permuted, ids)
    return all(torch.equal(o, torch.as_tensor(order[i])[n].sort(dim=-1).values) for i, (o, n) in enumerate(zip(old, new)))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_permuted_checkpoint_gives_the_same_logits(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "model")
    view = moekit.models.load(model)
    plan = _plan(view)
    out = write_permuted(tmp_path / "model", plan, tmp_path / "out", {"method": "test"})
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager").eval()
    ids = token_ids(model)
    before, after = _logits(model, ids), _logits(reloaded, ids)
    order = checkpoint_order(plan, view.layers[0].rule.n_group)
    assert _same_routing(model, reloaded, ids, order)
    if family in BIT_EXACT:
        assert torch.equal(before, after)
    assert torch.allclose(before, after, rtol=0, atol=1e-5), (before - after).abs().max()
    new_view = moekit.models.load(reloaded)
    for i, (old, new) in enumerate(zip(view.layers, new_view.layers)):
        for p in (0, view.num_experts - 1):
            e = int(order[i][p])  # new expert p is old expert e: weights, router row and biases moved together
            assert all(torch.equal(v, new.get_expert(p)[k]) for k, v in old.get_expert(e).items())
            assert torch.equal(new.router_linear.weight[p], old.router_linear.weight[e])
            if old.correction_bias is not None:
                assert new.correction_bias[p] == old.correction_bias[e]
    assert (out / "compression.json").is_file()


def test_demo_model_permuted(tmp_path):
    view = moekit.models.load(DEMO)
    plan = _plan(view, seed=1, gpus=8)
    out = write_permuted(DEMO, plan, tmp_path / "out", {"method": "test"})
    a = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float64, experts_implementation="eager").eval()
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, experts_implementation="eager").eval()
    ids = token_ids(a, n=2, s=64)
    assert _same_routing(a, b, ids, checkpoint_order(plan, 1))
    diff = (_logits(a, ids) - _logits(b, ids)).abs().max().item()
    assert diff < 1e-4, diff  # only the router softmax's float32 sum over 32 experts is added in another order


def test_grouped_router_needs_a_group_aligned_plan(grouped_trace, tmp_path):
    model, trace = grouped_trace  # deepseek_v3: 8 experts in 2 groups of 4
    topo = Topology(8, 2, num_groups=2, topk_group=1, top_k=2)
    split = Plan(topo, np.array([[0, 1, 4, 5, 2, 3, 6, 7]] * 2), [1, 2], 3)  # GPU 0 holds half of each group
    with pytest.raises(UserError, match="plan with --method eplb --align-groups"):
        checkpoint_order(split, 2)
    rep = mp.place(trace, tmp_path / "p", mp.Cluster(2), "eplb", checkpoint=model,
                   options=mp.PlanOptions(align_groups=True))
    assert rep["solver"].startswith("EPLB, group-aligned") and (tmp_path / "p" / "checkpoint" / "config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p" / "checkpoint", dtype=torch.float32,
                                                    experts_implementation="eager").eval()
    original = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, experts_implementation="eager").eval()
    ids = token_ids(original)
    assert torch.equal(_logits(original, ids), _logits(reloaded, ids))
