"""Adapters for further softmax-routed families (transformers 5.23): softmax over all experts, then top-k.

Data only; the rules are the ones in moekit/models/families.py where the router's op order is identical."""

from __future__ import annotations

from moekit.models.families import softmax_topk, softmax_topk_renorm, topk_then_softmax
from moekit.models.registry import Adapter, ExpertLayout, register
from moekit.ops.routing import RoutingRule


def softmax_topk_unnormalised(config, router) -> RoutingRule:
    """Jamba: softmax over all experts -> top-k; the K weights are used as they are (no renormalisation)."""
    return RoutingRule(top_k=router.top_k)


def cohere2_moe(config, router) -> RoutingRule:
    """Cohere2-MoE: top-k on logits, then softmax over the K kept, or (expert_selection_fn="sigmoid") their sigmoid,
    renormalised (no epsilon) when norm_topk_prob."""
    sigmoid = router.expert_selection_fn == "sigmoid"
    return RoutingRule(
        top_k=router.top_k,
        scoring="sigmoid" if sigmoid else "softmax",
        score_after_topk=True,
        renormalize=sigmoid and bool(router.norm_topk_prob),
    )


def longcat_flash(config, router) -> RoutingRule:
    """LongCat-Flash: softmax (float32 linear) over routed + zero experts; top-k on prob + e_score_correction_bias;
    weights are the plain probabilities, not renormalised, x routed_scaling_factor."""
    return RoutingRule(top_k=router.top_k, correction_bias=True,
                       routed_scaling_factor=float(router.routed_scaling_factor))


# Qwen3.5-MoE always renormalises (its router has no norm_topk_prob), like Mixtral; gated shared expert like Qwen2-MoE.
# Only the text model: "qwen3_5_moe" is the vision-language wrapper.
register(
    Adapter("qwen3_5_moe_text", softmax_topk_renorm, expert_count_keys=("num_experts",), shared="shared_expert",
            shared_gate="shared_expert_gate")
)
register(
    Adapter("qwen4_exp_text", softmax_topk, expert_count_keys=("num_experts",), shared="shared_expert",
            shared_gate="shared_expert_gate", notes="text model of Qwen4-Exp; Qwen2-MoE router and gated shared expert")
)
register(Adapter("minimax", softmax_topk_renorm, expert_count_keys=("num_local_experts",)))
register(Adapter("mellum", softmax_topk, expert_count_keys=("num_local_experts",)))
register(Adapter("flex_olmo", softmax_topk, expert_count_keys=("num_experts",)))
register(
    Adapter("hunyuan_v1_moe", softmax_topk_renorm, expert_count_keys=("num_experts",), top_k_key="moe_topk",
            router_linear="wg", shared="shared_mlp",
            notes="router weight `gate.wg` is kept in float32; num_experts / moe_topk may be per-layer lists")
)
register(
    Adapter("jamba", softmax_topk_unnormalised, expert_count_keys=("num_experts",), block="feed_forward",
            router="router", notes="MoE every expert_layer_period layers, dense MLP elsewhere")
)

# Granite 4 variants: the GraniteMoE router, plus a shared MLP that the decoder layer (not the MoE block) adds to the
# block's output on the same input.
for _t in ("granitemoeshared", "granitemoehybrid", "granitemoe_swa"):
    register(
        Adapter(_t, topk_then_softmax, expert_count_keys=("num_local_experts",), block="block_sparse_moe",
                router="router", shared="shared_mlp", shared_on_layer=True)
    )
register(
    Adapter("cohere2_moe", cohere2_moe, expert_count_keys=("num_experts",), shared="shared_experts",
            shared_mix_key="shared_expert_combination_strategy")
)
register(
    Adapter("aria_text", topk_then_softmax, expert_count_keys=("moe_num_experts",), top_k_key="moe_topk",
            router="router", shared="shared_experts", notes="text model of Aria")
)
register(
    Adapter("longcat_flash", longcat_flash, expert_count_keys=("n_routed_experts",), top_k_key="moe_topk",
            router="router", router_linear="classifier", correction_bias="e_score_correction_bias", router_fp32=True,
            identity_experts_key="zero_expert_num",
            layout=ExpertLayout(),  # LongcatFlashExperts is not a use_experts_implementation class
            notes="the `mlp` shortcut MoE of each dual-sublayer decoder layer; `mlps` are its dense MLPs")
)
