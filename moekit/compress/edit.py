"""Structural edits of an MoE model's experts, shared by pruning and merging.

`keep_experts` slices the fused expert tensors (or keeps the per-expert modules, Switch / NLLB-MoE), the router rows
(and router bias, and the DeepSeek-V3 / GLM / ERNIE score-correction bias) and every attribute and config key that
holds the expert count, so the edited model runs, saves with `save_pretrained` and reloads with plain
`from_pretrained` of its class (`moekit.models.model_class`: AutoModelForCausalLM for causal LMs). A multimodal
wrapper's expert count lives in its text config, which is where it is changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moekit.errors import UserError
from moekit.models.architecture import get_path
from moekit.models.view import MoELayer, MoEView


def keep_experts(view: MoEView, keep: Mapping[int, Sequence[int]]) -> None:
    """Keep, in each MoE layer (keyed by decoder-layer index), only the listed experts, in the listed order."""
    view.require("prune", resize=True)
    n = _check_plan(view, keep)
    for layer in view.layers:
        _slice_layer(layer, torch.as_tensor(list(keep[layer.index]), dtype=torch.long))
    for key in view.adapter.expert_count_keys:
        setattr(view.config, key, n)  # the text config of a wrapper


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


# module attributes transformers' MoE classes keep the expert count in (with or without the extra router rows)
_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "num_routed_experts", "total_experts",
                "out_features", "n_total_experts", "num_router_classes")


def _slice_layer(layer: MoELayer, idx: torch.Tensor) -> None:
    old, n, extra = layer.num_experts, len(idx), layer.extra_router_rows
    # rows after the routed experts' (LongCat's identity experts, also in gate_up_proj; Zaya's skip expert; Inkling's
    # shared experts) stay, after the kept ones
    ext = torch.cat([idx, torch.arange(old, old + extra)])
    linear = layer.router_linear
    if layer.adapter.per_expert:
        _keep_expert_modules(layer.experts, idx.tolist(), old)
        expert_tensors = []
    else:
        expert_tensors = layer.expert_params()
    tensors = [*expert_tensors, linear.weight, getattr(linear, "bias", None), layer.correction_bias_buffer]
    with torch.no_grad():
        for t in tensors:
            if t is None:
                continue
            dim = 0 if t.dim() == 1 or t.shape[0] in (old, old + extra) else -1  # [1, E] bias: -1
            keep = ext if t.shape[dim] == old + extra else idx
            t.data = t.data.index_select(dim, keep.to(t.device))
    counts = {old: n, old + extra: n + extra}
    owners = {id(m): m for m in (layer.block, layer.router, linear, layer.experts, *_owners(layer))}
    for module in owners.values():
        for name in _COUNT_ATTRS:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value in counts:
                setattr(module, name, counts[value])


def _owners(layer: MoELayer) -> list[nn.Module]:
    """Modules holding a layer's fused expert tensors below its experts module (JetMoE's input_linear and
    output_linear, each keeping its own num_experts)."""
    return [get_path(layer.experts, path.rpartition(".")[0]) for _, path in layer.adapter.fused if "." in path]


def _keep_expert_modules(experts: nn.Module, keep: list[int], old: int) -> None:
    """Per-expert modules `expert_{e}` (Switch, NLLB-MoE): the kept ones renamed expert_0 .. expert_{n-1}, in order;
    other children (NLLB's token dropout) stay."""
    kept = [experts._modules[f"expert_{e}"] for e in keep]
    for e in range(old):
        del experts._modules[f"expert_{e}"]
    others = dict(experts._modules)
    experts._modules.clear()
    experts._modules.update({f"expert_{i}": m for i, m in enumerate(kept)})
    experts._modules.update(others)
