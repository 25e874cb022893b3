"""Scoring a placement on a trace (ideally one it was not fitted on): pure numpy, arrays in, one JSON-able dict out.

Dimension legend: T tokens, K selected, E experts, G GPUs, N nodes, L MoE layers.
Replica model: a token's selection of expert e goes to each of e's replicas with probability 1 / cnt_e (EPLB's load
model; SGLang's `dynamic` dispatch and vLLM's random replica choice in expectation). Without redundant experts every
number below is exact, not an expectation. A token's source GPU (its attention / DP rank) is src = seq_id mod G.

- loads[l, g]: token-expert assignments GPU g computes in layer l.
- SGLang balancedness (eplb/expert_distribution.py `compute_utilization_rate`): per layer (mean_g + 1e-5) /
  (max_g + 1e-5); the `[Expert Balancedness]` log line averages it over *all* decoder layers, dense ones counting 1.0.
- vLLM balancedness (distributed/eplb/eplb_state.py, `_compute_eplb_load_stats` + the `EPLB step` log line):
  sum_l mean_g / sum_l max_g over MoE layers. (Older vLLM trees reduced over the wrong axis and logged
  sum_g mean_l / sum_g max_l, fixed upstream.)
- dispatch: distinct destination GPUs other than the source, per (token, MoE layer), x hidden size x bytes per value
  (DeepEP sends one copy per destination rank; combine returns as much again).
- nodes per token: distinct nodes holding the token's experts (DeepSeek-V3 caps it at 4).
- cross-GPU transitions (ExFlow, arXiv 2401.08383): the share of consecutive-layer steps whose experts sit on different
  GPUs, an inter-node step counting 2 (so it lies in [0, 2]; equal to the plain fraction on one node). Top-k: a step
  weighs 1 spread over the K x K' pairs of the token's experts (moekit.placement.inputs.RoutingStats.pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekit.placement.inputs import RoutingStats
from moekit.placement.plan import Plan

EPS_SGLANG = 1e-5


def gpu_loads(counts: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """counts [L, E], shares [L, E, G] -> loads [L, G]."""
    return np.einsum("le,leg->lg", counts, shares)


def sglang_balancedness(loads: np.ndarray) -> np.ndarray:
    """[L] per-layer (mean + 1e-5) / (max + 1e-5), SGLang's compute_utilization_rate."""
    return (loads.mean(axis=1) + EPS_SGLANG) / (loads.max(axis=1) + EPS_SGLANG)


def vllm_balancedness(loads: np.ndarray) -> float:
    top = loads.max(axis=1).sum()
    return float(loads.mean(axis=1).sum() / top) if top > 0 else 0.0


