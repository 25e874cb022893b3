"""A checkpoint whose default placement *is* the plan: experts permuted so that new expert id p of layer l is the old
expert phy2log[l, p]. The engines place expert ids contiguously by default (vLLM `determine_expert_map` "linear", SGLang
`init_trivial`: slot p on GPU p // (E / G)), so serving the permuted checkpoint with no map file gives the plan's
placement exactly — a static placement for vLLM, which cannot load a map file today.

The permutation moves every expert tensor together with its router row, router bias and score-correction bias
(moekit.compress.edit.keep_experts), so the model computes the same function and every token picks the same experts.
Logits match bit for bit where nothing sums over the expert axis (sigmoid routers, softmax over the top-k, two experts
per token) and to float32 rounding otherwise: a softmax over all E router logits, or HF's eager loop adding a token's
top-4 experts in id order, adds the same numbers in another order (tests/placement/test_checkpoint.py). Routers with expert groups (DeepSeek-V3, GLM-4.5: group-limited
top-k over contiguous id blocks) need a permutation that maps whole groups onto whole groups, which only a
group-aligned plan allows (`moekit place --method eplb --align-groups`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moekit.errors import UserError
from moekit.placement.plan import Plan


def checkpoint_order(plan: Plan, num_groups: int) -> np.ndarray:
    """[L, E] new id -> old id: the plan's slot order, reordered within each GPU so that every block of E / n_group new
    ids is one old group (only possible for a group-aligned plan; UserError otherwise)."""
    topo = plan.topology
    if topo.redundant:
        raise UserError("--checkpoint holds each expert once: use --redundant 0 (replicas need the engines' map file)")
    if num_groups <= 1:
        return plan.phy2log.copy()
    E, S = topo.num_experts, topo.slots_per_gpu
    size = E // num_groups
    out = np.empty_like(plan.phy2log)
    for l, row in enumerate(plan.phy2log):
        gpus = row.reshape(topo.gpus, S)
        group = gpus // size  # [G, S] old group of each expert
        if S % size == 0:  # each GPU must hold whole groups: order them by group
            ok = all(np.all(np.bincount(g, minlength=num_groups)[np.unique(g)] == size) for g in group)
            order = np.argsort(group * E + gpus, axis=1, kind="stable")
            out[l] = np.take_along_axis(gpus, order, axis=1).reshape(-1)
        elif size % S == 0:  # each block of size / S GPUs must be one group
            blocks = group.reshape(num_groups, -1)
            ok = bool(np.all(blocks == blocks[:, :1]))
            out[l] = row
        else:
            ok = False
        if not ok:
            raise UserError(f"--checkpoint: the router picks experts in {num_groups} groups of {size} contiguous ids, "
                            f"and the plan splits groups across GPUs in MoE layer {plan.layers[l]}, so no expert "
                            f"permutation keeps the routing; plan with --method eplb --align-groups, or serve "
                            f"sglang.json instead")
    return out


def write_permuted(model_path: Path, plan: Plan, out: Path, report: dict) -> Path:
    """Load MODEL, permute its experts to the plan, save it to `out` (atomically, via the compression writer)."""
    import moekit.models
    from moekit.compress.checkpoint import save_checkpoint
    from moekit.compress.edit import keep_experts

    view = moekit.models.load(Path(model_path))
    if [m.index for m in view.layers] != list(plan.layers) or view.num_experts != plan.topology.num_experts:
        raise UserError(f"--checkpoint {model_path} has MoE layers {[m.index for m in view.layers]} with "
                        f"{view.num_experts} experts, the plan {plan.layers} with {plan.topology.num_experts}: give "
                        f"the checkpoint the trace was recorded from")
    order = checkpoint_order(plan, view.layers[0].rule.n_group)
    keep_experts(view, {layer.index: order[i].tolist() for i, layer in enumerate(view.layers)})
    report = {**report, "expert_order": {str(l): order[i].tolist() for i, l in enumerate(plan.layers)}}
    return save_checkpoint(view.model, out, source=Path(model_path), report={"placement": report})
