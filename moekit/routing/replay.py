"""replay=TRACE: the routers follow a recorded trace's expert ids, mapped to this model's expert count and top-k.

What it is for: "how would my model's routing behave offloaded at another size" (replay a real model's trace on a
synthetic model of realistic expert size), and a realistic routing workload for the offload benchmark (random weights
route almost uniformly, which no trained model does).

The mapping, trace (E_t experts, top-K_t, L_t MoE layers) -> model (E_m, K_m, L_m):
- layers: model MoE layer i follows trace layer floor(i * L_t / L_m);
- experts: trace expert e owns the block of model experts [floor(e * E_m / E_t), floor((e + 1) * E_m / E_t)) (one
  expert when E_m <= E_t, several when larger). A token's model experts are read slot-major: the first member of each
  of its trace experts' blocks (by weight), then the second members, ...; duplicates dropped, the first K_m kept;
  when fewer than K_m remain (E_m < E_t collapses experts), the next free ids after the token's first one fill up.
  With E_m = c * E_t and K_m = c * K_t every selection is one trace expert's whole block, so a window's counts are
  the trace's, duplicated c times: SRP is preserved exactly, and SCH nearly (tests/routing/test_replay.py);
- tokens: each layer reads the trace's tokens as one stream, T rows per router call, wrapping at its end.
The weights are the model's own rule on the replayed set (its router's scores for those experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moekit.errors import UserError
from moekit.routing.policies import Policy, register


def expert_blocks(trace_experts: int, model_experts: int) -> list[np.ndarray]:
    """For each trace expert, the model experts it maps to (ascending)."""
    edges = [e * model_experts // trace_experts for e in range(trace_experts + 1)]
    return [np.arange(edges[e], max(edges[e + 1], edges[e] + 1)) for e in range(trace_experts)]


def map_ids(ids: np.ndarray, trace_experts: int, model_experts: int, model_k: int) -> np.ndarray:
    """Trace ids [T, K_t] (weight order) -> model ids [T, K_m] (see the module docstring)."""
    blocks = expert_blocks(trace_experts, model_experts)
    width = max(len(b) for b in blocks)
    table = np.full((trace_experts, width), -1, np.int64)
    for e, b in enumerate(blocks):
        table[e, :len(b)] = b
    out = np.empty((ids.shape[0], model_k), np.int64)
    for t, row in enumerate(ids.astype(np.int64)):
        row = row[row < trace_experts]  # a policy trace's dropped slots
        seq = table[row].T.reshape(-1)  # slot-major: first members, then second members, ...
        picked = list(dict.fromkeys(int(x) for x in seq if x >= 0))[:model_k]
        nxt = picked[0] if picked else 0
        while len(picked) < model_k:
            nxt = (nxt + 1) % model_experts
            if nxt not in picked:
                picked.append(nxt)
        out[t] = picked
    return out


@register("replay")
@dataclass
class Replay(Policy):
    path: Path
    cursor: dict[int, int] = field(default_factory=dict)  # decoder layer -> next trace token
    selects = True
    reads_files = True
    example = "replay=out/demo-trace"

    @classmethod
    def from_spec(cls, value):
        return cls(Path(value))

    def __post_init__(self):
        self.path = Path(self.path)
        if not (self.path / "manifest.json").is_file():
            raise UserError(f"replay={self.path}: no trace there (record one with `moekit trace MODEL --out DIR`)")
        self._ids: dict[int, np.ndarray] = {}

    def bind(self, view):
        import moekit.trace

        trace = moekit.trace.open(self.path)
        if trace.kind != "tokens" or trace.num_tokens == 0:
            raise UserError(f"replay={self.path}: the trace has no per-token routing to replay")
        E = view.num_experts
        for i, layer in enumerate(view.layers):
            source = trace.layers[i * len(trace.layers) // len(view.layers)]
            self._ids[layer.index] = map_ids(trace.ids(source), trace.num_experts, E, layer.rule.top_k)

    def fresh(self):
        r = Replay(self.path)
        r._ids = self._ids  # read-only, shared
        return r

    def plan(self, layer, plan, span):
        ids = self._ids[layer.index]
        T = plan.logits.shape[0]
        at = self.cursor.get(layer.index, 0)
        rows = np.arange(at, at + T) % ids.shape[0]
        self.cursor[layer.index] = (at + T) % ids.shape[0]
        chosen = torch.from_numpy(ids[rows])  # [T, K_m]
        keep = torch.zeros(plan.logits.shape, dtype=torch.bool).scatter_(1, chosen, True)
        plan.keep = lambda choice, probs, top_k: keep

    def spec(self):
        return f"replay={self.path}"
