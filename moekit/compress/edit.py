"""Structural edits of an MoE model's experts, shared by pruning and merging.

`keep_experts` slices the fused expert tensors, the router rows (and router bias, and the DeepSeek-V3 / GLM / ERNIE
score-correction bias) and every attribute and config key that holds the expert count, so the edited model runs, saves
with `save_pretrained` and reloads with plain `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moekit.errors import UserError
from moekit.models.view import MoELayer, MoEView, _get_path


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


def _slice_layer(layer: MoELayer, idx: torch.Tensor) -> None:
    old = layer.num_experts
    with torch.no_grad():
        for p in layer.expert_params():  # every fused tensor is [E, ...]
            p.data = p.data.index_select(0, idx.to(p.device))
        router = layer.router
        router.weight.data = router.weight.data.index_select(0, idx.to(router.weight.device))  # [E, H]
        if getattr(router, "bias", None) is not None:
            router.bias.data = router.bias.data.index_select(0, idx.to(router.bias.device))
        if layer.adapter.correction_bias:
            bias = _get_path(router, layer.adapter.correction_bias)  # [E] or [1, E]: selection-only bias
            bias.data = bias.data.index_select(-1, idx.to(bias.device))
    for module in (layer.block, router, layer.experts):
        if getattr(module, "num_experts", None) == old:
            module.num_experts = len(idx)
        if isinstance(module, nn.Linear) and module.out_features == old:
            module.out_features = len(idx)
