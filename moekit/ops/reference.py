"""The slow reference MoE block: route, loop over experts, add shared experts, using only the MoE view.

Every fast path in moekit (offloaded runtime, pruned or merged checkpoints) is tested against this, and this is tested
against transformers' own forward (tests/ops/test_reference_vs_hf.py). Derived from vLLM's `torch_moe` test helper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.ops.routing import route


def expert_mlp(x: torch.Tensor, w: dict[str, torch.Tensor], activation) -> torch.Tensor:
    """One expert on x [T, H] with canonical weights gate/up [I, H], down [H, I] (+ optional biases) -> [T, H]."""
    up = F.linear(x, w["up"], w.get("up_bias"))  # [T, I]
    h = activation(F.linear(x, w["gate"], w.get("gate_bias")), up) if "gate" in w else activation(up)
    return F.linear(h, w["down"], w.get("down_bias"))


def reference_moe_forward(layer, hidden: torch.Tensor) -> torch.Tensor:
    """MoE block output for hidden [..., H], looping over experts (`layer` is a `moekit.models.MoELayer`)."""
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1])  # [T, H]
    weights, ids = route(layer.router_logits(x), layer.rule, layer.correction_bias)  # [T, K], [T, K]
    out = torch.zeros_like(x)
    for e in range(layer.num_experts + layer.identity_experts):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        w = weights[tok, slot, None].to(x.dtype)  # [t, 1]
        if e >= layer.num_experts:  # zero-compute expert: its output is its input
            y = x[tok] * w
        elif layer.rule.weight_on_input:
            y = expert_mlp(x[tok] * w, layer.expert_views(e), layer.activation)
        else:
            y = expert_mlp(x[tok], layer.expert_views(e), layer.activation) * w
        out.index_add_(0, tok, y)
    return layer.combine(out, x).reshape(shape)
