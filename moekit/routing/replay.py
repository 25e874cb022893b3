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
  With K_m = c * K_t and E_m >= c * E_t (blocks of at least c) every selection is the first c members of each of
  the token's trace experts' blocks, so a window's counts are the trace's, duplicated c times: SRP is preserved
  exactly, and SCH at c times the capacity nearly (tests/routing/test_steering.py, tests/benchmarks/
  test_workload.py). Otherwise (K_m not a multiple of K_t, or E_m < E_t collapsing experts) it is not preserved by
  construction: a sticky 16-expert top-4 routing replayed on 8 experts top-3 lost 0.10 of SRP, on 4 top-3 0.33
  (benchmarks/_workload.py `locality_kept` measures it for a run);
- tokens: each layer reads the trace's tokens as one stream, T rows per router call, wrapping at its end.
The weights are the model's own rule on the replayed set (its router's scores for those experts).

Per sequence: the bound policy used as it is (`RoutingHooks.set_all(policy)`) reads the stream from row 0. Each
per-sequence copy (`fresh()` / `Routing.for_prompt`, one per sequence: serve's choices, `moekit run`'s prompt) is
numbered n = 0, 1, 2, ... in the order they are made from the bound policy, and starts at the first row of the trace's
(n mod S)-th traced sequence (S traced sequences, in trace order); from there it reads on in order, into the next
traced sequence when its own runs out. So the first sequence (`moekit run`'s one prompt) replays from row 0 as
before, and concurrent sequences of a server replay different traced sequences (different users, different
domains), not the same rows in lockstep: with one shared stream every sequence of a batch would route identically,
a degenerate serving workload.
"""

from __future__ import annotations

import itertools
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


def sequence_starts(trace) -> np.ndarray:
    """[S] the first row of each traced sequence (rows of one sequence are contiguous, in trace order)."""
    seq = trace.seq_id  # [T]
    return np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]]) if seq.size else np.zeros(1, np.int64)


def source_layer(i: int, trace_layers: int, model_layers: int) -> int:
    """The trace layer (position in the trace's MoE layers) that model MoE layer i (position) follows."""
    return i * trace_layers // model_layers


def mapped_layers(trace, view, what: str = "replay", rows: slice = slice(None)) -> list[tuple[int, int, np.ndarray]]:
    """(model decoder-layer index, trace decoder-layer index, model ids [T, K_m]) for every MoE layer of `view`: the
    trace's routing (its tokens `rows`) mapped onto this model (the module docstring's mapping). `view` may be a meta
    view (no weights)."""
    if trace.kind != "tokens" or trace.num_tokens == 0:
        raise UserError(f"{what}: the trace {trace.folder} has no per-token routing to replay")
    out = []
    for i, layer in enumerate(view.layers):
        source = trace.layers[source_layer(i, len(trace.layers), len(view.layers))]
        out.append((layer.index, source, map_ids(trace.ids(source)[rows], trace.num_experts, view.num_experts,
                                                 layer.rule.top_k)))
    return out


def map_weights(ids: np.ndarray, weights: np.ndarray, mapped: np.ndarray, trace_experts: int,
                model_experts: int) -> np.ndarray:
    """The trace's weights [T, K_t] carried to the mapped ids [T, K_m]: a model expert gets the weight of the trace
    expert whose block holds it, shared evenly over that block (summed where blocks collapse onto one expert); ids the
    fill-up added get 0. For what-if tools that need weights (the simulator's score policy); the live policy uses the
    model's own rule instead."""
    share = np.zeros((trace_experts, model_experts))  # [E_t, E_m]
    for e, block in enumerate(expert_blocks(trace_experts, model_experts)):
        share[e, block] = 1.0 / len(block)
    T = ids.shape[0]
    dense = np.zeros((T, trace_experts))  # [T, E_t]
    real = ids < trace_experts  # a policy trace's dropped slots carry no weight
    rows = np.broadcast_to(np.arange(T)[:, None], ids.shape)
    np.add.at(dense, (rows[real], ids[real].astype(np.int64)), np.nan_to_num(weights[real]))
    return np.take_along_axis(dense @ share, mapped, axis=1).astype(np.float32)  # [T, K_m]


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
        self._ids: dict[int, np.ndarray] = {}  # decoder layer -> mapped ids [T, K_m]
        self._starts = np.zeros(1, np.int64)  # [S] first row of each traced sequence
        self._issued = itertools.count()  # per-sequence copies made from the bound policy (shared by its copies)

    def bind(self, view):
        import moekit.trace

        trace = moekit.trace.open(self.path)
        self._ids = {index: ids for index, _, ids in mapped_layers(trace, view, self.spec())}
        self._starts = sequence_starts(trace)
        self._issued = itertools.count()

    def fresh(self):
        """A per-sequence copy: the n-th made from the bound policy starts at traced sequence n mod S (the module
        docstring); an unbound copy (structure checks) takes no number."""
        r = Replay(self.path)
        r._ids, r._starts, r._issued = self._ids, self._starts, self._issued  # shared (the ids read-only)
        if self._ids:
            start = int(self._starts[next(self._issued) % len(self._starts)])  # next(): atomic under the GIL
            r.cursor = {index: start for index in self._ids}
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
