"""Expert merging: E experts per MoE layer -> G merged experts (docs/compression_merge_quantize.md).

Methods (registered in METHODS):
- `msmoe`: M-SMoE (Li et al., "Merge, Then Compress", arXiv 2310.01334, github UNITES-Lab/MC-SMoE). Dominant experts =
  the G most used; every other expert joins the dominant whose router-logit column it is most similar to; members are
  permutation-aligned to the dominant (Hungarian matching) and averaged weighted by usage.
- `hcsmoe`: HC-SMoE (Chen et al., arXiv 2410.08589, github wazenmai/HC-SMoE). Feature o_e = mean over ALL calibration
  tokens of expert e's output; agglomerative clustering (average linkage, Euclidean) into G groups; usage-weighted merge.

Deviation from both papers, forced by the output format: the papers keep the router (E rows) and point every member at
the merged weights. A checkpoint with G experts needs one router row per group, so we keep the dominant expert's row
(`router="dominant"`, default) or the usage-weighted mean of the members' rows (`router="average"`); the same policy
applies to the router bias and the score-correction bias. `compression.json` records which.

Optional MC step (`low_rank`): truncated SVD of each merged weight matrix. HF checkpoints have no low-rank format, so the
dense product U V is stored and the would-be low-rank parameter count is reported; the sparse residual is not kept.

Dimension legend: T tokens, E experts, G groups, K selected per token, H hidden size, I expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from moekit.compress.calib import Calibration
from moekit.compress.edit import keep_experts
from moekit.errors import UserError, at_least
from moekit.registry import Registry
from moekit.models.view import MoELayer, MoEView
from moekit.ops.reference import expert_mlp, reference_moe_forward
from moekit.ops.routing import route

ROUTER_POLICIES = ("dominant", "average")
_ROW_KEYS = ("gate", "up", "gate_bias", "up_bias")  # indexed by the intermediate dimension I


# ---------------------------------------------------------------- permutation alignment (M-SMoE §3.2)


def alignment(ref: Mapping[str, torch.Tensor], w: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Permutation perm [I] of expert w's intermediate neurons that best matches ref's: neuron perm[i] of w goes to slot i.

    Derived from: arXiv 2310.01334 §3.2 (weight matching, Ainsworth et al. 2209.04836): maximise
    tr(P^T C) with C = W_in,ref W_in,w^T + W_out,ref^T W_out,w, W_in = [gate | up] over the hidden dim, W_out = down.
    """
    from scipy.optimize import linear_sum_assignment

    cost = _w_in(ref) @ _w_in(w).T + ref["down"].double().T @ w["down"].double()  # [I, I]
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    assert np.array_equal(rows, np.arange(len(rows)))
    return torch.as_tensor(cols, dtype=torch.long)


def _w_in(w: Mapping[str, torch.Tensor]) -> torch.Tensor:
    parts = [w[k].double() for k in ("gate", "up") if k in w]  # each [I, H]
    parts += [w[k].double()[:, None] for k in ("gate_bias", "up_bias") if k in w]  # biases move with their neuron
    return torch.cat(parts, dim=1)  # [I, 2H (+2)]


