"""Expert pruning methods: keeping every expert is the identity; pruned checkpoints reload with the same logits; each
score is checked against a hand computation; NAEE's enumeration finds the brute-force best set."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import moekit.models
from moekit.compress import prune as pr
from moekit.compress.calib import Calibration
from moekit.compress.checkpoint import save_checkpoint
from moekit.compress.edit import keep_experts
from moekit.ops.reference import reference_moe_forward
from tests.conftest import tiny_model

METHODS = sorted(pr.METHODS)


def _ids(seed=1):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _stats(view, method="naee", tokens=64, seq=16):
    batches = [_ids(10 + i) for i in range(tokens // 32 + 1)]
    return pr.collect_stats(view, batches, tokens, residual=pr.METHODS[method].needs_residual, sample_len=seq)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "llama4_text"])
@pytest.mark.parametrize("method", METHODS)
def test_keeping_every_expert_reproduces_logits_exactly(method, family):
    model = tiny_model(family)
    before = _logits(model, _ids())
    view = moekit.models.load(model)
    plan = pr.prune_view(view, _stats(view, method), view.num_experts, method)
    assert all(ids == list(range(view.num_experts)) for ids in plan.keep.values())
    assert torch.equal(_logits(model, _ids()), before)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("method", METHODS)
def test_pruned_checkpoint_reloads_with_same_logits(method, family, tmp_path):
    model = tiny_model(family)
    view = moekit.models.load(model)
    E, n = view.num_experts, 4
    plan = pr.prune_view(view, _stats(view, method), n, method)
    expected = _logits(model, _ids())
    rep = pr.report(plan, source="tiny", num_experts=E, n=n, calib={"tokens": 64}, opts=pr.PruneOptions(),
                    bytes_before=1, bytes_after=0)
    out = save_checkpoint(model, tmp_path / "pruned", report=rep)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager").eval()
    assert moekit.models.load(reloaded).num_experts == n
    assert torch.equal(_logits(reloaded, _ids()), expected)
    for layer in rep["layers"].values():
        assert sorted(layer["kept"] + layer["dropped"]) == list(range(E)) and len(layer["scores"]) == E


def test_group_limited_router_keeps_groups_balanced():
    view = moekit.models.load(tiny_model("deepseek_v3"))  # 8 experts in 2 groups of 4
    assert pr.select_top(torch.tensor([9., 8, 7, 6, 0, 1, 2, 3]), 4, n_group=2) == [0, 1, 6, 7]
    plan = pr.prune_view(view, _stats(view, "frequency"), 4, "frequency")
    assert all(sum(e < 4 for e in ids) == 2 for ids in plan.keep.values())


def _constructed_layer_stats():
    """qwen3_moe (16 experts, top-4): 6 tokens pick exactly A = {2, 6, 10, 14}, 3 tokens exactly B = {1, 5, 9, 13}."""
    view = moekit.models.load(tiny_model("qwen3_moe"))
    x = torch.zeros(9, 32)
    x[:6, 0], x[6:, 1] = 1.0, 1.0
    for layer in view.layers:
        with torch.no_grad():
            layer.router.weight.zero_()
            for rank, e in enumerate([2, 6, 10, 14]):
                layer.router.weight[e, 0] = 10 - rank
            for rank, e in enumerate([1, 5, 9, 13]):
                layer.router.weight[e, 1] = 10 - rank
    cal = Calibration(x={m.index: x for m in view.layers}, z={m.index: torch.zeros_like(x) for m in view.layers})
    return view, pr.Stats(cal)


def test_frequency_keeps_the_most_selected_experts():
    view, stats = _constructed_layer_stats()
    plan = pr.plan_frequency(view, stats, 4, pr.PruneOptions())
    assert all(ids == [2, 6, 10, 14] for ids in plan.keep.values())
    scores = plan.scores[view.layers[0].index]
    assert [scores[e] for e in (2, 1, 0)] == [6.0, 3.0, 0.0]
    assert pr.plan_frequency(view, stats, 8, pr.PruneOptions()).keep[0] == [1, 2, 5, 6, 9, 10, 13, 14]


def test_tcess_score_by_hand():
    s = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0]])  # [T=2, E=4]
    ids = torch.tensor([[0, 1], [1, 2]])
    assert torch.allclose(pr.tcess_scores(s, ids), torch.tensor([1.0, 2.0, 0.5, 0.0]))
    # r = 0.3: softmax([2, 1]) = (.73, .27) drops expert 1 on token 0; softmax([3, 1]) = (.88, .12) drops expert 2
    assert torch.allclose(pr.tcess_scores(s, ids, r=0.3), torch.tensor([1.0, 1.5, 0.0, 0.0]))


def test_tcess_plan_uses_router_logits_of_selected_experts():
    view, stats = _constructed_layer_stats()
    plan = pr.plan_tcess(view, stats, 4, pr.PruneOptions())
    scores = plan.scores[0]
    assert scores[2] == pytest.approx(10 * 6 / 9) and scores[1] == pytest.approx(10 * 3 / 9) and scores[0] == 0
    assert plan.keep[0] == [2, 6, 10, 14]


def test_easy_ep_score_by_hand():
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # token 0 turns the residual by 45 degrees, token 1 not at all
    gates, ids, norms = torch.tensor([[0.5], [1.0]]), torch.tensor([[1], [0]]), torch.tensor([[2.0], [3.0]])
    scores = pr.easy_ep_scores(gates, ids, norms, h, y, num_experts=3)
    assert scores.tolist() == pytest.approx([0.0, 0.5 * 2.0 * (1 - 1 / math.sqrt(2)), 0.0])
    # a routed output against the residual never gives a negative factor (max(., 0))
    assert pr.easy_ep_scores(gates, ids, norms, h, -0.5 * h, 3).tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)


def test_easy_ep_residual_is_the_post_attention_norm_input():
    model = tiny_model("qwen3_moe")
    view = moekit.models.load(model)
    seen = {}
    decoder = model.model.layers[1]

    def keep_input(module, args):
        seen["h"] = args[0].reshape(-1, 32).clone()

    handle = decoder.post_attention_layernorm.register_forward_pre_hook(keep_input)
    stats = pr.collect_stats(view, [_ids()], 32, residual=True)
    handle.remove()
    assert (stats.h[1] - seen["h"]).abs().max() < 1e-5


def test_easy_ep_plan_matches_a_direct_recomputation():
    view = moekit.models.load(tiny_model("qwen3_moe"))
    stats = _stats(view, "easy-ep")
    plan = pr.plan_easy_ep(view, stats, 4, pr.PruneOptions())
    layer = view.layers[0]
    x, h = stats.cal.x[layer.index], stats.h[layer.index]
    weights, ids = pr.route(layer.router_logits(x), layer.rule)
    expected = torch.zeros(layer.num_experts, dtype=torch.float64)
    with torch.no_grad():
        outs = {(t, k): pr.expert_mlp(x[t:t + 1], layer.get_expert(int(ids[t, k])), layer.activation)[0]
                for t in range(x.shape[0]) for k in range(ids.shape[1])}
        for t in range(x.shape[0]):
            y = sum(weights[t, k] * outs[t, k] for k in range(ids.shape[1]))
            h_t, y = h[t].double(), y.double()  # 1 - cos is ~1e-7 here: float32 would lose it
            change = max(1 - torch.cosine_similarity(h_t, h_t + y, dim=0).item(), 0.0)
            for k in range(ids.shape[1]):
                expected[ids[t, k]] += weights[t, k].item() * outs[t, k].norm().item() * change
    assert torch.allclose(torch.tensor(plan.scores[layer.index], dtype=torch.float64), expected, rtol=1e-3, atol=0)


def test_easy_ep_refuses_post_norm_layers():
    view = moekit.models.load(tiny_model("flex_olmo"))
    with pytest.raises(pr.UserError, match="easy-ep"):
        pr.collect_stats(view, [_ids()], 32, residual=True)


def _brute_force(family, n, seq=16):
    """Per layer, every kept set that the plan could choose, scored by really pruning a copy of the model and running
    the reference MoE block on the cached inputs."""
    model = tiny_model(family)
    view = moekit.models.load(model)
    stats = _stats(view, "naee", tokens=64, seq=seq)
    n_group = view.layers[0].rule.n_group
    candidates = list(pr.kept_sets(view.num_experts, n, n_group))
    assert len(candidates) == pr.count_kept_sets(view.num_experts, n, n_group)
    losses = {}
    for keep in candidates:
        copy_view = moekit.models.load(copy.deepcopy(model))
        keep_experts(copy_view, {m.index: keep for m in copy_view.layers})
        for layer in copy_view.layers:
            with torch.no_grad():
                z_d = reference_moe_forward(layer, stats.cal.x[layer.index]).double()
            diff = stats.cal.z[layer.index].double() - z_d
            losses[layer.index, tuple(keep)] = sum(torch.linalg.norm(c).item() for c in torch.split(diff, seq))
    return view, stats, losses


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_naee_exact_enumeration_finds_the_brute_force_best(family):
    view, stats, losses = _brute_force(family, n=4)
    plan = pr.plan_naee(view, stats, 4, pr.PruneOptions())
    assert plan.search == "exact"
    for layer in view.layers:
        mine = {k: v for (i, k), v in losses.items() if i == layer.index}
        best = min(mine, key=mine.get)
        assert plan.keep[layer.index] == list(best)
        assert plan.info["loss"][layer.index] == pytest.approx(mine[best], rel=1e-4)


def test_naee_falls_back_to_labelled_greedy():
    view = moekit.models.load(tiny_model("mixtral"))
    stats = _stats(view)
    plan = pr.plan_naee(view, stats, 4, pr.PruneOptions(naee_max_subsets=10))  # C(8, 4) = 70 > 10
    assert plan.search == "greedy" and all(len(ids) == 4 for ids in plan.keep.values())
    rep = pr.report(plan, source="x", num_experts=8, n=4, calib={}, opts=pr.PruneOptions(naee_max_subsets=10),
                    bytes_before=1, bytes_after=1)
    assert rep["search"] == "greedy" and rep["method_label"] == "naee (greedy)"


def test_naee_greedy_on_a_known_case():
    # loss = sum of the dropped experts' costs: greedy must drop the cheapest ones
    cost = [5.0, 1.0, 4.0, 0.5, 3.0, 2.0]
    keep, loss = pr.naee_greedy(lambda kept: sum(c for e, c in enumerate(cost) if e not in kept), 6, 3)
    assert keep == [0, 2, 4] and loss == pytest.approx(3.5)


def test_random_is_seeded():
    view = moekit.models.load(tiny_model("qwen3_moe"))
    stats = pr.Stats(Calibration())
    a = pr.plan_random(view, stats, 4, pr.PruneOptions(seed=3)).keep
    assert a == pr.plan_random(view, stats, 4, pr.PruneOptions(seed=3)).keep
    assert a != pr.plan_random(view, stats, 4, pr.PruneOptions(seed=4)).keep


@pytest.mark.parametrize("keep, n", [("8", 8), ("0.5", 8), ("0.75", 12), ("16", 16), ("1.0", 16)])
def test_resolve_keep(keep, n):
    assert pr.resolve_keep(keep, 16, 4) == n


@pytest.mark.parametrize("keep, message", [("0", "keeps no expert"), ("17", "only 16 experts"), ("2", "at least 4"),
                                           ("1.5", "fraction"), ("abc", "fraction"), ("6", "multiple of 4")])
def test_resolve_keep_rejects(keep, message):
    with pytest.raises(pr.UserError, match=message):
        pr.resolve_keep(keep, 16, 4, n_group=4 if keep == "6" else 1)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(pr.UserError, match="known: easy-ep, frequency, naee, random, tcess"):
        pr.get_method("magic")
