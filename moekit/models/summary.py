"""What `moekit info` reports about a model: a JSON-serialisable summary of its MoE view."""

from __future__ import annotations

from moekit.models.view import MoEView


def summarise(view: MoEView) -> dict:
    first = view.layers[0]
    counts = view.param_counts()
    shared = first.shared is not None
    return {
        "architecture": type(view.model).__name__,
        "model_type": view.model_type,
        "layers": view.num_layers,
        "moe_layers": [m.index for m in view.layers],
        "dense_layers": view.dense_layers,
        "experts_per_layer": view.num_experts,
        "top_k": view.top_k,
        "routing_rule": first.rule.describe(),
        "shared_experts": ("gated " if first.shared_gate is not None else "") + "shared expert" if shared else "none",
        "hidden_size": view.config.hidden_size,
        "expert_intermediate_size": first.intermediate_size,
        "expert_count_config_keys": list(view.adapter.expert_count_keys),
        "params_total": counts["total"],
        "params_active_per_token": counts["active"],
        "params_routed_experts": counts["routed_experts"],
        "dtype": str(first.expert_params()[0].dtype).removeprefix("torch."),
        "bytes_per_expert": view.bytes_per_expert(),
    }
