"""Tiny random models of every supported family, built from the real transformers config classes (float32, CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers

# Tiny models gain nothing from intra-op threads; on a shared, oversubscribed CPU the thread hand-offs cost ~30x
# (measured: 40 families' forwards 11.6 s CPU with 2 threads, 0.26 s with 1).
torch.set_num_threads(1)

_COMMON = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=128, max_position_embeddings=128,
)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)

# model_type -> (config class, overrides). >= 8 experts, 3 layers; some families keep a dense first layer.
TINY = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, mlp_only_layers=[0])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
                                         norm_topk_prob=True)),
    "qwen3_next": ("Qwen3NextConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=16, norm_topk_prob=True,
                                           layer_types=["linear_attention", "full_attention", "linear_attention"],
                                           linear_num_value_heads=4, linear_num_key_heads=2,
                                           linear_key_head_dim=8, linear_value_head_dim=8)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": ("DeepseekV2Config", dict(_MLA, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                             n_shared_experts=1, first_k_dense_replace=1, topk_method="group_limited_greedy",
                                             n_group=4, topk_group=2, routed_scaling_factor=1.5)),
    "deepseek_v3": ("DeepseekV3Config", dict(_MLA, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                             n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                                             routed_scaling_factor=2.5, norm_topk_prob=True)),
    "glm4_moe": ("Glm4MoeConfig", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                       n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                                       routed_scaling_factor=1.5, norm_topk_prob=True)),
    "phimoe": ("PhimoeConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["full_attention"] * 3)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=16,
                                                moe_num_shared_experts=1, moe_layer_start_index=1)),
    "llama4_text": ("Llama4TextConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size_mlp=48,
                                             moe_layers=[1, 2])),
    # further families (transformers 5.23 fused-expert MoE causal LMs)
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                                      shared_expert_intermediate_size=16,
                                                      layer_types=["linear_attention", "full_attention",
                                                                   "linear_attention"],
                                                      linear_num_value_heads=4, linear_num_key_heads=2,
                                                      linear_key_head_dim=8, linear_value_head_dim=8)),
    "dots1": ("Dots1Config", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                  n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                                  routed_scaling_factor=2.0, norm_topk_prob=True, layer_types=["full_attention"] * 3)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(num_experts=8, num_local_experts=8, moe_topk=2)),
    "minimax": ("MiniMaxConfig", dict(num_local_experts=8, num_experts_per_tok=2,
                                      layer_types=["linear_attention", "full_attention", "linear_attention"])),
    "minimax_m2": ("MiniMaxM2Config", dict(num_local_experts=8, num_experts_per_tok=2)),
    "flex_olmo": ("FlexOlmoConfig", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, pad_token_id=1)),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(_MLA, n_routed_experts=8, num_experts_per_tok=2,
                                                moe_intermediate_size=16, n_shared_experts=1,
                                                mlp_layer_types=["dense", "sparse", "sparse"],
                                                n_group=2, topk_group=1, routed_scaling_factor=1.8,
                                                norm_topk_prob=True)),
    "deepseek_v32": ("DeepseekV32Config", dict(_MLA, n_routed_experts=8, num_experts_per_tok=2,
                                               moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                                               mlp_layer_types=["dense", "sparse", "sparse"], n_group=2, topk_group=1,
                                               routed_scaling_factor=2.5, norm_topk_prob=True, index_topk=8,
                                               q_lora_rank=16,
                                               index_head_dim=16, index_n_heads=2,
                                               layer_types=["indexed_attention"] * 3)),
    "exaone_moe": ("ExaoneMoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                           num_shared_experts=1, first_k_dense_replace=1,
                                           mlp_layer_types=["dense", "sparse", "sparse"],
                                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                           n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)),
    "solar_open": ("SolarOpenConfig", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                           n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=1.5,
                                           norm_topk_prob=True)),
    "mimo_v2_flash": ("MiMoV2FlashConfig", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                                n_group=2, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=True,
                                                v_head_dim=8, sliding_window=8,
                                                layer_types=["full_attention", "sliding_attention",
                                                             "sliding_attention"],
                                                mlp_layer_types=["dense", "sparse", "sparse"])),
    "bailing_hybrid": ("BailingHybridConfig", dict(_MLA, num_experts=8, num_experts_per_token=2,
                                                   moe_intermediate_size=16, num_shared_experts=1, num_expert_group=2,
                                                   topk_group=1,
                                                   routed_scaling_factor=2.5, moe_renormalize=True,
                                                   first_k_dense_replace=1, layer_group_size=3,
                                                   layer_types=["linear_attention", "linear_attention",
                                                                "full_attention"],
                                                   mlp_layer_types=["dense", "sparse", "sparse"],
                                                   linear_head_dim=8, linear_num_heads=4, num_nextn_predict_layers=0,
                                                   pad_token_id=1)),
    "kimi_linear": ("KimiLinearConfig", dict(_MLA, num_experts=8, num_experts_per_token=2, moe_intermediate_size=16,
                                             num_shared_experts=1, num_expert_group=2, topk_group=1,
                                             routed_scaling_factor=2.4, moe_renormalize=True,
                                             mlp_layer_types=["dense", "sparse", "sparse"],
                                             layer_types=["linear_attention", "full_attention", "linear_attention"],
                                             linear_head_dim=8, linear_num_heads=4, pad_token_id=1)),
    "jamba": ("JambaConfig", dict(num_experts=8, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
                                  attn_layer_period=2, attn_layer_offset=0, use_mamba_kernels=False, mamba_dt_rank=4,
                                  mamba_d_state=4)),
    "lfm2_moe": ("Lfm2MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                       num_dense_layers=1, use_expert_bias=True, norm_topk_prob=True,
                                       routed_scaling_factor=1.5,
                                       layer_types=["conv", "full_attention", "conv"])),
    "afmoe": ("AfmoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, num_dense_layers=1,
                                  num_shared_experts=1, route_scale=1.5, sliding_window=8,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(num_local_experts=8, num_experts_per_tok=2,
                                                        shared_intermediate_size=24)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(num_local_experts=8, num_experts_per_tok=2,
                                                        shared_intermediate_size=24,
                                                        layer_types=["mamba", "attention", "mamba"],
                                                        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                                                        mamba_chunk_size=8)),
    "cohere2_moe": ("Cohere2MoeConfig", dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16,
                                             prefix_dense_intermediate_size=48, num_shared_experts=1,
                                             shared_expert_combination_strategy="average",
                                             mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=8,
                                             layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "laguna": ("LagunaConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=16, mlp_layer_types=["dense", "sparse", "sparse"],
                                    num_attention_heads_per_layer=[4, 4, 4], layer_types=["full_attention"] * 3,
                                    moe_routed_scaling_factor=1.7, moe_router_logit_softcapping=0.5)),
    "glm_moe_dsa": ("GlmMoeDsaConfig", dict(_MLA, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                            n_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"],
                                            n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                            q_lora_rank=16, index_topk=8, index_head_dim=16, index_n_heads=2,
                                            layer_types=["indexed_attention"] * 3, indexer_types=["full"] * 3)),
    "hy_v4": ("HYV4Config", dict(_MLA, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                 n_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"], n_group=2,
                                 topk_group=1, routed_scaling_factor=2.8, norm_topk_prob=True, q_lora_rank=16,
                                 index_topk=8, index_head_dim=16, index_n_heads=2, pad_token_id=1,
                                 layer_types=["indexed_attention"] * 3, indexer_types=["full", "full", "shared"])),
    "hy_v3": ("HYV3Config", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, num_shared_experts=1,
                                 router_scaling_factor=2.8, mlp_layer_types=["dense", "sparse", "sparse"])),
    "granitemoe_swa": ("GraniteMoeSWAConfig", dict(num_local_experts=8, num_experts_per_tok=2,
                                                    shared_intermediate_size=24, sliding_window=8,
                                                    layer_types=["full_attention", "sliding_attention",
                                                                 "sliding_attention"],
                                                    layer_rope_theta=[10000.0] * 3)),
    "aria_text": ("AriaTextConfig", dict(moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1, pad_token_id=1)),
    "minimax_m3_vl_text": ("MiniMaxM3VLTextConfig", dict(num_local_experts=8, num_experts_per_tok=2,
                                                         dense_intermediate_size=48, shared_intermediate_size=16,
                                                         routed_scaling_factor=2.0,
                                                         mlp_layer_types=["dense", "sparse", "sparse"],
                                                         index_n_heads=2, index_head_dim=16, index_block_size=4,
                                                         index_topk_blocks=2, index_local_blocks=1,
                                                         layer_types=["full_attention"] * 3)),
    "qwen4_exp_text": ("Qwen4ExpTextConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                                  shared_expert_intermediate_size=16, norm_topk_prob=True,
                                                  layer_types=["linear_attention", "full_attention",
                                                               "linear_attention"],
                                                  linear_num_value_heads=4, linear_num_key_heads=2,
                                                  linear_key_head_dim=8, linear_value_head_dim=8, hc_lowrank=8,
                                                  indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8,
                                                  indexer_budget=8, indexer_compress_ratio=2)),
    "mellum": ("MellumConfig", dict(num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                    norm_topk_prob=True, mlp_layer_types=["dense", "sparse", "sparse"],
                                    layer_types=["full_attention"] * 3)),
    "flint": ("FlintConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                  shared_expert_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[0],
                                  sliding_window=8, layer_types=["full_attention", "sliding_attention",
                                                                 "sliding_attention"])),
    "kolibri1": ("Kolibri1Config", dict(num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                        shared_expert_intermediate_size=16, norm_topk_prob=True, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "beam": ("BeamConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                                n_group=2, topk_group=1, routed_scaling_factor=2.5, sliding_window=8,
                                mlp_layer_types=["dense", "sparse", "sparse"],
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "axk1": ("AXK1Config", dict(_MLA, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                norm_topk_prob=True, mlp_layer_types=["dense", "sparse", "sparse"], q_lora_rank=16)),
    "axk2": ("AXK2Config", dict(_MLA, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                norm_topk_prob=True, mlp_layer_types=["dense", "sparse", "sparse"], q_lora_rank=16,
                                index_topk=8, index_head_dim=16, index_n_heads=2, gated_norm_rank=4,
                                layer_types=["indexed_attention"] * 3)),
    "dots3_note_text": ("Dots3NoteTextConfig", dict(_MLA, n_routed_experts=8, num_experts_per_tok=2,
                                                    moe_intermediate_size=16, shared_experts_intermediate_size=16,
                                                    n_shared_experts=1, n_group=2, topk_group=1,
                                                    routed_scaling_factor=1.5, norm_topk_prob=True, q_lora_rank=16,
                                                    mlp_layer_types=["dense", "sparse", "sparse"], per_layer_config={},
                                                    index_topk=8, index_head_dim=16, index_n_heads=2, sliding_window=8,
                                                    layer_types=["indexed_attention", "sliding_attention",
                                                                 "sliding_attention"], pad_token_id=1, head_dim=16)),
    "inkling2_text": ("Inkling2TextConfig", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                                 route_scale=2.0, scoring_func="sqrtsoftplus", unpadded_vocab_size=128,
                                                 swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                                                 sliding_window_size=8, d_rel=4, rel_extent=16,
                                                 n_layers_per_attn_res_block=2, mlp_gate_softcap=0.5,
                                                 mlp_up_softcap=0.5,
                                                 layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"])),
    "longcat_flash": ("LongcatFlashConfig", dict(_MLA, num_layers=2, num_hidden_layers=4, n_routed_experts=8,
                                                 zero_expert_num=4, moe_topk=2, expert_ffn_hidden_size=16,
                                                 ffn_hidden_size=48, routed_scaling_factor=2.0, q_lora_rank=16)),
}


def tiny_config(model_type: str):
    cls_name, overrides = TINY[model_type]
    return getattr(transformers, cls_name)(**{**_COMMON, **overrides})


def tiny_model(model_type: str, seed: int = 0):
    """A tiny random model in float32 eval mode, with eager experts and non-trivial routing parameters."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        for name, buf in list(model.named_parameters()) + list(model.named_buffers()):
            if "e_score_correction_bias" in name:
                buf.copy_(torch.rand_like(buf) * 0.1)  # exercise selection-only bias
            elif "experts" in name and "bias" in name:
                buf.normal_(0, 0.02)  # gpt-oss expert biases start empty
    return model.eval()


@pytest.fixture(params=sorted(TINY))
def family(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need a CUDA device: skip them everywhere else (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
