"""Calibration capture: the inputs X and outputs Z of every MoE block on calibration text.

Everything the compression methods need derives from these through the view: router logits = layer.router_logits(X),
expert outputs = expert_mlp(X, layer.get_expert(e)), and the NAEE / PMQ reconstruction losses compare against Z.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from moekit.models.view import MoEView


@dataclass
class Calibration:
    x: dict[int, torch.Tensor] = field(default_factory=dict)  # decoder layer -> MoE block inputs [T, H]
    z: dict[int, torch.Tensor] = field(default_factory=dict)  # decoder layer -> MoE block outputs [T, H]
    tokens: int = 0


def collect(view: MoEView, batches: Iterable[torch.Tensor], max_tokens: int | None = None) -> Calibration:
    """Run the model on batches of token ids [B, S] (no padding), keeping every MoE block's input and output (float32,
    on CPU) until max_tokens tokens."""
    cal, parts_x, parts_z = Calibration(), {}, {}
    handles = [m.block.register_forward_hook(_keep(m.index, parts_x, parts_z)) for m in view.layers]
    try:
        with torch.no_grad():
            for ids in batches:
                view.forward(ids.to(view.model.device))
                cal.tokens += ids.numel()
                if max_tokens is not None and cal.tokens >= max_tokens:
                    break
    finally:
        for h in handles:
            h.remove()
    for index in parts_x:
        cal.x[index] = torch.cat(parts_x[index])[:max_tokens]
        cal.z[index] = torch.cat(parts_z[index])[:max_tokens]
    cal.tokens = min(cal.tokens, max_tokens or cal.tokens)
    return cal


def _keep(index, parts_x, parts_z):
    def hook(module, args, out):
        out = out[0] if isinstance(out, tuple) else out  # Llama 4's block also returns router logits
        x = args[0]
        parts_x.setdefault(index, []).append(x.reshape(-1, x.shape[-1]).float().cpu())
        parts_z.setdefault(index, []).append(out.reshape(-1, out.shape[-1]).float().cpu())

    return hook
