"""The edge cases of each policy (docs/routing.md), on the routing math (moekit/routing/select.py) and tiny models."""

from __future__ import annotations

import pytest
import torch

import moekit.models
import moekit.routing as R
from moekit.ops.routing import RoutingRule, route
from moekit.routing.select import Plan, execute
from tests.conftest import tiny_model
from tests.helpers import token_ids

E = 8
MIXTRAL = RoutingRule(top_k=2, renormalize=True)  # softmax -> top-2 -> renormalise
OLMOE = RoutingRule(top_k=2)  # softmax -> top-2, raw


def _logits(seed=0, T=64):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 2


def _run(policy, rule=MIXTRAL, logits=None, k=None):
    logits = _logits() if logits is None else logits
    plan = Plan(logits=logits, top_k=k or rule.top_k)
    policy.plan(_Layer(rule), plan, None)
    return execute(plan, rule, None, sentinel=E)[:2]


class _Layer:
    def __init__(self, rule):
        self.rule, self.index = rule, 0


def _kept(ids):
    return (ids < E).sum(-1)


# ---- top-p (arXiv 2403.07652)
def test_top_p_tiny_p_keeps_top1_raw_or_one():
    z = _logits()
    p = torch.softmax(z, -1)
    w, ids = _run(R.policies.TopP(1e-6), OLMOE, z)
    assert (_kept(ids) == 1).all() and torch.equal(ids[:, 0], p.argmax(-1))
    assert torch.equal(w[:, 0], p.max(-1).values)  # raw p_(1)
    w, ids = _run(R.policies.TopP(1e-6, renorm=True), MIXTRAL, z)
    assert torch.equal(w[:, 0], torch.ones(len(z)))


def test_top_p_at_least_one_keeps_all_and_first_above_p_alone():
    z = _logits()
    assert (_kept(_run(R.policies.TopP(1.0))[1]) == E).all()
    assert (_kept(_run(R.policies.TopP(1.5))[1]) == E).all()
    p1 = torch.softmax(z, -1).max(-1).values
    P = float(p1.min()) * 0.99
    assert (_kept(_run(R.policies.TopP(P), logits=z)[1]) == 1).all()


def test_top_p_size_is_monotone_in_p():
    sizes = [_kept(_run(R.policies.TopP(p))[1]) for p in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)]
    assert all((a <= b).all() for a, b in zip(sizes, sizes[1:]))
    assert (sizes[0] < sizes[-1]).any()


def test_top_p_renorm_keeping_exactly_k_is_renormalised_top_k():
    z = torch.tensor([[3.0, 2.0, 0.0, -1.0, -2.0, -2.0, -3.0, -4.0]])
    p = torch.softmax(z, -1)
    P = float(p[0, 0] + p[0, 1]) - 1e-4  # crossed at the second expert
    w, ids = _run(R.policies.TopP(P, renorm=True), MIXTRAL, z)
    w2, ids2 = route(z, MIXTRAL)
    assert torch.equal(ids[:, :2], ids2) and torch.allclose(w[:, :2], w2) and (ids[:, 2:] == E).all()


# ---- skip (NAEE, arXiv 2402.14800)
def test_skip_zero_is_stock_and_above_one_is_top1_weight_one():
    z = _logits()
    w0, ids0 = route(z, MIXTRAL)
    w, ids = _run(R.policies.Skip(0.0), logits=z)
    assert torch.equal(ids, ids0) and torch.equal(w, w0)
    w, ids = _run(R.policies.Skip(1.5), logits=z)
    assert (_kept(ids) == 1).all() and torch.equal(w[:, 0], torch.ones(len(z))) and (w[:, 1:] == 0).all()


def test_skip_keeps_w2_equal_beta_w1_and_drops_below():
    z = torch.log(torch.tensor([[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.03, 0.02]]))
    p = torch.softmax(z, -1)
    beta = float(p[0, 1] / p[0, 0])
    assert _kept(_run(R.policies.Skip(beta), logits=z)[1]).item() == 2  # w2 = beta * w1: kept (strict <)
    assert _kept(_run(R.policies.Skip(beta * 1.001), logits=z)[1]).item() == 1


# ---- mask / force (MoTE, SteerMoE)
def test_masked_never_forced_always_and_k_kept():
    z = _logits()
    w, ids = _run(R.policies.Mask({0: (0, 1, 2)}), logits=z)
    assert not torch.isin(ids, torch.tensor([0, 1, 2])).any() and (_kept(ids) == 2).all()
    w, ids = _run(R.policies.Force({0: (5,)}), logits=z)
    assert (ids == 5).any(-1).all() and (_kept(ids) == 2).all()


