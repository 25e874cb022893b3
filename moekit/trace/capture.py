"""Capture hooks: a forward hook on each MoE layer's router records what the model routed, as the model used it.

The hook keeps references only; the per-batch work (sort by weight, drop padding, copy to numpy) runs once per layer
after the forward, vectorised, so tracing adds little to a forward pass (benchmarks/trace_overhead.py).
Dimension legend: B batch, S sequence length, T = B*S tokens, K selected, E experts, H hidden, I intermediate, L layers.
"""

from __future__ import annotations

import numpy as np
import torch

from moekit.trace.schema import ids_dtype


class RouterCapture:
    """Context manager: hooks on the routers (and, for activation stats, the experts) of every MoE layer of a view."""

    def __init__(self, view, *, logits: bool = False, activation_stats: bool = False, width: int | None = None,
                 id_dtype=None):
        """width: selections kept per token (a routing policy's widest K; narrower tokens padded with the sentinel id,
        E + zero experts, and weight 0). None: the model's top-k."""
        self.view, self.logits, self.activation_stats = view, logits, activation_stats
        self.ids_dtype = id_dtype if id_dtype is not None else ids_dtype(view.num_experts)
        self.width = width
        self.runs = view.trace_layers()  # (trace index, layer, pass, kind): a loop layer's passes are traced apart
        self._index = {(m.index, p): i for i, m, p, _ in self.runs}
        self._slot = {i: slot for slot, (i, *_) in enumerate(self.runs)}
        self._seen: dict[int, tuple] = {}  # trace index -> (weights [T, K], ids [T, K], logits [T, E] | None)
        self._calls: dict[int, int] = {}  # decoder layer -> router calls in this forward (its pass)
        self._handles = []
        L, E = len(self.runs), view.num_experts
        self.act_in = np.zeros((L, E), np.float32)  # running max |input| of each expert's down projection
        self.act_out = np.zeros((L, E), np.float32)  # running max |output| of it

    def __enter__(self):
        for layer in self.view.layers:
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer)))
            if self.activation_stats:
                self._handles.append(layer.experts.register_forward_hook(self._experts_hook(layer)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _router_hook(self, layer):
        def hook(module, args, out):
            run = self._calls.get(layer.index, 0)  # the pass of a loop layer
            self._calls[layer.index] = run + 1
            logits, weights, ids = layer.parse_router_output(out)
            self._seen[self._index[layer.index, run]] = (weights.detach(), ids.detach(),
                                                         logits.detach() if self.logits else None)

        return hook

    def _experts_hook(self, layer):
        def hook(module, args, out):
            x = args[0]  # every supported family passes the expert input positionally
            index = self._index[layer.index, self._calls[layer.index] - 1]  # the router ran first in the same block
            ids = self._seen[index][1]  # [T, K]
            down_in, down_out = expert_down_maxima(layer, x.detach(), ids, self.view.num_experts)
            slot = self._slot[index]
            np.maximum(self.act_in[slot], down_in, out=self.act_in[slot])
            np.maximum(self.act_out[slot], down_out, out=self.act_out[slot])

        return hook

    def pop_activation_maxima(self) -> tuple[np.ndarray, np.ndarray]:
        """([L, E] max |in|, [L, E] max |out|) since the last call; each chunk stores its own, the reader takes the max."""
        maxima = (self.act_in.copy(), self.act_out.copy())
        self.act_in[:], self.act_out[:] = 0, 0
        return maxima

    def take(self, keep: torch.Tensor) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Per decoder layer: (ids [t, K], weights [t, K] float32, logits [t, E] float16 | None) of the tokens where
        keep [T] is true, selections ordered by weight descending. Clears what the hooks saw."""
        missing = [i for i, *_ in self.runs if i not in self._seen]
        assert not missing, f"router hooks did not fire for layers {missing}"
        self._calls.clear()
        out = {}
        for index, layer, *_ in self.runs:
            weights, ids, logits = self._seen.pop(index)
            weights, ids = sort_by_weight(weights[keep].float(), ids[keep])  # [t, K]
            if self.width is not None and ids.shape[1] != self.width:
                assert ids.shape[1] < self.width, f"layer {layer.index} selected {ids.shape[1]} > {self.width} experts"
                pad = self.width - ids.shape[1]
                ids = torch.nn.functional.pad(ids, (0, pad), value=layer.num_experts + layer.identity_experts)
                weights = torch.nn.functional.pad(weights, (0, pad))
            lg = logits[keep].to(torch.float16).numpy() if logits is not None else None  # [t, E]
            out[index] = (ids.numpy().astype(self.ids_dtype), weights.numpy(), lg)
        return out


def sort_by_weight(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each token's selections by weight, descending (stable: equal weights keep the router's order)."""
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)  # [T, K]
    return weights.gather(-1, order), ids.gather(-1, order)


def expert_down_maxima(layer, x: torch.Tensor, ids: torch.Tensor, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Max |input| and max |output| of each expert's down projection over the tokens routed to it -> ([E], [E]).

    Recomputed from the canonical expert weights of the MoE view on the experts module's actual input, so it works
    for every family without patching transformers (Super Experts, arXiv 2507.23279, records the same two maxima).
    Llama 4's experts take every token for every expert, pre-scaled by its routing score: rows [e*T, (e+1)*T).
    """
    T = ids.shape[0]
    per_expert = x.view(num_experts, T, -1) if x.shape[0] == num_experts * T else None  # Llama 4: [E, T, H]
    max_in, max_out = np.zeros(num_experts, np.float32), np.zeros(num_experts, np.float32)
    for e in torch.unique(ids).tolist():
        tokens = (ids == e).any(dim=-1).nonzero().squeeze(-1)  # [t]
        xe = per_expert[e, tokens] if per_expert is not None else x[tokens]  # [t, H]
        h, y = _down_io(xe, layer.expert_views(e), layer.activation)
        max_in[e], max_out[e] = h.abs().max().float().item(), y.abs().max().float().item()
    return max_in, max_out


def _down_io(x: torch.Tensor, w: dict[str, torch.Tensor], activation) -> tuple[torch.Tensor, torch.Tensor]:
    """The down projection's input [t, I] and output [t, H] for one expert (as moekit.ops.reference.expert_mlp)."""
    up = torch.nn.functional.linear(x, w["up"], w.get("up_bias"))
    h = activation(torch.nn.functional.linear(x, w["gate"], w.get("gate_bias")), up) if "gate" in w else activation(up)
    return h, torch.nn.functional.linear(h, w["down"], w.get("down_bias"))
