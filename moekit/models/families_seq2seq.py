"""Encoder-decoder MoE families: Switch Transformers (top-1, arXiv 2101.03961) and NLLB-MoE (top-2, arXiv 2207.04672),
as transformers 5.24 ships them: one module per expert (`experts.expert_{e}`), a float32 router with an expert
capacity. Their MoE layers sit in both stacks; the view numbers the encoder's layers first, then the decoder's, and
records each layer's kind. moekit views, traces, analyses and prunes them; commands that generate (run, serve, eval)
or merge experts refuse in one line."""

from __future__ import annotations

import torch

from moekit.errors import UserError
from moekit.models.registry import Adapter, ExpertLayout, register
from moekit.ops.activations import plain
from moekit.ops.routing import RoutingRule


def switch(config, router) -> RoutingRule:
    """Switch: softmax (float32) -> top-1 at its probability, no renormalisation; each expert takes at most
    expert_capacity tokens of each sequence, in token order; the rest pass through the residual only."""
    return RoutingRule(top_k=1, capacity=int(router.expert_capacity), capacity_scope="sequence")


def nllb_moe(config, router) -> RoutingRule:
    """NLLB-MoE at inference: softmax (float32); the first expert by probability, the second by logit among the rest;
    each expert takes at most ceil(moe_eval_capacity_token_fraction x tokens in the batch) selections, first choices
    first; the two probabilities renormalised (sum clamped at float32 eps), after dropping unless
    normalize_router_prob_before_dropping."""
    if router.second_expert_policy != "all" or router.batch_prioritized_routing:
        raise UserError(f"nllb-moe with second_expert_policy={router.second_expert_policy!r} / "
                        f"batch_prioritized_routing={router.batch_prioritized_routing}: moekit reproduces the "
                        f"deterministic router only "
                        f"(second_expert_policy='all', batch_prioritized_routing=false)")
    fraction = float(router.moe_eval_capacity_token_fraction)
    if fraction <= 0 and router.expert_capacity is None:
        raise UserError("nllb-moe without moe_eval_capacity_token_fraction or expert_capacity: set one of them")
    return RoutingRule(top_k=2, second_on_logits=True, capacity_fraction=max(fraction, 0.0),
                       capacity=0 if fraction > 0 else int(router.expert_capacity), capacity_scope="batch",
                       renormalize=True, renorm_min=torch.finfo(torch.float32).eps,
                       renormalize_after_drop=not router.normalize_router_prob_before_dropping)


register(
    Adapter("switch_transformers", switch, expert_count_keys=("num_experts",), router="router",
            router_linear="classifier", router_fp32=True, router_output="capacity_mask",
            stacks=(("encoder", "encoder.block", "layer.-1.mlp"), ("decoder", "decoder.block", "layer.-1.mlp")),
            per_expert=(("up", "wi.weight"), ("down", "wo.weight")), layout=ExpertLayout(has_gate=False),
            activation=lambda config, experts: plain(config.dense_act_fn),
            fixed_routing="its router drops tokens beyond each expert's capacity in a sequence, so the experts a "
                          "token gets depend on the tokens before it, and a policy changing one token's experts "
                          "would change which other tokens are dropped",
            notes="encoder-decoder; top-1 with a per-sequence expert capacity")
)
register(
    Adapter("nllb-moe", nllb_moe, expert_count_keys=("num_experts",), router="router", router_linear="classifier",
            router_fp32=True, router_output="dense_gates", block="ffn",
            stacks=(("encoder", "model.encoder.layers", "ffn"), ("decoder", "model.decoder.layers", "ffn")),
            per_expert=(("up", "fc1.weight"), ("up_bias", "fc1.bias"), ("down", "fc2.weight"),
                        ("down_bias", "fc2.bias")),
            layout=ExpertLayout(has_gate=False, has_bias=True), token_dropout_key="moe_token_dropout",
            activation=lambda config, experts: plain(config.activation_function),
            fixed_routing="its router drops selections beyond each expert's capacity over the whole batch, so the "
                          "experts a token gets depend on every other token, and a policy changing one token's "
                          "experts would change which other tokens are dropped",
            notes="encoder-decoder; top-2 with a batch-wide capacity. transformers 5.24's NllbMoeExperts.forward runs "
                  "experts 0 and 1 instead of the two chosen ones (see tests/models/test_seq2seq.py)")
)
