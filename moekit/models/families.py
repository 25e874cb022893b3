"""Adapters for the transformers MoE families, one entry per `config.model_type`. Mostly data: the attribute names and
the routing rule each family's router implements (read from the router module, which carries top_k, norm_topk_prob, ...).
Cross-checked against transformers' own routers in tests/models/test_families.py."""

from __future__ import annotations

from moekit.models.registry import Adapter, ExpertLayout, register
from moekit.ops.activations import swiglu_oai
from moekit.ops.routing import RoutingRule


def softmax_topk(config, router) -> RoutingRule:
    """softmax over all experts -> top-k -> renormalise if norm_topk_prob (Qwen-MoE, OLMoE)."""
    return RoutingRule(top_k=router.top_k, renormalize=bool(router.norm_topk_prob))


def softmax_topk_renorm(config, router) -> RoutingRule:
    """Mixtral always renormalises the top-k probabilities."""
    return RoutingRule(top_k=router.top_k, renormalize=True)


def topk_then_softmax(config, router) -> RoutingRule:
    """Granite / GPT-OSS: top-k on logits, softmax over the K kept."""
    return RoutingRule(top_k=router.top_k, score_after_topk=True, router_bias=getattr(router, "bias", None) is not None)


def deepseek_v2(config, router) -> RoutingRule:
    """DeepSeek-V2: softmax -> (group-limited) greedy top-k, groups ranked by their best expert, x routed_scaling_factor.
    transformers' V2 router does not renormalise, whatever norm_topk_prob says; neither do we."""
    grouped = router.topk_method == "group_limited_greedy"
    return RoutingRule(
        top_k=router.top_k,
        n_group=router.num_group if grouped else 1,
        topk_group=router.topk_group if grouped else 1,
        group_score="max",
        routed_scaling_factor=float(router.routed_scaling_factor),
    )


def deepseek_v3(config, router) -> RoutingRule:
    """DeepSeek-V3 / GLM-4.5: sigmoid; selection on score + e_score_correction_bias, group-limited (groups ranked by
    the sum of their best two); weights are the plain sigmoid scores, renormalised (+1e-20), x routed_scaling_factor."""
    return RoutingRule(
        top_k=router.top_k,
        scoring="sigmoid",
        correction_bias=True,
        n_group=router.num_group,
        topk_group=router.topk_group,
        group_score="top2_sum",
        renormalize=bool(router.norm_topk_prob),
        renorm_eps=1e-20,
        routed_scaling_factor=float(router.routed_scaling_factor),
    )


def ernie(config, router) -> RoutingRule:
    """ERNIE 4.5: softmax; selection on prob + e_score_correction_bias; weights renormalised with the sum clamped below
    at moe_norm_min."""
    return RoutingRule(top_k=router.top_k, correction_bias=True, renormalize=True, renorm_min=float(router.norm_min))


def phimoe(config, router) -> RoutingRule:
    """PhiMoE sparsemixer (top-2 by construction)."""
    return RoutingRule(top_k=2, scoring="sparsemixer", jitter_eps=float(router.router_jitter_noise))


def llama4(config, router) -> RoutingRule:
    """Llama 4: top-k on logits, sigmoid of the K kept (no renormalisation), weight applied to the expert's input."""
    return RoutingRule(top_k=router.top_k, scoring="sigmoid", score_after_topk=True, weight_on_input=True,
                       score_dense=True)


for _t, _key in [("qwen2_moe", "num_experts"), ("qwen3_moe", "num_experts"), ("qwen3_next", "num_experts")]:
    shared = {} if _t == "qwen3_moe" else {"shared": "shared_expert", "shared_gate": "shared_expert_gate"}
    register(Adapter(_t, softmax_topk, expert_count_keys=(_key,), **shared))
register(Adapter("olmoe", softmax_topk, expert_count_keys=("num_experts",)))
register(Adapter("mixtral", softmax_topk_renorm, expert_count_keys=("num_local_experts",)))
register(Adapter("phimoe", phimoe, expert_count_keys=("num_local_experts",), router="router"))
register(
    Adapter("granitemoe", topk_then_softmax, expert_count_keys=("num_local_experts",), block="block_sparse_moe",
            router="router")
)
register(
    Adapter(
        "gpt_oss", topk_then_softmax, expert_count_keys=("num_local_experts",), router="router",
        activation=lambda config, experts: swiglu_oai(config.swiglu_alpha, config.swiglu_limit),
        notes="experts stored transposed with interleaved gate/up columns and biases",
    )
)
register(
    Adapter("deepseek_v2", deepseek_v2, expert_count_keys=("n_routed_experts",), shared="shared_experts",
            router_fp32=True)
)
for _t in ("deepseek_v3", "glm4_moe"):
    register(
        Adapter(_t, deepseek_v3, expert_count_keys=("n_routed_experts",), shared="shared_experts",
                correction_bias="e_score_correction_bias", router_fp32=True)
    )
register(
    Adapter("ernie4_5_moe", ernie, expert_count_keys=("moe_num_experts",), top_k_key="moe_k", shared="shared_experts",
            correction_bias="moe_statics.e_score_correction_bias", router_fp32=True)
)
register(
    Adapter(
        "llama4_text", llama4, expert_count_keys=("num_local_experts",), block="feed_forward", router="router",
        shared="shared_expert", router_output="scores_logits",
        layout=ExpertLayout(transposed=True),  # Llama4TextExperts is not a use_experts_implementation class
    )
)
