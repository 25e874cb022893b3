"""One typed view over a transformers MoE causal LM: its MoE layers, routers, routing rules, fused experts.

Dimension legend: T tokens, E experts, K selected per token, H hidden size, I expert intermediate size.
Canonical per-expert weights (what get_expert returns and set_expert takes), whatever the fused storage layout:
  gate [I, H], up [I, H], down [H, I]  (+ gate_bias [I], up_bias [I], down_bias [H] when the family has biases)
so an expert computes down(act(gate x) * up x) with F.linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.registry import Adapter, ExpertLayout
from moekit.ops.activations import GatedActivation
from moekit.ops.routing import RoutingRule, softcap


@dataclass
class MoELayer:
    index: int  # decoder-layer index in the model
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    rule: RoutingRule
    layout: ExpertLayout
    activation: GatedActivation
    adapter: Adapter
    shared: nn.Module | None = None
    shared_gate: nn.Module | None = None
    shared_mix: str = "sum"  # how routed and shared outputs combine: sum | average (Cohere2-MoE)
    routed_scale: float = 1.0  # factor on the routed-expert sum applied by the block, not the router (Laguna)
    router_softcap: float = 0.0  # > 0: the router soft-caps its logits (Laguna)
    post_norm: nn.Module | None = None  # applied to the block's combined output (AXK1)
    identity_experts: int = 0  # ids E .. E + identity_experts - 1 output their input (LongCat-Flash zero experts)

    @property
    def num_experts(self) -> int:
        """Routed experts with weights (LongCat-Flash's gate_up_proj also has rows for its identity experts)."""
        return self._fused("down_proj").shape[0]

    @property
    def intermediate_size(self) -> int:
        return self._fused("down_proj").shape[1 if self.layout.transposed else 2]

    @property
    def correction_bias(self) -> torch.Tensor | None:  # [E], selection only
        buffer = self.correction_bias_buffer
        return None if buffer is None else buffer.reshape(-1)

    @property
    def correction_bias_buffer(self) -> torch.Tensor | None:
        """The module's own selection-bias tensor ([E] or [1, E]), wherever the family keeps it (router or block)."""
        if self.adapter.correction_bias is None or not self.rule.correction_bias:
            return None  # LFM2-MoE: the bias exists only when config.use_expert_bias
        owner = self.block if self.adapter.correction_bias_on_block else self.router
        return _get_path(owner, self.adapter.correction_bias)

    @property
    def router_linear(self) -> nn.Module:
        """The module holding the router weight [E, H] (and bias): the router itself, or a Linear inside it."""
        return _get_path(self.router, self.adapter.router_linear) if self.adapter.router_linear else self.router

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] for MoE-block inputs x [T, H], computed as the family's router does."""
        linear = self.router_linear
        weight, bias = linear.weight, getattr(linear, "bias", None)
        if self.adapter.router_fp32:
            x, weight = x.float(), weight.float()
            bias = bias.float() if bias is not None else None
        # routers whose weight dtype differs from the activations' (HunYuan's float32 `wg`) cast the input to it
        logits = F.linear(x.to(weight.dtype), weight, bias)
        return softcap(logits.float(), self.router_softcap) if self.router_softcap > 0 else logits

    def parse_router_output(self, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The router module's return value -> (logits [T, E], weights [T, K], ids [T, K]) as the model used them."""
        if self.adapter.router_output == "scores_logits":  # Llama 4: dense sigmoid scores, zero off the top-k
            scores, logits = out
            weights, ids = scores.topk(self.rule.top_k, dim=-1)
            return logits, weights, ids
        logits, weights, ids = out
        return logits, weights, ids

    def combine(self, routed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Block output [T, H] from the weighted routed-expert sum [T, H] and the block input x [T, H], in the
        family's op order: routed x routed_scale, then + shared expert, averaged when shared_mix is "average", then
        the block's post-norm."""
        out = routed * self.routed_scale if self.routed_scale != 1.0 else routed
        if self.shared is not None:
            out = out + self.shared_forward(x)
            out = out / 2 if self.shared_mix == "average" else out
        return self.post_norm(out) if self.post_norm is not None else out

    def shared_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shared-expert contribution [T, H] (zeros when the family has none)."""
        if self.shared is None:
            return torch.zeros_like(x)
        y = self.shared(x)
        if self.shared_gate is not None:
            y = torch.sigmoid(self.shared_gate(x)) * y
        return y

    def get_expert(self, e: int) -> dict[str, torch.Tensor]:
        """Copies of expert e's weights in canonical orientation (see the module docstring)."""
        return {k: v.clone(memory_format=torch.contiguous_format) for k, v in self.expert_views(e).items()}

    def set_expert(self, e: int, weights: dict[str, torch.Tensor]) -> None:
        views = self.expert_views(e)
        if set(weights) != set(views):
            raise ValueError(f"expert weights need keys {sorted(views)}, got {sorted(weights)}")
        with torch.no_grad():
            for k, v in weights.items():
                if v.shape != views[k].shape:
                    raise ValueError(f"{k}: expected shape {tuple(views[k].shape)}, got {tuple(v.shape)}")
                views[k].copy_(v)

    def expert_numel(self) -> int:
        """Parameters of one routed expert."""
        return sum(v.numel() for v in self.expert_views(0).values())

    def expert_params(self) -> list[nn.Parameter]:
        return [p for p in self.experts.parameters(recurse=False)]

    def _fused(self, name: str) -> torch.Tensor:
        return getattr(self.experts, name).detach()  # detached view: writes land in the parameter's storage

    def expert_views(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e's weights in canonical orientation as views into the fused storage: no copy (read-only use;
        writing through them edits the model)."""
        lay, views = self.layout, {}
        if lay.has_gate:
            gu = self._fused("gate_up_proj")[e]  # [2I, H], or [H, 2I] transposed
            gu = gu.T if lay.transposed else gu  # [2I, H]
            views["gate"], views["up"] = _split_gate_up(gu, lay.interleaved)
        else:
            up = self._fused("up_proj")[e]
            views["up"] = up.T if lay.transposed else up  # [I, H]
        down = self._fused("down_proj")[e]
        views["down"] = down.T if lay.transposed else down  # [H, I]
        if lay.has_bias:
            bias_name = "gate_up_proj_bias" if lay.has_gate else "up_proj_bias"
            b = self._fused(bias_name)[e]  # [2I] or [I]
            if lay.has_gate:
                views["gate_bias"], views["up_bias"] = _split_gate_up(b, lay.interleaved)
            else:
                views["up_bias"] = b
            views["down_bias"] = self._fused("down_proj_bias")[e]  # [H]
        return views


def _split_gate_up(t: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return t[0::2], t[1::2]
    half = t.shape[0] // 2
    return t[:half], t[half:]


def _get_path(module: nn.Module, path: str):
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class MoEView:
    model: nn.Module
    adapter: Adapter
    layers: list[MoELayer]  # the MoE layers, in model order
    dense_layers: list[int] = field(default_factory=list)  # decoder layers with a dense MLP

    @property
    def config(self):
        return self.model.config

    @property
    def model_type(self) -> str:
        return self.adapter.model_type

    @property
    def num_layers(self) -> int:
        return len(self.layers) + len(self.dense_layers)

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts

    @property
    def top_k(self) -> int:
        return self.layers[0].rule.top_k

    def layer(self, index: int) -> MoELayer:
        """The MoE layer at decoder-layer `index`."""
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise KeyError(f"decoder layer {index} is not an MoE layer; MoE layers: {[m.index for m in self.layers]}")

    def param_counts(self) -> dict[str, int]:
        """Total parameters, and those active for one token (every non-routed parameter plus K routed experts per MoE
        layer). Embeddings count in both; tied embeddings count once."""
        total = sum(p.numel() for p in self.model.parameters())
        routed = sum(sum(p.numel() for p in m.expert_params()) for m in self.layers)
        active_routed = sum(m.rule.top_k * m.expert_numel() for m in self.layers)
        return {"total": total, "active": total - routed + active_routed, "routed_experts": routed}

    def bytes_per_expert(self) -> int:
        layer = self.layers[0]
        return layer.expert_numel() * layer.expert_params()[0].element_size()
