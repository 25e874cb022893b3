"""What a placement is: the cluster shape and engine constraints (`Topology`), and the plan itself (`Plan`).

Dimension legend: L MoE layers, E logical experts, P = E + R physical slots, G GPUs (EP ranks), N nodes.
Slot p sits on GPU p // (P / G) and GPU g on node g // (G / N): SGLang's `_compute_gpu_id_of_physical_expert`, vLLM's
linear placement and EPLB's own layout all agree on this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moekit.errors import UserError


@dataclass(frozen=True)
class Topology:
    """The cluster and the model's router, checked against the rules SGLang and vLLM enforce (one-line refusals)."""

    num_experts: int  # E, logical routed experts per MoE layer
    gpus: int  # G, expert-parallel ranks
    nodes: int = 1  # N
    redundant: int = 0  # R, extra physical slots per layer (SGLang --ep-num-redundant-experts, vLLM num_redundant_experts)
    num_groups: int = 1  # the router's expert groups (n_group); 1 = no group-limited routing
    topk_group: int = 1  # groups a token may pick from
    top_k: int | None = None  # experts per token, when known

    def __post_init__(self):
        E, G, N, R = self.num_experts, self.gpus, self.nodes, self.redundant
        if G < 1 or N < 1 or R < 0 or E < 1:
            raise UserError(f"need --gpus >= 1, --nodes >= 1 and --redundant >= 0, got {G}, {N} and {R}")
        if G % N:
            raise UserError(f"--gpus {G} is not a multiple of --nodes {N}: every node must hold the same number of GPUs "
                            f"(EPLB asserts num_gpus % num_nodes == 0)")
        if (E + R) % G:
            fix = ", ".join(str(r) for r in _valid_redundant(E, G))
            raise UserError(f"E + R = {E} + {R} = {E + R} physical experts do not split evenly over {G} GPUs "
                            f"(SGLang and vLLM need (E + R) % G == 0): use --redundant {fix}")
        if self.num_groups > 1:
            self._check_groups()

    def _check_groups(self) -> None:
        E, n, tg = self.num_experts, self.num_groups, self.topk_group
        if E % n:
            raise UserError(f"the router's {n} expert groups do not divide {E} experts (SGLang, vLLM and EPLB split "
                            f"experts into equal groups): this model cannot be served with expert parallelism")
        if not 1 <= tg <= n:
            raise UserError(f"topk_group {tg} must be in [1, n_group = {n}] (vLLM grouped top-k)")
        if self.top_k is not None and self.top_k > tg * (E // n):
            raise UserError(f"top-{self.top_k} is more than topk_group x experts per group = {tg} x {E // n}: the "
                            f"engines' grouped top-k cannot pick that many experts (vLLM checks top_k <= topk_group * "
                            f"E / n_group)")

    @property
    def slots(self) -> int:
        """P: physical experts per layer."""
        return self.num_experts + self.redundant

    @property
    def slots_per_gpu(self) -> int:
        return self.slots // self.gpus

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes

    def gpu_of_slot(self) -> np.ndarray:
        return np.arange(self.slots) // self.slots_per_gpu  # [P]

    def node_of_gpu(self) -> np.ndarray:
        return np.arange(self.gpus) // self.gpus_per_node  # [G]

    def hierarchical(self) -> bool:
        """EPLB's policy rule (eplb.py rebalance_experts): hierarchical when the nodes divide the groups."""
        return self.num_groups % self.nodes == 0

    def as_dict(self) -> dict:
        return {"num_experts": self.num_experts, "gpus": self.gpus, "nodes": self.nodes, "redundant": self.redundant,
                "physical_experts": self.slots, "slots_per_gpu": self.slots_per_gpu, "num_groups": self.num_groups,
                "topk_group": self.topk_group, "top_k": self.top_k}


def _valid_redundant(E: int, G: int, n: int = 3) -> list[int]:
    first = (-E) % G
    return [first + i * G for i in range(n)]


@dataclass
class Plan:
    """A placement for every MoE layer: phy2log[l, p] is the logical expert in physical slot p."""

    topology: Topology
    phy2log: np.ndarray  # [L, P] int64
    layers: list[int]  # decoder-layer index of each MoE layer (row l of phy2log)
    num_hidden_layers: int  # every decoder layer, dense ones included (SGLang's map has one row per layer)
    method: str = "default"
    solver: str = ""  # what actually ran (e.g. "milp (HiGHS): optimal" or "eplb start + swap search")
    info: dict = field(default_factory=dict)  # method details: objective, timings, options

    def __post_init__(self):
        self.phy2log = np.asarray(self.phy2log, dtype=np.int64)
        L, P = self.phy2log.shape
        assert P == self.topology.slots and L == len(self.layers), (self.phy2log.shape, self.topology, self.layers)
        assert max(self.layers) < self.num_hidden_layers, (self.layers, self.num_hidden_layers)

    @property
    def logcnt(self) -> np.ndarray:
        """[L, E] replicas of each logical expert."""
        E = self.topology.num_experts
        return np.stack([np.bincount(row, minlength=E) for row in self.phy2log])

    @property
    def log2phy(self) -> np.ndarray:
        """[L, E, max replicas] slots of each logical expert, ascending (SGLang's order), padded with -1."""
        L, E = len(self.layers), self.topology.num_experts
        out = np.full((L, E, int(self.logcnt.max())), -1, np.int64)
        for l, row in enumerate(self.phy2log):
            for e in range(E):
                slots = np.flatnonzero(row == e)
                out[l, e, : len(slots)] = slots
        return out

    def shares(self) -> np.ndarray:
        """[L, E, G] fraction of expert e's tokens that GPU g serves when tokens split evenly over the replicas (EPLB's
        load model; SGLang's `dynamic` and vLLM's random replica choice in expectation)."""
        return shares_from_rows(self.phy2log, self.topology)

    def sglang_map(self) -> np.ndarray:
        """[num_hidden_layers, P] SGLang's physical_to_logical_map: the plan on MoE layers, trivial rows elsewhere."""
        out = trivial_rows(self.num_hidden_layers, self.topology)
        out[self.layers] = self.phy2log
        return out


def shares_from_rows(phy2log: np.ndarray, topo: Topology) -> np.ndarray:
    """phy2log [L, P] -> [L, E, G] share of each expert's tokens on each GPU (tokens split evenly over replicas)."""
    L, E, G = len(phy2log), topo.num_experts, topo.gpus
    counts = np.zeros((L, E, G))
    for l, row in enumerate(phy2log):
        np.add.at(counts[l], (row, topo.gpu_of_slot()), 1.0)
    return counts / counts.sum(axis=2, keepdims=True)


def trivial_rows(num_layers: int, topo: Topology) -> np.ndarray:
    """The engines' default placement: slot p holds expert p % E (SGLang init_trivial; vLLM's initial map is
    [0..E-1] then i % E for the redundant slots, the same thing)."""
    return np.tile(np.arange(topo.slots) % topo.num_experts, (num_layers, 1)).astype(np.int64)


def default_plan(topo: Topology, layers: list[int], num_hidden_layers: int) -> Plan:
    return Plan(topo, trivial_rows(len(layers), topo), list(layers), num_hidden_layers, method="default",
                solver="contiguous (the engines' default)")