def permute(w: Mapping[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reorder expert w's intermediate neurons: rows of gate/up (and their biases), columns of down. The expert computes
    exactly the same function, because its activation acts on each (gate_i, up_i) pair independently."""
    out = {k: (v[perm] if k in _ROW_KEYS else v) for k, v in w.items()}
    out["down"] = w["down"][:, perm]  # [H, I]
    return out


# ---------------------------------------------------------------- calibration statistics


def usage(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """f_e [E]: fraction of calibration top-k selections that chose expert e (M-SMoE §3.1 "activation frequency")."""
    with torch.no_grad():
        _, ids = route(layer.router_logits(x), layer.rule, layer.correction_bias)  # [T, K]
    e = layer.num_experts
    counts = torch.bincount(ids.reshape(-1), minlength=e + _identity(layer)).double()  # [E (+ identity experts)]
    return counts[:e] / counts.sum()


def router_similarity(logits: torch.Tensor) -> torch.Tensor:
    """sim(i, j) = (cos(s_:,i, s_:,j) + 1) / 2 over router-logit columns s [T, E] -> [E, E] (arXiv 2310.01334 §3.1)."""
    s = logits.double()
    s = s / s.norm(dim=0, keepdim=True).clamp_min(1e-12)  # unit columns
    return (s.T @ s + 1) / 2


def mean_expert_outputs(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """o_e = mean over all calibration tokens of E_e(x_t), every expert on every token -> [E, H] (arXiv 2410.08589 §3.2)."""
    with torch.no_grad():
        x = layer.expert_input(x.to(layer.expert_params()[0].dtype))  # latent experts see their projected input
        rows = [expert_mlp(x, layer.get_expert(e), layer.activation, layer.expert_norm).double().mean(0)
                for e in range(layer.num_experts)]
    return torch.stack(rows)


# ---------------------------------------------------------------- grouping: each group is [dominant, other members...]


def msmoe_groups(f: torch.Tensor, sim: torch.Tensor, g: int) -> list[list[int]]:
    """M-SMoE grouping (arXiv 2310.01334 §3.1): the g most used experts are dominant; every other expert joins the
    dominant it is most similar to. Groups are ordered by dominant id."""
    dominant = sorted(torch.argsort(f, descending=True, stable=True)[:g].tolist())
    groups = {d: [d] for d in dominant}
    for e in range(len(f)):
        if e not in groups:
            best = max(dominant, key=lambda d: (sim[e, d].item(), -d))
            groups[best].append(e)
    return [groups[d] for d in dominant]


def hcsmoe_groups(features: torch.Tensor, f: torch.Tensor, g: int) -> list[list[int]]:
    """HC-SMoE grouping (arXiv 2410.08589 §3.2): agglomerative clustering of the expert output features [E, H] with
    average linkage and Euclidean distance, cut into exactly g clusters. The most used member is a group's dominant (its
    slot, router row under the "dominant" policy, and alignment reference)."""
    from scipy.cluster.hierarchy import cut_tree, linkage

    if g == len(f):
        return [[e] for e in range(len(f))]
    labels = cut_tree(linkage(features.numpy(), method="average", metric="euclidean"), n_clusters=g).reshape(-1)
    groups = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c).tolist()
        dom = max(members, key=lambda e: (f[e].item(), -e))
        groups.append([dom] + [e for e in members if e != dom])
    return sorted(groups)


# ---------------------------------------------------------------- merging one group


def merge_group(ws: list[dict[str, torch.Tensor]], f: torch.Tensor, align: bool) -> dict[str, torch.Tensor]:
    """W_G = sum_e f_e W_e / sum_e f_e over the group's experts ws (the dominant first), each aligned to the dominant
    when `align` (arXiv 2310.01334 Eq. 2). A group of one is returned unchanged (exact G = E identity). Unused groups
    (sum f = 0) are averaged uniformly."""
    if len(ws) == 1:
        return {k: v.clone() for k, v in ws[0].items()}
    if align:
        ws = [ws[0]] + [permute(w, alignment(ws[0], w)) for w in ws[1:]]
    f = f.double() if f.sum() > 0 else torch.ones(len(ws), dtype=torch.float64)
    c = f / f.sum()  # [n]
    return {k: sum(ci * w[k].double() for ci, w in zip(c, ws)).to(ws[0][k].dtype) for k in ws[0]}


def merge_rows(rows: torch.Tensor, f: torch.Tensor, policy: str) -> torch.Tensor:
    """One router row (or bias entry) per group from the members' rows [n, ...] (dominant first)."""
    if policy == "dominant" or len(rows) == 1:
        return rows[0].clone()
    f = f.double() if f.sum() > 0 else torch.ones(len(rows), dtype=torch.float64)
    c = (f / f.sum()).reshape(-1, *([1] * (rows.dim() - 1)))
    return (c * rows.double()).sum(0).to(rows.dtype)


def low_rank(w: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-r approximation U_r S_r V_r^T of a weight matrix (Eckart-Young), the low-rank half of MC-SMoE's
    compression step (arXiv 2310.01334 §3.3, which adds a sparse residual that we do not keep)."""
    if rank >= min(w.shape):
        return w.clone()
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(w.dtype)


# ---------------------------------------------------------------- the plan


@dataclass
class MergePlan:
    method: str
    groups: dict[int, list[list[int]]]  # decoder layer -> groups, each [dominant, members...]
    usage: dict[int, torch.Tensor] = field(repr=False)  # decoder layer -> f [E]

    def describe(self) -> dict:
        return {str(i): [{"dominant": g[0], "members": sorted(g)} for g in gs] for i, gs in self.groups.items()}


def _msmoe_layer(layer: MoELayer, x: torch.Tensor, g: int) -> tuple[list[list[int]], torch.Tensor]:
    f = usage(layer, x)
    with torch.no_grad():
        sim = router_similarity(layer.router_logits(x)[:, : layer.num_experts])  # routed experts' columns only
    return msmoe_groups(f, sim, g), f


def _hcsmoe_layer(layer: MoELayer, x: torch.Tensor, g: int) -> tuple[list[list[int]], torch.Tensor]:
    f = usage(layer, x)
    return hcsmoe_groups(mean_expert_outputs(layer, x), f, g), f


METHODS: Registry = Registry("merge method")
ALIGN_DEFAULT: dict[str, bool] = {}


def register(name: str, fn: Callable, align: bool) -> None:
    """A method: (layer, calibration inputs x [T, H], G) -> (groups, usage f [E]); `align` is its paper's default."""
    METHODS.register(name, fn)
    ALIGN_DEFAULT[name] = align


register("msmoe", _msmoe_layer, align=True)
register("hcsmoe", _hcsmoe_layer, align=False)  # HC-SMoE merges without permutation alignment


def plan_merge(view: MoEView, cal: Calibration, groups: int, method: str = "msmoe", progress=None) -> MergePlan:
    """Groups of experts per MoE layer from calibration inputs."""
    check_groups(view, groups)
    layer_method = METHODS.lookup(method)
    plan = MergePlan(method, {}, {})
    for layer in view.layers:
        x = cal.x[layer.index].to(layer.expert_params()[0].dtype)  # [T, H] as the model computed it
        plan.groups[layer.index], plan.usage[layer.index] = layer_method(layer, x, groups)
        if progress is not None:
            progress()
    return plan


def check_options(method: str, router: str, rank: int | None) -> None:
    """The options that need no model, checked before any weight is read."""
    METHODS.lookup(method)
    if router not in ROUTER_POLICIES:
        raise UserError(f"unknown --router {router!r}; known: {', '.join(ROUTER_POLICIES)}")
    if rank is not None:
        at_least("--low-rank", rank)


def check_groups(view: MoEView, groups: int) -> None:
    rule = view.layers[0].rule
    if not rule.top_k <= groups <= view.num_experts:
        raise UserError(f"--groups must be between top-k ({rule.top_k}) and the expert count ({view.num_experts}), "
                        f"got {groups}")
    if groups % rule.n_group:
        raise UserError(f"--groups must be a multiple of the router's {rule.n_group} expert groups, got {groups}")


# ---------------------------------------------------------------- applying it


def apply_merge(view: MoEView, plan: MergePlan, *, router: str = "dominant", align: bool | None = None,
                rank: int | None = None) -> dict:
    """Merge in place: compute every group's weights and router row from the original experts, slice the model to the
    dominants (`keep_experts`, each dominant keeps its slot order), then write the merged weights and rows."""
    check_options(plan.method, router, rank)
    align = ALIGN_DEFAULT[plan.method] if align is None else align
    merged = {m.index: _merged_layer(m, plan.groups[m.index], plan.usage[m.index], router, align, rank)
              for m in view.layers}
    keep_experts(view, {i: [g[0] for g in gs] for i, gs in plan.groups.items()})
    for layer in view.layers:
        _write_layer(layer, merged[layer.index])
    return {"router_policy": router, "aligned": align, "low_rank": rank}


def _merged_layer(layer, groups, f, router, align, rank):
    out = []
    for members in groups:
        idx = torch.as_tensor(members)
        w = merge_group([layer.get_expert(e) for e in members], f[idx], align)
        if rank is not None:
            w = {k: (low_rank(v, rank) if v.dim() == 2 else v) for k, v in w.items()}
        linear = _router_linear(layer)
        rows = {"weight": merge_rows(linear.weight.detach()[idx], f[idx], router)}
        if getattr(linear, "bias", None) is not None:
            rows["bias"] = merge_rows(linear.bias.detach()[idx], f[idx], router)
        if layer.correction_bias is not None:
            rows["correction"] = merge_rows(layer.correction_bias.detach()[idx], f[idx], router)
        out.append((w, rows))
    return out


def _write_layer(layer: MoELayer, merged) -> None:
    linear = _router_linear(layer)
    with torch.no_grad():
        for slot, (w, rows) in enumerate(merged):
            layer.set_expert(slot, w)
            linear.weight[slot] = rows["weight"]
            if "bias" in rows:
                linear.bias[slot] = rows["bias"]
            if "correction" in rows:
                layer.correction_bias[slot] = rows["correction"]  # a view of the [E] or [1, E] buffer


def _identity(layer: MoELayer) -> int:
    """LongCat-Flash's zero-compute experts sit after the routed ones; they are never merged (keep_experts keeps them)."""
    return getattr(layer, "identity_experts", 0)


def _router_linear(layer: MoELayer):
    """The module holding the router weight [E, H]: a Linear inside the router for HunYuan / AFMoE."""
    return getattr(layer, "router_linear", layer.router)


def layer_errors(view: MoEView, cal: Calibration) -> dict[int, float]:
    """Per MoE layer, ||Z - Z'||_F / ||Z||_F of the (edited) layer's output on the calibration inputs against the
    captured original outputs Z: a cheap, local measure of what an edit cost."""
    out = {}
    with torch.no_grad():
        for layer in view.layers:
            z, x = cal.z[layer.index], cal.x[layer.index]
            z2 = reference_moe_forward(layer, x.to(layer.expert_params()[0].dtype)).float()
            out[layer.index] = ((z - z2).norm() / z.norm().clamp_min(1e-12)).item()
    return out


def low_rank_params(view: MoEView, rank: int) -> int:
    """Routed-expert parameters if every merged matrix [m, n] were stored as U [m, r] V [r, n] (biases dense)."""
    total = 0
    for layer in view.layers:
        for v in layer.get_expert(0).values():
            total += layer.num_experts * (min(rank, *v.shape) * sum(v.shape) if v.dim() == 2 else v.numel())
    return total


def expert_bytes(view: MoEView) -> int:
    return sum(p.numel() * p.element_size() for m in view.layers for p in m.expert_params())


def model_bytes(view: MoEView) -> int:
    return sum(p.numel() * p.element_size() for p in view.model.parameters())


def merge(view: MoEView, cal: Calibration, groups: int, *, method: str = "msmoe", router: str = "dominant",
          align: bool | None = None, rank: int | None = None, progress=None) -> dict:
    """Plan + apply + measure; returns the compression.json report."""
    view.require("merge", resize=True, causal=True, routing=True)
    before = {"model_bytes": model_bytes(view), "expert_bytes": expert_bytes(view), "experts": view.num_experts}
    check_options(method, router, rank)
    plan = plan_merge(view, cal, groups, method, progress)
    applied = apply_merge(view, plan, router=router, align=align, rank=rank)
    report = {
        "method": f"merge-{method}",
        "paper": {"msmoe": "arXiv 2310.01334", "hcsmoe": "arXiv 2410.08589"}.get(method),
        **applied,
        "groups": view.num_experts,
        "groups_per_layer": plan.describe(),
        "calibration_tokens": cal.tokens,
        "before": before,
        "after": {"model_bytes": model_bytes(view), "expert_bytes": expert_bytes(view), "experts": view.num_experts},
        "layer_relative_error": {str(k): v for k, v in layer_errors(view, cal).items()},
    }
    if rank is not None:
        report["low_rank_note"] = ("stored as the dense product U V (HF checkpoints have no low-rank format); "
                                   "no sparse residual")
        report["low_rank_expert_params"] = low_rank_params(view, rank)
    return report
