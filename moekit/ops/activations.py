"""Gated activations of expert MLPs: act(gate) * up, and GPT-OSS's clamped SwiGLU."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.activations import ACT2FN

GatedActivation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate [T, I], up [T, I]) -> [T, I]


def glu(name: str) -> GatedActivation:
    """act(gate) * up with a transformers activation name (silu for SwiGLU, gelu for GeGLU, ...)."""
    act = ACT2FN[name]
    return lambda gate, up: act(gate) * up


def swiglu_oai(alpha: float, limit: float) -> GatedActivation:
    """GPT-OSS: gate clamped above at `limit`, up clamped to [-limit, limit], gate * sigmoid(alpha * gate) * (up + 1)."""

    def fn(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return fn