def test_force_wins_over_selection_bias_and_groups():
    """DeepSeek-V3's rule: sigmoid + bias + group limit; a forced expert outside the chosen group is still selected."""
    rule = RoutingRule(top_k=2, scoring="sigmoid", correction_bias=True, n_group=2, topk_group=1,
                       group_score="top2_sum", renormalize=True, renorm_eps=1e-20, routed_scaling_factor=2.5)
    z = _logits()
    bias = torch.zeros(E)
    bias[:4] = 5.0  # group 0 always wins
    plan = Plan(logits=z, top_k=2)
    R.policies.Force({0: (7,)}).plan(_Layer(rule), plan, None)
    w, ids, _ = execute(plan, rule, bias, sentinel=E)
    assert (ids == 7).any(-1).all() and (w > 0).all()
    assert torch.allclose(w.sum(-1), torch.full((len(z),), 2.5))


# ---- steer / scale / rank
def test_steer_raises_the_steered_experts_share_and_scale_multiplies_without_renorm():
    z = _logits()
    base = (_run(R.policies.TopK(2), logits=z)[1] == 3).float().mean()
    steered = (_run(R.policies.Steer({0: (3,)}, lam=1.0), logits=z)[1] == 3).float().mean()
    assert steered > base
    w0, ids0 = route(z, MIXTRAL)
    w, ids = _run(R.policies.Scale({0: (3,)}, beta=4.0), logits=z)
    assert torch.equal(ids, ids0)
    assert torch.equal(w, torch.where(ids0 == 3, w0 * 4.0, w0))


def test_rank_is_a_single_expert_with_weight_one():
    z = _logits()
    w, ids = _run(R.policies.Rank(2), logits=z)
    assert torch.equal(ids[:, 0], torch.topk(z, 3).indices[:, 2]) and torch.equal(w[:, 0], torch.ones(len(z)))
    assert (ids[:, 1:] == E).all()


# ---- on a model: only the chosen layers change; interleaved rows equal each run alone
def test_other_layers_are_bit_identical():
    model = tiny_model("qwen3_moe")
    view = moekit.models.load(model)
    first, last = view.layers[0].index, view.layers[-1].index
    seen = {}
    for layer in view.layers:
        layer.router.register_forward_hook(lambda m, a, o, i=layer.index: seen.setdefault(i, []).append(o[2]))
    ids = token_ids(model)
    with torch.no_grad():
        model(ids)
    with R.apply(view, R.parse(f"mask={last}:0,{last}:1,{last}:2")), torch.no_grad():
        model(ids)
    assert torch.equal(seen[first][0], seen[first][1])
    assert not torch.equal(seen[last][0], seen[last][1])


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_two_policies_on_interleaved_rows_equal_each_run_alone(family):
    model = tiny_model(family)
    view = moekit.models.load(model)
    ids = token_ids(model, 4, 10, seed=3)
    a, b = R.parse("top-p=0.5"), R.parse(f"steer=1@{view.layers[-1].index}:0+skip=0.5")
    with R.apply(view, a), torch.no_grad():
        alone_a = model(ids).logits
    with R.apply(view, b), torch.no_grad():
        alone_b = model(ids).logits
    hooks = R.attach(view)
    with hooks.use(R.batch_spans([a, b, a, None], 10)), torch.no_grad():
        mixed = model(ids).logits
    hooks.remove()
    with torch.no_grad():
        stock = model(ids).logits
    torch.testing.assert_close(mixed[[0, 2]], alone_a[[0, 2]], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], alone_b[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[3], stock[3], rtol=0, atol=1e-6)
    assert not torch.allclose(alone_a, alone_b)


def test_policy_errors_are_one_line():
    view = moekit.models.load(tiny_model("phimoe"))
    for spec, match in [("nosuch=1", "known: c3po, force"), ("top-p=x", "P must be a number"),
                        ("mask=1", "LAYER:EXPERT"), ("top-p=0.5+skip=0.2", "both choose"),
                        ("steer=0.5", "missing '@'"), ("topk=0", "K must be >= 1")]:
        with pytest.raises(R.spec.UserError, match=match):
            R.parse(spec)
    with pytest.raises(R.spec.UserError, match="sparsemixer"):
        R.parse("top-p=0.5").bind(view)
    with pytest.raises(R.spec.UserError, match="not MoE layers"):
        R.parse("mask=9:1").bind(view)
    with pytest.raises(R.spec.UserError, match="force at most 2"):
        R.parse("force=1:0,1:1,1:2").bind(view)
