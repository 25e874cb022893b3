"""What the parametrised proofs of tests/models/test_families.py cannot see in the families added with transformers
5.24: Doge's inline product-key routing, DeepSeek-V4's hash-routed layers, Zaya's router state and skip expert,
Inkling's router-weighted shared experts, NemotronH's latent experts, Inkling2-Loop's repeated layers and JetMoE's
attention experts. Tiny random models, float32, CPU; each test also checks that it fails on the wrong rule."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from torch.overrides import TorchFunctionMode

import moekit.models
from moekit.compress.edit import keep_experts
from moekit.errors import UserError
from moekit.ops.reference import reference_block_call
from moekit.ops.routing import canonical_order, joint_shared_weights, route
from tests.conftest import _COMMON, TINY, tiny_model
from tests.helpers import module_calls, token_ids


def _assert_routes_like(weights, ids, hf_weights, hf_ids, what):
    w_ours, id_ours = canonical_order(weights, ids)
    w_hf, id_hf = canonical_order(hf_weights.float(), hf_ids)
    assert torch.equal(id_ours, id_hf), f"{what}: expert ids differ"
    assert torch.equal(w_ours, w_hf), f"{what}: weights differ (max {(w_ours - w_hf).abs().max():.3g})"


class _SoftmaxLog(TorchFunctionMode):
    """Records every softmax output of shape [.., K] during a forward (Doge computes its routing weights inline)."""

    def __init__(self, k):
        super().__init__()
        self.k, self.out = k, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.softmax and result.shape[-1] == self.k:
            self.out.append(result)
        return result


def test_doge_product_key_routing_equals_the_blocks_own():
    """Doge routes inline: its experts are the rows its block looks up in down_embed, weighted by a softmax over K.
    route() on the router_gate logits must give those rows and those weights, bit for bit."""
    view = moekit.models.load(tiny_model("doge"))
    gates = module_calls(view, lambda layer: layer.router, token_ids(view.model, 2, 24))  # router_gate logits
    looked_up = module_calls(view, lambda layer: layer.block.down_embed, token_ids(view.model, 2, 24))
    with _SoftmaxLog(view.top_k) as log, torch.no_grad():
        view.forward(token_ids(view.model, 2, 24))
    for slot, layer in enumerate(view.layers):
        logits = gates[layer.index][0][2]
        weights, ids = route(logits.reshape(-1, logits.shape[-1]), layer.rule)
        hf_ids = looked_up[layer.index][0][0][0]  # the indices down_embed was called with: [T, K]
        assert torch.equal(canonical_order(weights, ids)[1], hf_ids.sort(dim=-1).values)
        hf_weights = log.out[slot]  # the K-wide softmax of this layer (a 4-head attention softmax is [.., S] wide)
        w_ours = weights.gather(1, ids.argsort(dim=-1))
        w_hf = hf_weights.gather(1, hf_ids.argsort(dim=-1))
        assert torch.equal(w_ours, w_hf), f"layer {layer.index}: max diff {(w_ours - w_hf).abs().max():.3g}"
    # the view that mixes tokens is part of the rule: product keys from each token's own two halves route otherwise
    flat, n = logits.reshape(-1, logits.shape[-1]), layer.rule.product_keys
    own = torch.cat([flat[:, :n].reshape(-1), flat[:, n:].reshape(-1)]).view(flat.shape)  # row t: (x_t, y_t)
    assert not torch.equal(route(own, layer.rule)[1], ids)


def test_deepseek_v4_hash_layers_take_their_experts_from_the_token_table():
    view = moekit.models.load(tiny_model("deepseek_v4"))
    hashed = [m for m in view.layers if m.rule.hashed]
    assert [m.index for m in hashed] == [0] and not view.layers[1].rule.hashed  # mlp_layer_types = hash_moe, moe, moe
    ids = token_ids(view.model, 2, 24)
    layer = hashed[0]
    args, kwargs, out = module_calls(view, lambda m: m.router, ids)[layer.index][0]
    _, hf_weights, hf_ids = layer.parse_router_output(out)
    assert torch.equal(hf_ids, layer.hash_table[ids.reshape(-1)])
    _assert_routes_like(*layer.route(args[0].reshape(-1, args[0].shape[-1]), token_ids=ids), hf_weights, hf_ids,
                        "hash layer")
    with pytest.raises(ValueError, match="hash-routed"):
        layer.route(args[0].reshape(-1, args[0].shape[-1]))
    assert not layer.predictable and view.layers[1].predictable
    with pytest.raises(UserError, match="deepseek_v4 cannot: its hash-routed layers"):
        keep_experts(view, {m.index: list(range(m.num_experts)) for m in view.layers})


def test_zaya_router_reads_the_previous_layers_state_and_its_skip_expert_weighs_nothing():
    view = moekit.models.load(tiny_model("zaya"))
    for layer in view.layers:  # make the skip expert (the last router class) win for many tokens
        with torch.no_grad():
            layer.correction_bias[-1] = 0.0
            layer.correction_bias[:-1] = -0.05
    ids = token_ids(view.model, 2, 24)
    routers = module_calls(view, lambda m: m.router, ids)
    blocks = module_calls(view, lambda m: m.block, ids)
    skipped = 0
    for layer in view.layers:
        args, kwargs, out = routers[layer.index][0]
        logits, hf_weights, hf_ids = layer.parse_router_output(out)
        _, weights, ours = layer.route_call(args, kwargs)
        _assert_routes_like(weights, ours, hf_weights, hf_ids, f"zaya layer {layer.index}")
        skipped += int((hf_weights == 0).sum())
        b_args, b_kwargs, b_out = blocks[layer.index][0]
        with torch.no_grad():
            ref = reference_block_call(layer, b_args, b_kwargs)
        assert (ref - b_out[0]).abs().max() <= 1e-6 * b_out[0].abs().max()
        state = kwargs.get("router_states", args[1] if len(args) > 1 else None)
        x = args[0].reshape(-1, args[0].shape[-1])
        if layer.index > 0:  # the state changes the logits: a stateless router is not Zaya's
            assert state is not None and not torch.equal(layer.router_logits(x), logits)
    assert skipped > 0, "no token took the skip expert: the test proves nothing about it"
    assert not view.layers[1].predictable


def test_inkling_shared_experts_are_weighted_by_the_joint_normalisation():
    view = moekit.models.load(tiny_model("inkling_text"))
    calls = module_calls(view, lambda m: m.router, token_ids(view.model, 2, 24))
    for layer in view.layers:
        args, kwargs, out = calls[layer.index][0]
        x = args[0].reshape(-1, args[0].shape[-1])
        logits = layer.router_logits(x)
        assert logits.shape[1] == layer.num_experts + layer.rule.shared_logits
        _, _, gammas = joint_shared_weights(logits.float(), layer.rule, layer.correction_bias, layer.router_scale)
        assert torch.equal(gammas, out[3].float()), f"layer {layer.index}: shared gammas differ"
        unscaled = route(logits, layer.rule, layer.correction_bias)[0]  # the learned global_scale (1.25) left out
        assert not torch.equal(unscaled, route(logits, layer.rule, layer.correction_bias, scale=layer.router_scale)[0])
    keep_experts(view, {m.index: [0, 2, 4, 6] for m in view.layers})  # the shared experts' router rows stay
    assert view.layers[0].router.weight.shape[0] == 4 + view.layers[0].rule.shared_logits


def test_nemotron_h_latent_experts_run_in_the_projected_space():
    cls, overrides = TINY["nemotron_h"]
    config = getattr(transformers, cls)(**{**_COMMON, **overrides, "moe_latent_size": 24})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.set_experts_implementation("eager")
    view = moekit.models.load(model)
    layer = view.layers[0]
    assert layer.get_expert(0)["down"].shape == (24, 16)
    args, kwargs, out = module_calls(view, lambda m: m.block, token_ids(model, 2, 24))[layer.index][0]
    with torch.no_grad():
        ref = reference_block_call(layer, args, kwargs)
        assert (ref - out).abs().max() <= 1e-6 * out.abs().max()
        skipped = dataclasses.replace(layer.adapter, expert_in=(), expert_out=())
        with pytest.raises(RuntimeError):  # without the latent projections the shapes do not even meet
            reference_block_call(dataclasses.replace(layer, adapter=skipped), args, kwargs)


def test_inkling2_loop_layers_are_traced_once_per_pass():
    view = moekit.models.load(tiny_model("inkling2_loop_text"))
    runs = view.trace_layers()
    assert [m.passes for m in view.layers] == [1, 2, 2]
    assert [(i, p, kind) for i, _, p, kind in runs] == [(0, 0, "decoder"), (1, 0, "decoder"), (2, 0, "decoder"),
                                                        (3, 1, "decoder pass 2"), (4, 1, "decoder pass 2")]
    from moekit.trace.capture import RouterCapture

    calls = module_calls(view, lambda m: m.router, token_ids(view.model, 1, 12))
    with RouterCapture(view) as cap, torch.no_grad():
        view.forward(token_ids(view.model, 1, 12))
        got = cap.take(torch.ones(12, dtype=torch.bool))
    for index, layer, p, _ in runs:
        _, hf_weights, hf_ids = layer.parse_router_output(calls[layer.index][p][2])
        rec_ids, rec_w, _ = got[index]
        _assert_routes_like(torch.from_numpy(rec_w), torch.from_numpy(rec_ids).long(), hf_weights, hf_ids,
                            f"layer {layer.index} pass {p + 1}")
    assert not torch.equal(*(layer.parse_router_output(c[2])[2] for c in calls[1])), "the passes route differently"


def test_jetmoe_covers_the_mlp_experts_and_leaves_the_attention_experts():
    view = moekit.models.load(tiny_model("jetmoe"))
    moa = view.decoder_layers[0].self_attention.experts
    assert all(m.experts is not moa and m.block is view.decoder_layers[m.index].mlp for m in view.layers)
    with pytest.raises(UserError, match="attention experts"):
        keep_experts(view, {m.index: list(range(4)) for m in view.layers})
