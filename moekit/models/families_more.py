"""Adapters for the causal-LM MoE families added in transformers 5.24: DeepSeek-V4 (hash-routed first layers), Doge
(product-key single-neuron experts), JetMoE (MLP experts), Lara-mini, NemotronH (hybrid Mamba, latent experts),
Sarvam (DeepSeek-V3 / GLM-4.5 checkpoints), Zaya (stateful router with a skip expert), Inkling (routed and shared
experts normalised together), Inkling2-Loop, Mistral 4. Data only; cross-checked against each HF router and MoE block
in tests/models/test_families.py and tests/models/test_new_families.py."""

from __future__ import annotations

import math

from moekit.models.families import deepseek_v3, softmax_topk, topk_then_softmax
from moekit.models.families_sigmoid import inkling2
from moekit.models.registry import Adapter, ExpertLayout, register
from moekit.ops.activations import clamped_glu, glu, plain, softcapped_swiglu
from moekit.ops.routing import RoutingRule


def deepseek_v4(config, router) -> RoutingRule:
    """DeepSeek-V4: config.scoring_func (sqrtsoftplus) scores; experts by top-k of score + e_score_correction_bias,
    or, in its first `hash_moe` layers (arXiv: DeepSeek-V4 report section 2.1), by a frozen token id -> experts table;
    weights are the scores of the chosen, renormalised (+1e-20), x routed_scaling_factor."""
    hashed = hasattr(router, "tid2eid")
    return RoutingRule(top_k=router.top_k, scoring=config.scoring_func, correction_bias=not hashed, hashed=hashed,
                       renormalize=True, renorm_eps=1e-20, routed_scaling_factor=float(router.routed_scaling_factor))


def doge(config, router) -> RoutingRule:
    """Doge CDMoE: product keys over floor(sqrt(E)) keys per half (the best K of the n^2 key sums), softmax over the
    K, renormalised when norm_topk_prob."""
    return RoutingRule(top_k=config.num_experts_per_tok, product_keys=math.isqrt(config.num_experts),
                       renormalize=bool(config.norm_topk_prob))


def zaya(config, router) -> RoutingRule:
    """Zaya: softmax over E + 1 (the last a skip expert); top-k on prob + balancing_biases (the skip's -1 by
    default); weights the plain probabilities; a skip selection becomes expert 0 at weight 0."""
    return RoutingRule(top_k=router.top_k, correction_bias=True, null_experts=1)


def inkling(config, router) -> RoutingRule:
    """Inkling: sigmoid; top-k on routed score + e_score_correction_bias; the K routed and n_shared_experts shared
    logits normalised together (sigmoid, in log space) and x route_scale x the router's learned global_scale."""
    return RoutingRule(top_k=router.top_k, scoring="sigmoid", correction_bias=True,
                       shared_logits=router.n_shared_experts, routed_scaling_factor=float(router.route_scale))


def mistral4(config, router) -> RoutingRule:
    """Mistral 4: softmax; group-limited top-k (groups by their best two), experts outside the chosen groups compete
    at 0; renormalised (+1e-20) when norm_topk_prob, x routed_scaling_factor."""
    return RoutingRule(top_k=router.top_k, n_group=router.num_group, topk_group=router.topk_group,
                       group_score="top2_sum", group_mask_zero=True, renormalize=bool(router.norm_topk_prob),
                       renorm_eps=1e-20, routed_scaling_factor=float(router.routed_scaling_factor))


register(
    Adapter("deepseek_v4", deepseek_v4, expert_count_keys=("n_routed_experts",), shared="shared_experts",
            correction_bias="e_score_correction_bias", hash_table="tid2eid",
            activation=lambda config, experts: clamped_glu(config.hidden_act, config.swiglu_limit),
            fixed_count="its hash-routed layers send each token id to fixed experts (tid2eid), so an expert cannot "
                        "be removed or merged without re-hashing",
            notes="hash_moe layers route by token id (tid2eid); manifold hyper-connections around each block")
)
register(
    Adapter("doge", doge, expert_count_keys=("num_experts",), router="router_gate", router_output="logits",
            experts="", fused=(("up_proj", "down_embed.weight"), ("down_proj", "up_embed.weight")),
            layout=ExpertLayout(has_gate=False, single_neuron=True), shared_block_mlp=True,
            fixed_count="its product-key router scores n x n experts from two n-key halves (id = i * n + j), so "
                        "the count is tied to the key tables",
            fixed_routing="its CDMoE block picks experts by product keys inside its own forward (the router is a "
                          "plain Linear returning half-key logits), so there is no router output a policy could "
                          "replace",
            notes="CDMoE: single-neuron retrieval experts (down_embed / up_embed rows) plus the block's own dense MLP")
)
register(
    Adapter("jetmoe", topk_then_softmax, expert_count_keys=("num_local_experts",), router="router",
            router_linear="layer", router_output="sorted_dispatch", experts="",
            fused=(("gate_up_proj", "input_linear.weight"), ("down_proj", "output_linear.weight")),
            layout=ExpertLayout(), output_bias="bias",
            activation=lambda config, experts: glu(config.activation_function),
            fixed_count="its attention experts (mixture of attention heads, not covered) share num_local_experts "
                        "with the MLP experts",
            notes="MLP experts only: the mixture-of-attention heads (self_attention.experts) are left as they are")
)
register(
    Adapter("lara_mini", softmax_topk, expert_count_keys=("num_experts",), shared="shared_expert", router_fp32=True)
)
register(
    Adapter("nemotron_h", deepseek_v3, expert_count_keys=("n_routed_experts",), block="mixer",
            shared="shared_experts", correction_bias="e_score_correction_bias", router_fp32=True,
            expert_in=("fc1_latent_proj",), expert_out=("fc2_latent_proj",),
            activation=lambda config, experts: plain(config.mlp_hidden_act),
            notes="hybrid Mamba-2 / attention / MoE layers; non-gated relu2 experts, optionally in a latent space")
)
for _t in ("sarvam_mla", "sarvam_moe"):  # DeepSeek-V3 / GLM-4.5 architectures under their own model_type
    register(
        Adapter(_t, deepseek_v3, expert_count_keys=("n_routed_experts",), shared="shared_experts",
                correction_bias="e_score_correction_bias", router_fp32=True)
    )
register(
    Adapter("zaya", zaya, expert_count_keys=("num_experts",), router_output="with_extra", router_state=True,
            router_linear="router_mlp.out_proj", correction_bias="balancing_biases",
            notes="the router reads the previous MoE layer's router state; expert E is a skip expert")
)
register(
    Adapter("inkling_text", inkling, expert_count_keys=("n_routed_experts",), shared="shared_experts",
            correction_bias="e_score_correction_bias", router_fp32=True, router_output="with_extra",
            router_scale="global_scale", notes="text model of Inkling; shared experts weighted by the router")
)
register(
    Adapter("inkling2_loop_text", inkling2, expert_count_keys=("n_routed_experts",),
            correction_bias="e_score_correction_bias", router_fp32=True,
            activation=lambda config, experts: softcapped_swiglu(config.mlp_gate_softcap, config.mlp_up_softcap),
            loop_keys=("loop_layer_index_start", "loop_layer_index_end", "loop_num_passes"),
            notes="text model of Inkling2-Loop; its loop layers run loop_num_passes times a forward (traced per "
                  "pass)")
)
register(
    Adapter("mistral4", mistral4, expert_count_keys=("n_routed_experts",), shared="shared_experts",
            notes="transformers maps its causal LM only as a multimodal LM (AutoModelForMultimodalLM)")
)
