"""Multimodal wrappers (image-text-to-text and omni models whose language model is an MoE family) and the text models
of theirs that have no causal-LM class of their own. moekit views, traces, compresses and runs the language model's
MoE layers through the wrapper on text input; vision and audio towers are left as they are, and outputs keep the
wrapper's config and class (moekit/models/architecture.py)."""

from __future__ import annotations

from moekit.models.architecture import Wrapper, register_wrapper
from moekit.models.families import deepseek_v2, deepseek_v3, ernie, softmax_topk, softmax_topk_renorm
from moekit.models.families_sigmoid import sigmoid_bias_topk_renorm
from moekit.models.registry import Adapter, ExpertLayout, register
from moekit.ops.activations import clamped_after_glu
from moekit.ops.routing import RoutingRule


def mistral_large4(config, router) -> RoutingRule:
    """Mistral-Large-4: Mistral 4's router in float32 with renormalisation always on: softmax; group-limited top-k
    (groups by their best two; excluded experts compete at 0); renormalised (+1e-20), x routed_scaling_factor."""
    return RoutingRule(top_k=router.top_k, n_group=router.num_group, topk_group=router.topk_group,
                       group_score="top2_sum", group_mask_zero=True, renormalize=True, renorm_eps=1e-20,
                       routed_scaling_factor=float(router.routed_scaling_factor))


def muse_spark(config, router) -> RoutingRule:
    """MuseSpark: sigmoid of the logits x output_multiplier; top-k on score + e_score_correction_bias; renormalised
    (+1e-15), x routed_scaling_factor."""
    return RoutingRule(top_k=router.top_k, scoring="sigmoid", correction_bias=True, renormalize=True, renorm_eps=1e-15,
                       routed_scaling_factor=float(router.routed_scaling_factor))


# ---- text models of wrappers (transformers has no class loading them alone: they are tested through the wrapper)
register(Adapter("qwen3_vl_moe_text", softmax_topk_renorm, expert_count_keys=("num_local_experts",),
                 notes="text model of Qwen3-VL-MoE"))
register(Adapter("qwen3_omni_moe_text", softmax_topk, expert_count_keys=("num_experts",),
                 notes="text model of the Qwen3-Omni-MoE thinker"))
for _t in ("glm4v_moe_text", "glm5_next_text", "hy_v4_vl_text"):
    register(Adapter(_t, deepseek_v3, expert_count_keys=("n_routed_experts",), shared="shared_experts",
                     correction_bias="e_score_correction_bias", router_fp32=True,
                     notes=f"text model of {_t.removesuffix('_text')}"))
for _t in ("unlimited_ocr_text", "deepseek_ocr2_text"):
    register(Adapter(_t, deepseek_v2, expert_count_keys=("n_routed_experts",), shared="shared_experts",
                     router_fp32=True, notes=f"text model of {_t.removesuffix('_text')}; DeepSeek-V2's router"))
register(
    Adapter("ernie4_5_vl_moe_text", ernie, expert_count_keys=("moe_num_experts",), top_k_key="moe_k",
            router="text_moe.gate", experts="text_moe.experts", shared="shared_experts",
            correction_bias="moe_statics.e_score_correction_bias", router_fp32=True,
            fixed_count="its vision experts (vision_moe) share the text experts' count (moe_num_experts)",
            notes="text model of ERNIE-4.5-VL: the text experts (text_moe); vision tokens' experts are left as "
                  "they are")
)
register(
    Adapter("mistral_large4_text", mistral_large4, expert_count_keys=("n_routed_experts",), shared="shared_experts",
            router_fp32=True, notes="text model of Mistral-Large-4")
)
register(
    Adapter("step3p5", sigmoid_bias_topk_renorm, expert_count_keys=("n_routed_experts",), shared="shared_experts",
            layout=ExpertLayout(),  # Step3p7Experts is not a use_experts_implementation class
            correction_bias="e_score_correction_bias", routed_scale_key="moe_router_scaling_factor",
            activation=lambda config, experts: clamped_after_glu(config.hidden_act, experts.limit),
            notes="text model of Step-3.7; per-layer SwiGLU clamps (swiglu_limits)")
)
register(
    Adapter("muse_spark_text", muse_spark, expert_count_keys=("num_local_experts",),
            correction_bias="e_score_correction_bias", router_fp32=True, router_logit_scale_key="output_multiplier",
            expert_in=("pre_expert_proj", "pre_expert_norm"), expert_out=("post_expert_proj",),
            notes="text model of MuseSpark; experts in a projected (moe_hidden_size) space")
)

# ---- the wrappers: model_type -> where the language model's config and decoder layers are
for _t in ("aria", "deepseek_ocr2", "dots3_note", "ernie4_5_vl_moe", "glm4v_moe", "glm5_next", "hy_v4_vl",
           "inkling2", "inkling2_loop", "inkling_mm_model", "kimi_k25", "minimax_m3_vl", "mistral_large4",
           "muse_spark", "nemo_speechlm", "qwen3_5_moe", "qwen3_omni_moe_thinker", "qwen3_vl_moe", "qwen4_exp",
           "step3p7", "unlimited_ocr"):
    register_wrapper(Wrapper(_t))
register_wrapper(Wrapper("nemotron_h_omni", layers="language_model.model.layers", base="language_model.model"))
register_wrapper(  # its own forward fails on any input in transformers 5.24 (architecture.language_model)
    Wrapper("llama4", layers="language_model.model.layers", base="language_model.model", lm="language_model")
)
register_wrapper(
    Wrapper("qwen3_omni_moe", text_config="thinker_config.text_config", layers="thinker.model.language_model.layers",
            base="thinker.model", lm="thinker",  # the omni model's own forward is not implemented (generate only)
            notes="the thinker's language model; the talker's MoE (speech codes) is left as is")
)
