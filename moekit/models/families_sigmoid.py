"""Adapters for further sigmoid-routed families (transformers 5.23): DeepSeek-V3-style routers (sigmoid, selection-only
score-correction bias, optional group limit, renormalise, scale) and their lighter variants.

Data only; the DeepSeek-V3 rule is reused wherever the router is a copy of DeepseekV3TopkRouter (same op order)."""

from __future__ import annotations

from moekit.models.families import deepseek_v3
from moekit.models.registry import Adapter, register
from moekit.ops.activations import glu, softcapped_swiglu, swiglu_oai
from moekit.ops.routing import RoutingRule


def sigmoid_bias_topk_renorm(config, router) -> RoutingRule:
    """MiniMax-M2 / M3, Laguna: sigmoid; top-k on score + e_score_correction_bias (no groups); weights are the plain
    sigmoid scores divided by their sum (no epsilon; M3 and Laguna scale the routed sum in the block instead)."""
    return RoutingRule(top_k=router.top_k, scoring="sigmoid", correction_bias=True, renormalize=True)


def lfm2_moe(config, router) -> RoutingRule:
    """LFM2-MoE: sigmoid; top-k on score + expert_bias when use_expert_bias; weights renormalised with +1e-6 in the
    denominator when norm_topk_prob; x routed_scaling_factor."""
    return RoutingRule(
        top_k=router.top_k,
        scoring="sigmoid",
        correction_bias=bool(router.use_expert_bias),
        renormalize=bool(router.norm_topk_prob),
        renorm_eps=1e-6,
        routed_scaling_factor=float(router.routed_scaling_factor),
    )


def _sigmoid_bias_renorm(router, scale: float) -> RoutingRule:
    """sigmoid; top-k on score + the selection bias (no groups); weights renormalised (+1e-20) and x scale."""
    return RoutingRule(top_k=router.top_k, scoring="sigmoid", correction_bias=True, renormalize=True, renorm_eps=1e-20,
                       routed_scaling_factor=scale)


def afmoe(config, router) -> RoutingRule:
    """AFMoE: sigmoid; top-k on score + expert_bias; weights always renormalised (+1e-20) and x route_scale."""
    return _sigmoid_bias_renorm(router, float(router.route_scale))


def hy_v3(config, router) -> RoutingRule:
    """HY-V3 (Hunyuan): sigmoid (float32 linear); top-k on score + the block's e_score_correction_bias; weights
    renormalised (+1e-20), x router_scaling_factor."""
    return _sigmoid_bias_renorm(router, float(router.router_scaling_factor))


def sigmoid_topk(config, router) -> RoutingRule:
    """Flint: sigmoid (float32 linear) -> top-k, no bias; renormalised (no epsilon) when norm_topk_prob."""
    return RoutingRule(top_k=router.top_k, scoring="sigmoid", renormalize=bool(router.norm_topk_prob))


def kolibri1(config, router) -> RoutingRule:
    """Kolibri1: top-k on logits + e_score_correction_bias, then the sigmoid of the K raw logits kept, renormalised
    (no epsilon) when norm_topk_prob."""
    return RoutingRule(
        top_k=router.top_k,
        scoring="sigmoid",
        score_after_topk=True,
        correction_bias=True,
        renormalize=bool(router.norm_topk_prob),
    )


def beam(config, router) -> RoutingRule:
    """Beam: the DeepSeek-V3 router without its scaling (its router has none; BeamMoE scales the routed sum by
    routed_scaling_factor)."""
    return RoutingRule(
        top_k=router.top_k,
        scoring="sigmoid",
        correction_bias=True,
        n_group=router.num_group,
        topk_group=router.topk_group,
        group_score="top2_sum",
        renormalize=bool(router.norm_topk_prob),
        renorm_eps=1e-20,
    )


def axk2(config, router) -> RoutingRule:
    """AXK2: the DeepSeek-V3 router, except that experts outside the chosen groups get choice 0 (not -inf), and
    checkpoints without n_group skip group limiting altogether."""
    grouped = router.num_group is not None
    return RoutingRule(
        top_k=router.top_k,
        scoring="sigmoid",
        correction_bias=True,
        n_group=router.num_group if grouped else 1,
        topk_group=router.topk_group if grouped else 1,
        group_score="top2_sum",
        group_mask_zero=True,
        renormalize=bool(router.norm_topk_prob),
        renorm_eps=1e-20,
        routed_scaling_factor=float(router.routed_scaling_factor),
    )


def inkling2(config, router) -> RoutingRule:
    """Inkling2: config.scoring_func (sigmoid or sqrtsoftplus); top-k on score + e_score_correction_bias; weights
    renormalised (+1e-20), x routed_scaling_factor (= route_scale)."""
    return RoutingRule(
        top_k=router.top_k,
        scoring=config.scoring_func,
        correction_bias=True,
        renormalize=True,
        renorm_eps=1e-20,
        routed_scaling_factor=float(router.routed_scaling_factor),
    )


