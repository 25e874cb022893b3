"""What `moekit info` reports about a model: a JSON-serialisable summary of its MoE view."""

from __future__ import annotations

from moekit.models.view import MoEView


def summarise(view: MoEView) -> dict:
    first = view.layers[0]
    counts = view.param_counts()
    shared = first.shared is not None
    from moekit.models.architecture import model_class

    kinds = sorted({m.kind for m in view.layers})
    return {
        "architecture": type(view.model).__name__,
        "model_type": view.model_config.model_type,  # the checkpoint's (a wrapper's, for multimodal models)
        "moe_family": view.model_type,  # the adapter's: the language model's type inside a wrapper
        "loads_with": model_class(view.model_config).__name__,
        "layer_kinds": {str(m.index): m.kind for m in view.layers} if kinds != ["decoder"] else None,
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


# ---------------------------------------------------------------- the README's family table (scripts/family_table.py)

TABLE_START, TABLE_END = "<!-- families:start -->", "<!-- families:end -->"


def family_table() -> str:
    """The README's table of every registered adapter and multimodal wrapper, generated from the registries."""
    from moekit.models.architecture import wrappers
    from moekit.models.registry import _ADAPTERS

    rows = ["| model_type | kind | routing rule (as the HF router computes it) | shared experts | not applicable |",
            "| --- | --- | --- | --- | --- |"]
    for name, adapter in sorted(_ADAPTERS.items()):
        rows.append(f"| {name} | {_kind(adapter)} | {' '.join((adapter.rule.__doc__ or '').split())} | "
                    f"{_shared_kind(adapter)} | {_refused(adapter)} |")
    for name, wrapper in wrappers().items():
        rows.append(f"| {name} | multimodal wrapper (`{wrapper.text_config}`: text model above; towers untouched) | "
                    f"its language model's | its language model's | as its language model |")
    return "\n".join(rows)


def _kind(adapter) -> str:
    if adapter.seq2seq:
        return "encoder-decoder"
    return "causal LM" if _has_causal_lm(adapter.model_type) else "text model of a wrapper"


def _has_causal_lm(model_type: str) -> bool:
    from transformers.models.auto import modeling_auto as auto

    return model_type in {**auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, **auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES}


def _shared_kind(adapter) -> str:
    if adapter.rule.__name__ == "inkling" or adapter.shared_block_mlp:
        return "yes (router-weighted)" if adapter.rule.__name__ == "inkling" else "yes (the block's dense MLP)"
    if adapter.shared_gate:
        return "sigmoid-gated"
    return "yes" if adapter.shared else "no"


def _refused(adapter) -> str:
    """The commands that refuse this family, in short."""
    if adapter.seq2seq:
        return "run, serve, eval, merge, quantize (encoder-decoder)"
    out = []
    if adapter.fixed_count:
        out.append("prune, merge (fixed expert count)")
    if adapter.router_state or adapter.hash_table or adapter.rule.__name__ == "doge":
        out.append("calibrated pruning / merging / PMQ (routing not a function of the block input)")
    if adapter.layout is not None:  # an explicit layout: its experts class is not a use_experts_implementation one
        out.append("run, serve (experts outside transformers' experts interface)")
    return "; ".join(out) or "-"
