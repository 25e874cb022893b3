"""The slow reference MoE block: route, loop over experts, add shared experts, using only the MoE view.

Every fast path in moekit (offloaded runtime, pruned or merged checkpoints) is tested against this, and this is tested
against transformers' own forward (tests/ops/test_reference_vs_hf.py). Derived from vLLM's `torch_moe` test helper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F



def expert_mlp(x: torch.Tensor, w: dict[str, torch.Tensor], activation, post=None) -> torch.Tensor:
    """One expert on x [T, H] with canonical weights gate/up [I, H], down [H, I] (+ optional biases) -> [T, H].
    post: the norm every expert's output goes through (MuseSpark's post_expert_norm; MoELayer.expert_norm)."""
    up = F.linear(x, w["up"], w.get("up_bias"))  # [T, I]
    h = activation(F.linear(x, w["gate"], w.get("gate_bias")), up) if "gate" in w else activation(up)
    y = F.linear(h, w["down"], w.get("down_bias"))
    return post(y) if post is not None else y


def reference_moe_forward(layer, hidden: torch.Tensor, *, token_ids: torch.Tensor | None = None,
                          state: torch.Tensor | None = None) -> torch.Tensor:
    """MoE block output for hidden [..., H] ([B, S, H]: B sequences, for capacity), looping over experts (`layer` is a
    `moekit.models.MoELayer`). token_ids [B, S]: for hash-routed layers; state: Zaya's router state."""
    shape = hidden.shape
    x = hidden.reshape(-1, shape[-1])  # [T, H]
    sequences = shape[0] if hidden.dim() == 3 else 1
    weights, ids = layer.route(x, token_ids=token_ids, state=state, sequences=sequences)  # [T, K], [T, K]
    xe = layer.expert_input(x)  # [T, H'], H' = H unless the experts work in a latent space
    out = torch.zeros_like(xe)
    for e in range(layer.num_experts + layer.identity_experts):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        w = weights[tok, slot, None].to(x.dtype)  # [t, 1]
        if e >= layer.num_experts:  # zero-compute expert: its output is its input
            y = xe[tok] * w
        elif layer.rule.weight_on_input:
            y = expert_mlp(xe[tok] * w, layer.expert_views(e), layer.activation, layer.expert_norm)
        else:
            y = expert_mlp(xe[tok], layer.expert_views(e), layer.activation, layer.expert_norm) * w
        out.index_add_(0, tok, y)
    return layer.combine(out, x).reshape(shape)


def reference_block_call(layer, args: tuple, kwargs: dict) -> torch.Tensor:
    """The reference output for one captured call of the MoE block, from the inputs the model gave it: hidden states,
    and a hash layer's token ids (DeepSeek-V4 `input_ids=`) or Zaya's router state (`prev_router_hidden_states`)."""
    hidden = args[0]
    token_ids = kwargs.get("input_ids") if layer.rule.hashed else None
    state = None
    if layer.adapter.router_state:
        state = kwargs.get("prev_router_hidden_states", args[1] if len(args) > 1 else None)
    return reference_moe_forward(layer, hidden, token_ids=token_ids, state=state)