# Routers copied from DeepseekV3TopkRouter; shared experts (when any) summed unconditionally.
_DEEPSEEK_V3_STYLE = [
    # model_type, expert-count key, top-k key, shared-expert attribute
    ("dots1", "n_routed_experts", "num_experts_per_tok", "shared_experts"),
    ("glm4_moe_lite", "n_routed_experts", "num_experts_per_tok", "shared_experts"),
    ("deepseek_v32", "n_routed_experts", "num_experts_per_tok", "shared_experts"),
    ("exaone_moe", "num_experts", "num_experts_per_tok", "shared_experts"),
    ("solar_open", "n_routed_experts", "num_experts_per_tok", "shared_experts"),
    ("mimo_v2_flash", "n_routed_experts", "num_experts_per_tok", None),
    ("bailing_hybrid", "num_experts", "num_experts_per_token", "shared_experts"),
    ("kimi_linear", "num_experts", "num_experts_per_token", "shared_experts"),
    ("glm_moe_dsa", "n_routed_experts", "num_experts_per_tok", "shared_experts"),
    ("hy_v4", "n_routed_experts", "num_experts_per_tok", "shared_experts"),
    ("dots3_note_text", "n_routed_experts", "num_experts_per_tok", "shared_experts"),
]
for _t, _count, _top_k, _shared in _DEEPSEEK_V3_STYLE:
    register(
        Adapter(_t, deepseek_v3, expert_count_keys=(_count,), top_k_key=_top_k, shared=_shared,
                correction_bias="e_score_correction_bias", router_fp32=True)
    )

register(
    Adapter("minimax_m2", sigmoid_bias_topk_renorm, expert_count_keys=("num_local_experts",),
            correction_bias="e_score_correction_bias", correction_bias_on_block=True)
)
register(
    Adapter("lfm2_moe", lfm2_moe, expert_count_keys=("num_experts",), block="feed_forward",
            correction_bias="expert_bias", correction_bias_on_block=True,
            activation=lambda config, experts: glu("silu"))  # Lfm2MoeExperts hard-codes F.silu: no hidden_act
)
register(
    Adapter("afmoe", afmoe, expert_count_keys=("num_experts",), router="router", router_linear="gate",
            shared="shared_experts", correction_bias="expert_bias", correction_bias_on_block=True)
)
register(
    Adapter("laguna", sigmoid_bias_topk_renorm, expert_count_keys=("num_experts",), shared="shared_experts",
            correction_bias="e_score_correction_bias", router_softcap_key="moe_router_logit_softcapping",
            routed_scale_key="moe_routed_scaling_factor")
)
register(
    Adapter("minimax_m3_vl_text", sigmoid_bias_topk_renorm, expert_count_keys=("num_local_experts",),
            shared="shared_experts", correction_bias="e_score_correction_bias",
            routed_scale_key="routed_scaling_factor", notes="text model of MiniMax-M3-VL",
            # GPT-OSS's clamped SwiGLU
            activation=lambda config, experts: swiglu_oai(config.swiglu_alpha, config.swiglu_limit))
)
register(
    Adapter("hy_v3", hy_v3, expert_count_keys=("num_experts",), shared="shared_experts",
            correction_bias="e_score_correction_bias", correction_bias_on_block=True, router_fp32=True)
)
register(
    Adapter("axk1", deepseek_v3, expert_count_keys=("n_routed_experts",), shared="shared_experts",
            correction_bias="e_score_correction_bias", router_fp32=True, post_norm="post_mlp_layernorm")
)
register(
    Adapter("axk2", axk2, expert_count_keys=("n_routed_experts",), shared="shared_experts",
            correction_bias="e_score_correction_bias", router_fp32=True)
)
register(
    Adapter("beam", beam, expert_count_keys=("num_experts",), correction_bias="e_score_correction_bias",
            router_fp32=True, routed_scale_key="routed_scaling_factor")
)
register(
    Adapter("kolibri1", kolibri1, expert_count_keys=("num_local_experts",), shared="shared_experts",
            correction_bias="e_score_correction_bias", router_fp32=True)
)
register(
    Adapter("flint", sigmoid_topk, expert_count_keys=("num_experts",), shared="shared_expert", router_fp32=True)
)
register(
    Adapter("inkling2_text", inkling2, expert_count_keys=("n_routed_experts",),
            correction_bias="e_score_correction_bias", router_fp32=True, notes="text model of Inkling-2",
            activation=lambda config, experts: softcapped_swiglu(config.mlp_gate_softcap, config.mlp_up_softcap))
)
