"""Structural edits of an MoE model's experts, shared by pruning and merging.

`keep_experts` slices the fused expert tensors, the router rows (and router bias, and the DeepSeek-V3 / GLM / ERNIE
score-correction bias) and every attribute and config key that holds the expert count, so the edited model runs, saves
with `save_pretrained` and reloads with plain `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from moekit.errors import UserError
from moekit.models.view import MoELayer, MoEView


def keep_experts(view: MoEView, keep: Mapping[int, Sequence[int]]) -> None:
    """Keep, in each MoE layer (keyed by decoder-layer index), only the listed experts, in the listed order."""
    n = _check_plan(view, keep)
    for layer in view.layers:
        _slice_layer(layer, torch.as_tensor(list(keep[layer.index]), dtype=torch.long))
    for key in view.adapter.expert_count_keys:
        setattr(view.config, key, n)


def _check_plan(view: MoEView, keep: Mapping[int, Sequence[int]]) -> int:
    missing = sorted({m.index for m in view.layers} - set(keep))
    if missing:
        raise ValueError(f"the plan lists no experts for MoE layers {missing}")
    sizes = {len(ids) for ids in keep.values()}
    if len(sizes) != 1:  # a transformers config holds one expert count for all layers
        raise UserError(f"every MoE layer must keep the same number of experts, got {sorted(sizes)}")
    n = sizes.pop()
    for index, ids in keep.items():
        if len(set(ids)) != len(ids) or not all(0 <= e < view.num_experts for e in ids):
            raise ValueError(f"layer {index}: expert ids must be distinct and in [0, {view.num_experts}), got {ids}")
    rule = view.layers[0].rule
    if n < rule.top_k:
        raise UserError(f"cannot keep {n} experts: the router selects top-{rule.top_k}; keep at least {rule.top_k}")
    if n % rule.n_group:
        raise UserError(
            f"cannot keep {n} experts: the router splits experts into {rule.n_group} groups; keep a multiple of "
            f"{rule.n_group}"
        )
    return n


# module attributes transformers' MoE classes keep the expert count in (with or without identity experts)
_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "num_routed_experts", "total_experts",
                "out_features")


def _slice_layer(layer: MoELayer, idx: torch.Tensor) -> None:
    old, n = layer.num_experts, len(idx)
    # LongCat-Flash's identity ("zero") experts sit after the routed ones in the router and in gate_up_proj: keep them
    ext = torch.cat([idx, torch.arange(old, old + layer.identity_experts)])
    linear = layer.router_linear
    tensors = [*layer.expert_params(), linear.weight, getattr(linear, "bias", None), layer.correction_bias_buffer]
    with torch.no_grad():
        for t in tensors:
            if t is None:
                continue
            dim = 0 if t.dim() == 1 or t.shape[0] in (old, old + layer.identity_experts) else -1  # [1, E] bias: -1
            keep = ext if t.shape[dim] == old + layer.identity_experts else idx
            t.data = t.data.index_select(dim, keep.to(t.device))
    counts = {old: n, old + layer.identity_experts: n + layer.identity_experts}
    for module in (layer.block, layer.router, linear, layer.experts):
        for name in _COUNT_ATTRS:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value in counts:
                setattr(module, name, counts[value])
