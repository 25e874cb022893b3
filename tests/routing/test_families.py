"""Routing policies on the families with rarer routing steps and on multimodal wrappers: topk=K equals the family
built with K experts per token (skip experts, joint shared normalisation, loop layers, latent experts, wrappers),
JetMoE's dispatch lists, DeepSeek-V4's hash-routed layers left alone, Inkling's raw top-p, the offloaded runtime under
a policy through wrappers, and the one-line refusals (docs/routing.md, the matrix)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit.models
import moekit.routing as R
from moekit.errors import UserError
from moekit.ops.reference import reference_moe_forward
from tests.conftest import tiny_config, tiny_model
from tests.helpers import assert_close, module_calls, token_ids
from tests.runtime.helpers import offloaded


def _logits(view, ids, routing=None):
    with R.apply(view, routing), torch.no_grad():
        return view.forward(ids).logits


def _built_with_k(family: str, k: int):
    """The tiny model of `family` with num_experts_per_tok = k (same weights). Set after the config is built: Zaya's
    config validates K = 1 only, but its router code takes any K, which is what topk=2 is compared against."""
    config = tiny_config(family)
    stock = tiny_model(family)
    setattr(moekit.models.text_config(config), moekit.models.load(stock).adapter.top_k_key, k)
    model = moekit.models.model_class(config).from_config(config, dtype=torch.float32)
    model.load_state_dict(stock.state_dict())
    model.set_experts_implementation("eager")
    return stock, model.eval()


# families whose rule adds steps (zaya: skip expert; inkling: joint shared weights; loop layers; latent experts;
# group-limited at 0) and wrappers of several text families; JetMoE's config K also sets its attention experts' K and
# DeepSeek-V4's its hash tables' width, so they are tested below instead
@pytest.mark.parametrize("family", ["zaya", "inkling_text", "inkling2_loop_text", "nemotron_h", "mistral4",
                                    "qwen3_vl_moe", "kimi_k25", "llama4", "inkling_mm_model", "muse_spark",
                                    "ernie4_5_vl_moe", "step3p7"])
def test_topk_is_the_family_built_with_that_k(family):
    stock, built = _built_with_k(family, 2 if "zaya" in family else 1)
    view = moekit.models.load(stock)
    k = moekit.models.load(built).top_k
    assert k != view.top_k
    ids = token_ids(stock, 2, 8)
    got = _logits(view, ids, R.parse(f"topk={k}"))
    assert_close(got, _logits(moekit.models.load(built), ids), f"{family} topk={k}")
    assert not torch.equal(got, _logits(view, ids)), "the policy changed nothing"


def test_jetmoe_dispatch_under_a_policy_runs_the_policys_experts_and_the_trace_reads_them():
    """JetMoE's router returns dispatch lists without the dropped slots; the block output equals the reference with
    the family's rule at K = 1, and the capture reads the policy's [T, 1] selection, not the lists."""
    view = moekit.models.load(tiny_model("jetmoe"))
    ids = token_ids(view.model, 2, 8)
    layer = view.layers[0]
    with R.apply(view, R.parse("topk=1")):
        seen = module_calls(view, lambda m: m.block, ids)[layer.index]
        router_out = module_calls(view, lambda m: m.router, ids)[layer.index][0][2]
    (x, *_), _, out = seen[0]
    one = dataclasses.replace(layer, rule=dataclasses.replace(layer.rule, top_k=1))
    assert_close(out, reference_moe_forward(one, x), "jetmoe block under topk=1")
    _, weights, picked = layer.parse_router_output(router_out)
    assert picked.shape == (x.shape[0] * x.shape[1], 1) and torch.equal(weights, torch.ones_like(weights))
    assert sum(router_out[3]) == picked.numel()  # expert sizes: one row per token


def test_deepseek_v4_policies_route_its_learned_layers_and_leave_the_hash_layers_alone():
    view = moekit.models.load(tiny_model("deepseek_v4"))
    hashed = [m.index for m in view.layers if m.rule.hashed]
    assert hashed, "the tiny DeepSeek-V4 has no hash-routed layer: the test proves nothing"
    ids = token_ids(view.model, 2, 8)
    stock = module_calls(view, lambda m: m.router, ids)
    with R.apply(view, R.parse("topk=1")):
        routed = module_calls(view, lambda m: m.router, ids)
    for m in view.layers:
        before, after = (view.layer(m.index).parse_router_output(c[m.index][0][2])[2] for c in (stock, routed))
        if m.rule.hashed:
            assert torch.equal(before, after), f"hash layer {m.index} was rerouted"
        else:
            assert after.shape[1] == 1
    h = hashed[0]
    for spec in (f"topk=1,layers={h}", f"mask={h}:0", f"scale=2@{h}:1"):
        with pytest.raises(UserError, match=rf"decoder layer\(s\) \[{h}\] of deepseek_v4 are hash-routed"):
            R.parse(spec).bind(view)


def test_inkling_top_p_renormalises_routed_and_shared_together_and_raw_does_not():
    view = moekit.models.load(tiny_model("inkling_text"))
    layer = view.layers[0]
    scale = layer.rule.routed_scaling_factor * float(layer.router_scale.detach())
    ids = token_ids(view.model, 2, 8)
    sums = {}
    for spec in ("top-p=0.3,renorm", "top-p=0.3"):
        with R.apply(view, R.parse(spec)):
            out = module_calls(view, lambda m: m.router, ids)[layer.index][0][2]
        _, weights, _ = layer.parse_router_output(out)
        sums[spec] = weights.sum(-1) + out[3].sum(-1)  # routed + shared gammas, per token
    torch.testing.assert_close(sums["top-p=0.3,renorm"], torch.full_like(sums["top-p=0.3"], scale))
    assert (sums["top-p=0.3"] < scale - 1e-6).all()  # raw: the normaliser spans every routed expert


def test_zaya_skip_expert_under_a_policy_is_a_dropped_slot():
    """Zaya's skip expert competes like any choice; selected, it is the sentinel at weight 0 (no expert runs), never
    expert 0 at weight 0 as the stock router reports it."""
    view = moekit.models.load(tiny_model("zaya"))
    layer = view.layers[0]
    with R.apply(view, R.parse("top-p=0.95")):
        out = module_calls(view, lambda m: m.router, token_ids(view.model, 2, 8))[layer.index][0][2]
    _, weights, picked = layer.parse_router_output(out)
    real = picked < R.sentinel(layer)
    assert (weights[real] > 0).all() and (weights[~real] == 0).all()
    assert (~real).any(), "no token kept the skip expert: raise P"


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "kimi_k25", "inkling_mm_model", "zaya"])
def test_offloaded_logits_under_a_policy_equal_in_memory_through_wrappers(family, tmp_path):
    ref, model, om = offloaded(family, tmp_path, budget="1GB", prefetch=False)
    x = token_ids(ref, 1, 9)
    routing = R.parse("skip=0.9" if moekit.models.load(ref).top_k > 1 else "topk=2")
    want = _logits(moekit.models.load(ref), x, routing)
    got = _logits(om.view, x, routing)
    assert torch.equal(got, want), f"{family}: max diff {(got - want).abs().max():.3g}"
    om.close()


@pytest.mark.parametrize("family", ["doge", "switch_transformers", "nllb-moe"])
def test_families_no_policy_applies_to_refuse_in_one_line(family):
    view = moekit.models.load(tiny_model(family))
    for spec in ("topk=1", "skip=0", "scale=1@0:0"):
        with pytest.raises(UserError, match=f"routing policies do not apply to {family}: ") as err:
            R.parse(spec).check(view)
        assert "\n" not in str(err.value) and "without --routing" in str(err.value)