def node_shares(shares: np.ndarray, nodes: int) -> np.ndarray:
    """[L, E, G] -> [L, E, N]: GPUs are node-major (GPU g on node g // (G / N))."""
    L, E, G = shares.shape
    return shares.reshape(L, E, nodes, G // nodes).sum(axis=3)


def transitions(pairs: np.ndarray, shares: np.ndarray, nodes: int) -> dict:
    """Cross-GPU and cross-node fractions of consecutive-layer steps, and ExFlow's weighted cost (their sum)."""
    total = pairs.sum()
    if total == 0:
        return {"cross_gpu_transitions": None, "cross_gpu_fraction": None, "cross_node_fraction": None}
    ns = node_shares(shares, nodes)
    same_gpu = sum(np.sum(pairs[l] * (shares[l] @ shares[l + 1].T)) for l in range(len(pairs)))
    same_node = sum(np.sum(pairs[l] * (ns[l] @ ns[l + 1].T)) for l in range(len(pairs)))
    gpu, node = 1 - same_gpu / total, 1 - same_node / total
    return {"cross_gpu_transitions": float(gpu + node), "cross_gpu_fraction": float(gpu),
            "cross_node_fraction": float(node)}


def transition_cost(pairs: np.ndarray, shares: np.ndarray, nodes: int) -> float:
    """ExFlow's weighted cost summed over steps (not normalised): what the affinity planners minimise."""
    if not len(pairs):
        return 0.0
    r = transitions(pairs, shares, nodes)
    return 0.0 if r["cross_gpu_transitions"] is None else r["cross_gpu_transitions"] * float(pairs.sum())


def destinations(ids: np.ndarray, shares_l: np.ndarray, src: np.ndarray, gpus_per_node: int,
                 chunk: int = 32768) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token of one layer: expected distinct destination GPUs other than src, on src's node and on other nodes, and
    distinct nodes holding its experts. ids [T, K], shares_l [E, G], src [T] -> three [T] arrays."""
    T, G = len(ids), shares_l.shape[1]
    node_of = np.arange(G) // gpus_per_node
    node_sh = shares_l.reshape(len(shares_l), G // gpus_per_node, gpus_per_node).sum(axis=2)  # [E, N]
    intra, inter, nodes = np.zeros(T), np.zeros(T), np.zeros(T)
    for a in range(0, T, chunk):
        sel, s = ids[a:a + chunk], src[a:a + chunk]
        hit = _hits(sel, shares_l)  # [t, G] probability GPU g receives at least one of the token's experts
        same_node = node_of[None, :] == node_of[s][:, None]  # [t, G]
        intra[a:a + chunk] = (hit * same_node).sum(axis=1) - hit[np.arange(len(sel)), s]
        inter[a:a + chunk] = (hit * ~same_node).sum(axis=1)
        nodes[a:a + chunk] = _hits(sel, node_sh).sum(axis=1)
    return intra, inter, nodes


def _hits(sel: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """sel [t, K], shares [E, X] -> [t, X]: 1 - prod_k (1 - share of the k-th expert on x); each selection picks
    its replica independently."""
    miss = np.ones((len(sel), shares.shape[1]))
    for k in range(sel.shape[1]):
        miss *= 1.0 - shares[sel[:, k]]
    return 1.0 - miss


@dataclass(frozen=True)
class CostModel:
    """A simple MoE step-time model (compute + network, no overlap) for a batch of `batch_tokens` tokens spread evenly
    over the GPUs. Per MoE layer and GPU: max(2 x expert params x tokens / FLOP/s, weights of the experts hit / memory
    bandwidth); network per source GPU: max(intra-node bytes / NVLink GB/s, inter-node bytes / RDMA GB/s) for dispatch
    and again for combine. A layer takes the slowest GPU's compute plus the slowest GPU's network time."""

    compute_tflops: float
    memory_gbs: float
    intra_node_gbs: float
    inter_node_gbs: float
    hidden_size: int
    expert_params: int
    dtype_bytes: int
    batch_tokens: int
    hardware: str = ""

    def layer_time(self, load_frac: np.ndarray, slot_freq: np.ndarray, gpu_of_slot: np.ndarray, intra: float,
                   inter: float, gpus: int) -> dict:
        """One MoE layer: load_frac [G] token-expert assignments per token on each GPU, slot_freq [P] probability a
        token uses each slot, intra / inter: remote destination GPUs per token on the source's node / other nodes."""
        B = self.batch_tokens
        flops = 2.0 * self.expert_params * load_frac * B  # [G]
        hit = 1.0 - np.power(np.clip(1.0 - slot_freq, 0.0, 1.0), B)  # [P] P(slot used by >= 1 of B tokens)
        weight_bytes = np.bincount(gpu_of_slot, weights=hit, minlength=gpus) * self.expert_params * self.dtype_bytes
        compute = np.maximum(flops / (self.compute_tflops * 1e12), weight_bytes / (self.memory_gbs * 1e9))
        per_src = B / gpus * self.hidden_size * self.dtype_bytes  # bytes per destination, per source GPU
        network = 2.0 * max(intra * per_src / (self.intra_node_gbs * 1e9), inter * per_src / (self.inter_node_gbs * 1e9))
        return {"compute_s": float(compute.max()), "network_s": float(network)}


def score(plan: Plan, stats: RoutingStats, ids: list[np.ndarray] | None = None, src: np.ndarray | None = None,
          value_bytes: int | None = None, cost: CostModel | None = None) -> dict:
    """Every placement metric of `plan` on routing `stats`; with per-token `ids` [T, K] per layer (and source GPUs
    `src` [T]) also dispatch and nodes per token; `value_bytes` (hidden size x bytes per value) turns destinations into
    bytes, `cost` adds the estimated MoE step time. Layers must match the plan's."""
    if list(stats.layers) != list(plan.layers) or stats.num_experts != plan.topology.num_experts:
        raise ValueError(f"the plan covers MoE layers {plan.layers} with {plan.topology.num_experts} experts, the trace "
                         f"{stats.layers} with {stats.num_experts}")
    topo = plan.topology
    shares = plan.shares()  # [L, E, G]
    loads = gpu_loads(stats.counts, shares)
    b_sg = sglang_balancedness(loads)
    dense = plan.num_hidden_layers - len(plan.layers)
    out = {
        "method": plan.method, "solver": plan.solver,
        "vllm_balancedness": vllm_balancedness(loads),
        "sglang_balancedness": float(b_sg.mean()),
        "sglang_balancedness_logged": float((b_sg.sum() + dense) / plan.num_hidden_layers),
        "max_over_mean": float(np.mean(loads.max(axis=1) / np.maximum(loads.mean(axis=1), 1e-12))),
        "layers": [{"layer": int(l), "max_over_mean": float(loads[i].max() / max(loads[i].mean(), 1e-12)),
                    "sglang_balancedness": float(b_sg[i]), "gpu_load": loads[i].tolist()}
                   for i, l in enumerate(plan.layers)],
    }
    out.update(transitions(stats.pairs, shares, topo.nodes) if stats.pairs is not None and len(stats.pairs)
               else {"cross_gpu_transitions": None, "cross_gpu_fraction": None, "cross_node_fraction": None})
    if ids is not None:
        out.update(_dispatch(plan, shares, stats, ids, src, value_bytes, cost, out["layers"]))
    return out


def _dispatch(plan: Plan, shares, stats, ids, src, value_bytes, cost: CostModel | None, rows: list) -> dict:
    topo = plan.topology
    T = len(ids[0])
    src = np.arange(T) % topo.gpus if src is None else np.asarray(src) % topo.gpus
    gpu_of_slot = topo.gpu_of_slot()
    logcnt = plan.logcnt
    totals = {"intra": 0.0, "inter": 0.0, "nodes": 0.0, "compute_s": 0.0, "network_s": 0.0}
    for i, sel in enumerate(ids):
        intra, inter, nodes = destinations(np.asarray(sel, np.int64), shares[i], src, topo.gpus_per_node)
        rows[i].update(dispatch_gpus=float((intra + inter).mean()), nodes_per_token=float(nodes.mean()))
        totals["intra"] += intra.mean()
        totals["inter"] += inter.mean()
        totals["nodes"] += nodes.mean()
        if cost is not None:
            load_frac = gpu_loads(stats.counts[i:i + 1], shares[i:i + 1])[0] / T  # assignments per token, per GPU
            slot_freq = stats.counts[i][plan.phy2log[i]] / logcnt[i][plan.phy2log[i]] / T  # [P] per-token use
            t = cost.layer_time(load_frac, slot_freq, gpu_of_slot, intra.mean(), inter.mean(), topo.gpus)
            rows[i].update(t)
            totals["compute_s"] += t["compute_s"]
            totals["network_s"] += t["network_s"]
    L = len(ids)
    remote = totals["intra"] + totals["inter"]  # summed over MoE layers: per token through the whole model
    out = {"dispatch_gpus_per_token_layer": remote / L, "dispatch_inter_node_gpus_per_token_layer": totals["inter"] / L,
           "nodes_per_token": totals["nodes"] / L}
    if cost is not None:
        value_bytes = cost.hidden_size * cost.dtype_bytes
        out.update(moe_step_ms=1e3 * (totals["compute_s"] + totals["network_s"]),
                   moe_compute_ms=1e3 * totals["compute_s"], moe_network_ms=1e3 * totals["network_s"],
                   batch_tokens=cost.batch_tokens, hardware=cost.hardware)
    out["dispatch_bytes_per_token"] = None if value_bytes is None else remote * value_bytes
    return out
