"""Expert activations: act(gate) * up, GPT-OSS's and DeepSeek-V4's clamped SwiGLUs, Inkling2's soft-capped SwiGLU, and
act(up) for experts without a gate (NemotronH, Switch, NLLB-MoE, Doge)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.activations import ACT2FN

GatedActivation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate [T, I], up [T, I]) -> [T, I]


def glu(name: str) -> GatedActivation:
    """act(gate) * up with a transformers activation name (silu for SwiGLU, gelu for GeGLU, ...)."""
    act = ACT2FN[name]
    return lambda gate, up: act(gate) * up


def plain(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """act(up) for experts without a gate projection (relu2 in NemotronH, relu in Switch / NLLB-MoE)."""
    return ACT2FN[name]


def clamped_glu(name: str, limit: float) -> GatedActivation:
    """DeepSeek-V4 / Step-3.5: gate clamped above at `limit` (before the activation), up clamped to [-limit, limit],
    act(gate) * up (DeepseekV4Experts._apply_gate)."""
    act = ACT2FN[name]

    def fn(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return act(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)

    return fn


def clamped_after_glu(name: str, limit: float) -> GatedActivation:
    """Step-3.5: act(gate) clamped above at `limit` (after the activation), up clamped to [-limit, limit]
    (Step3p7Experts._apply_gate; limit inf: plain act(gate) * up)."""
    act = ACT2FN[name]

    def fn(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return act(gate).clamp(max=limit) * up.clamp(min=-limit, max=limit)

    return fn


def swiglu_oai(alpha: float, limit: float) -> GatedActivation:
    """GPT-OSS: gate clamped above at `limit`, up clamped to [-limit, limit], gate * sigmoid(alpha * gate) * (up + 1)."""

    def fn(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return fn


def softcapped_swiglu(gate_cap: float, up_cap: float) -> GatedActivation:
    """Inkling2: in float32, softcap(gate) * sigmoid(gate) * softcap(up) with softcap(v) = cap * tanh(v / cap); the
    sigmoid sees the raw gate, the caps bound only the linear gate factor and `up`."""

    def fn(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        dtype = gate.dtype
        gate, up = gate.float(), up.float()
        capped_gate = torch.tanh(gate / gate_cap) * gate_cap
        return (capped_gate * torch.sigmoid(gate) * (torch.tanh(up / up_cap) * up_cap)).to(dtype)

    return fn
