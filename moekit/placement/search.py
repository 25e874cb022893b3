"""Affinity-aware placement search: the co-location value of a layer given its neighbours, exact per-layer assignment
(Hungarian), load-bounded swap search, and the joint MILP (HiGHS via scipy.optimize.milp).

Dimension legend: L MoE layers, E experts, P slots, G GPUs, N nodes.
Objective (ExFlow, arXiv 2401.08383, top-k form): minimise sum_l sum_{p,q} pairs[l, p, q] * hop(p, q) with hop 0 on
one GPU, 1 across GPUs of a node, 2 across nodes; equivalently maximise the co-location value
    sum_l sum_{p,q} pairs[l, p, q] * (same_gpu(p, q) + same_node(p, q)),
where with replicas same_gpu(p, q) = sum_g s_p(g) s_q(g) and s_p(g) = (replicas of p on g) / cnt_p. The value is linear
in one layer's shares when its neighbours are fixed, which is what makes layer-by-layer search exact per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp

from moekit.placement.plan import Topology, shares_from_rows


def colocation_value(pairs: np.ndarray, shares: np.ndarray, topo: Topology) -> float:
    """sum_l sum_{p,q} pairs * (same GPU + same node): what the affinity planners maximise."""
    total = 0.0
    for l in range(len(pairs)):
        total += np.sum(pairs[l] * (shares[l] @ shares[l + 1].T))
        if topo.nodes > 1:
            total += np.sum(pairs[l] * (_nodes(shares[l], topo) @ _nodes(shares[l + 1], topo).T))
    return float(total)


def _nodes(s: np.ndarray, topo: Topology) -> np.ndarray:
    return s.reshape(len(s), topo.nodes, topo.gpus_per_node).sum(axis=2)  # [E, N]


def layer_value(pairs: np.ndarray, shares: np.ndarray, l: int, topo: Topology) -> np.ndarray:
    """[E, G] value of putting *all* of expert p's layer-l tokens on GPU g, the other layers fixed (a replica holding
    1 / cnt_p of them is worth value / cnt_p)."""
    E, G = shares.shape[1:]
    v = np.zeros((E, G))
    if l > 0:
        v += pairs[l - 1].T @ shares[l - 1]  # tokens arriving from layer l-1
    if l + 1 < len(shares):
        v += pairs[l] @ shares[l + 1]  # tokens leaving to layer l+1
    if topo.nodes > 1:
        vn = np.zeros((E, topo.nodes))
        if l > 0:
            vn += pairs[l - 1].T @ _nodes(shares[l - 1], topo)
        if l + 1 < len(shares):
            vn += pairs[l] @ _nodes(shares[l + 1], topo)
        v += vn[:, topo.node_of_gpu()]
    return v


def assign_layer(value: np.ndarray, topo: Topology) -> np.ndarray:
    """Exact best one-replica-per-expert layer (R = 0) for a fixed value [E, G]: the assignment problem with S slots per
    GPU, solved by the Hungarian method (scipy linear_sum_assignment). Returns the layer's phy2log row [P]."""
    S = topo.slots_per_gpu
    cols = np.repeat(np.arange(topo.gpus), S)  # slot -> GPU
    experts, slots = linear_sum_assignment(-value[:, cols])
    row = np.empty(topo.slots, np.int64)
    row[slots] = experts
    return canonical(row, topo)


def canonical(row: np.ndarray, topo: Topology) -> np.ndarray:
    """Sort each GPU's slots by expert id: the order within a GPU changes nothing, a fixed order makes plans
    reproducible and comparable."""
    return np.sort(row.reshape(topo.gpus, topo.slots_per_gpu), axis=1).reshape(-1)


@dataclass
class SwapResult:
    row: np.ndarray
    swaps: int
    rounds: int


def swap_layer(row: np.ndarray, value: np.ndarray, counts: np.ndarray, bound, topo: Topology, max_rounds: int = 200,
               tol: float = 1e-9) -> SwapResult:
    """Best-improvement swap search on one layer: exchange two slots of different GPUs when it raises the co-location
    value and keeps both GPUs' loads <= bound under every load profile. Each round applies every improving swap of
    disjoint slots, best first, re-checking the bounds as loads change (a swap's gain does not depend on other slots of
    the same layer).

    row [P] phy2log of the layer, value [E, G] (layer_value), counts [M, E] the layer's loads under M profiles (or
    [E]), bound [M] (or a number)."""
    row = row.copy()
    counts, bound = np.atleast_2d(counts), np.atleast_1d(np.asarray(bound, dtype=float))
    gpu = topo.gpu_of_slot()
    cnt = np.bincount(row, minlength=counts.shape[1])
    w_exp = counts / cnt  # [M, E] per-replica load
    v_exp = value / cnt[:, None]  # [E, G] per-replica value
    loads = np.stack([np.bincount(gpu, weights=w[row], minlength=topo.gpus) for w in w_exp])  # [M, G]
    swaps = rounds = 0
    for rounds in range(1, max_rounds + 1):
        cur = v_exp[row, gpu]  # [P]
        cross = v_exp[row][:, gpu]  # [P, P]: value of slot i's replica on slot j's GPU
        gain = cross + cross.T - cur[:, None] - cur[None, :]
        ok = (gpu[:, None] < gpu[None, :]) & (row[:, None] != row[None, :])
        for m in range(len(counts)):
            w = w_exp[m][row]
            d = w[None, :] - w[:, None]  # [i, j] load GPU(i) gains when i and j swap
            ok &= (loads[m][gpu][:, None] + d <= bound[m] + tol) & (loads[m][gpu][None, :] - d <= bound[m] + tol)
        i_idx, j_idx = np.nonzero(ok & (gain > tol * (1 + abs(gain).max())))
        if not len(i_idx):
            break
        order = np.argsort(-gain[i_idx, j_idx], kind="stable")
        touched = np.zeros(topo.slots, bool)
        applied = 0
        for i, j in zip(i_idx[order], j_idx[order]):
            if touched[i] or touched[j]:
                continue
            dw = w_exp[:, row[j]] - w_exp[:, row[i]]  # [M]
            if (loads[:, gpu[i]] + dw > bound + tol).any() or (loads[:, gpu[j]] - dw > bound + tol).any():
                continue
            loads[:, gpu[i]] += dw
            loads[:, gpu[j]] -= dw
            row[i], row[j] = row[j], row[i]
            touched[i] = touched[j] = True
            applied += 1
        swaps += applied
        if not applied:
            break
    return SwapResult(canonical(row, topo), swaps, rounds)


def layer_sweeps(phy2log: np.ndarray, pairs: np.ndarray, topo: Topology, step, better=None, max_sweeps: int = 50,
                 deadline: float | None = None, on_layer=None) -> tuple[np.ndarray, int]:
    """Block coordinate ascent: re-optimise one layer at a time (`step(l, row, value) -> row`) with its neighbours
    fixed, sweeping forward over the layers until a whole sweep changes nothing (or max_sweeps / the deadline). A new
    row replaces the old one only when `better(l, old, new, value)` (default: a strictly higher layer value), so the
    objective never decreases and the sweeps end."""
    better = better or (lambda l, old, new, value: row_value(new, value, topo) > row_value(old, value, topo) + 1e-9 *
                        (1 + abs(row_value(old, value, topo))))
    phy2log = phy2log.copy()
    shares = shares_from_rows(phy2log, topo)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        changed = False
        for l in range(len(phy2log)):
            if on_layer is not None:
                on_layer(sweeps, l)
            value = layer_value(pairs, shares, l, topo)
            new = step(l, phy2log[l], value)
            if not np.array_equal(new, phy2log[l]) and better(l, phy2log[l], new, value):
                phy2log[l] = new
                shares[l] = shares_from_rows(new[None], topo)[0]
                changed = True
            if deadline is not None and time.monotonic() > deadline:
                return phy2log, sweeps
        if not changed:
            break
    return phy2log, sweeps


def row_value(row: np.ndarray, value: np.ndarray, topo: Topology) -> float:
    """The layer's co-location value [E, G] summed over its slots (a replica counts 1 / cnt)."""
    cnt = np.bincount(row, minlength=len(value))
    return float(np.sum(value[row, topo.gpu_of_slot()] / cnt[row]))


# ---- the joint MILP (one replica per expert)

@dataclass
class MilpResult:
    phy2log: np.ndarray | None
    status: str  # "optimal", "time limit", "no solution", ...
    gap: float | None
    seconds: float
    variables: int
    constraints: int


def milp_size(pairs: np.ndarray, topo: Topology) -> int:
    """Variables of the joint MILP: x[l, e, g] plus one co-location variable per (pair with weight, GPU or node)."""
    L = len(pairs) + 1
    nnz = int(sum(np.count_nonzero(p) for p in pairs))
    return L * topo.num_experts * topo.gpus + nnz * (topo.gpus + (topo.nodes if topo.nodes > 1 else 0))


def solve_milp(pairs: np.ndarray, topo: Topology, time_limit: float, load: np.ndarray | None = None,
               bound: np.ndarray | None = None) -> MilpResult:
    """ExFlow's program on top-k pairs, solved with HiGHS: binary x[l, e, g] (expert e of layer l on GPU g), exactly
    E / G experts per (layer, GPU), each expert once; z[l, p, q, g] <= x[l, p, g], x[l+1, q, g] and, with several nodes,
    u[l, p, q, n] <= the node sums; maximise sum pairs * (z + u). `load` [L, E] with `bound` [L] adds per-GPU load caps
    sum_e load[l, e] x[l, e, g] <= bound[l] (balanced-affinity). GPUs are interchangeable, so the heaviest expert of
    layer 0 is fixed to GPU 0 (symmetry breaking)."""
    L, E, G, N = len(pairs) + 1, topo.num_experts, topo.gpus, topo.nodes
    S, gpn = topo.slots_per_gpu, topo.gpus_per_node
    nx = L * E * G
    xi = lambda l, e, g: (l * E + e) * G + g  # noqa: E731
    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(row_cols, row_vals, a, b):
        r = len(lo)
        rows.extend([r] * len(row_cols))
        cols.extend(row_cols)
        vals.extend(row_vals)
        lo.append(a)
        hi.append(b)

    for l in range(L):
        for e in range(E):
            add([xi(l, e, g) for g in range(G)], [1.0] * G, 1, 1)
        for g in range(G):
            add([xi(l, e, g) for e in range(E)], [1.0] * E, S, S)
            if load is not None:
                add([xi(l, e, g) for e in range(E)], list(load[l]), -np.inf, bound[l])
    c = [0.0] * nx
    n = nx
    for l, a in enumerate(pairs):
        for p, q in zip(*np.nonzero(a)):
            for g in range(G):
                add([n, xi(l, p, g)], [1.0, -1.0], -np.inf, 0)
                add([n, xi(l + 1, q, g)], [1.0, -1.0], -np.inf, 0)
                c.append(-a[p, q])
                n += 1
            for k in range(N if N > 1 else 0):
                gs = range(k * gpn, (k + 1) * gpn)
                add([n] + [xi(l, p, g) for g in gs], [1.0] + [-1.0] * gpn, -np.inf, 0)
                add([n] + [xi(l + 1, q, g) for g in gs], [1.0] + [-1.0] * gpn, -np.inf, 0)
                c.append(-a[p, q])
                n += 1
    heavy = int(np.argmax(load[0])) if load is not None else 0
    lb, ub = np.zeros(n), np.ones(n)
    lb[xi(0, heavy, 0)] = 1.0
    A = sparse.csr_array((vals, (rows, cols)), shape=(len(lo), n))
    integrality = np.r_[np.ones(nx), np.zeros(n - nx)]
    t0 = time.monotonic()
    res = milp(np.asarray(c), constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=Bounds(lb, ub),
               options={"time_limit": float(time_limit), "disp": False})
    seconds = time.monotonic() - t0
    status = {0: "optimal", 1: "time limit", 2: "infeasible", 3: "unbounded", 4: "other"}.get(res.status, str(res.status))
    if res.x is None:
        return MilpResult(None, "no solution" if status == "time limit" else status, None, seconds, n, len(lo))
    x = res.x[:nx].reshape(L, E, G) > 0.5
    phy2log = np.stack([canonical(_row_from_x(x[l], topo), topo) for l in range(L)])
    return MilpResult(phy2log, status, getattr(res, "mip_gap", None), seconds, n, len(lo))


def _row_from_x(x: np.ndarray, topo: Topology) -> np.ndarray:
    """x [E, G] boolean (exactly S experts per GPU) -> phy2log row [P]."""
    gpu_of_expert = np.argmax(x, axis=1)
    return np.argsort(gpu_of_expert, kind="stable")


def gap_layer(value: np.ndarray, counts: np.ndarray, cnt: np.ndarray, bound, topo: Topology,
              time_limit: float) -> tuple[np.ndarray | None, str]:
    """Exact best layer for a fixed value [E, G] under per-GPU load caps (a generalised assignment problem, MILP by
    HiGHS): integer n[e, g] replicas of e on GPU g, sum_g n = cnt_e, sum_e n = S, and for every load profile m
    sum_e counts[m, e] / cnt_e n[e, g] <= bound[m]; maximise sum value[e, g] n[e, g] / cnt_e. counts [M, E] (or [E]).
    Returns (phy2log row [P] or None, HiGHS status)."""
    counts, bound = np.atleast_2d(counts), np.atleast_1d(np.asarray(bound, dtype=float))
    E, G, S, M = topo.num_experts, topo.gpus, topo.slots_per_gpu, len(counts)
    idx = np.arange(E * G).reshape(E, G)
    rows = [np.repeat(np.arange(E), G), E + np.tile(np.arange(G), E)]
    data = [np.ones(E * G), np.ones(E * G)]
    for m in range(M):
        rows.append(E + G * (1 + m) + np.tile(np.arange(G), E))
        data.append(np.repeat(counts[m] / cnt, G))
    A = sparse.csr_array((np.concatenate(data), (np.concatenate(rows), np.tile(idx.reshape(-1), 2 + M))),
                         shape=(E + G * (1 + M), E * G))
    lo = np.r_[cnt, np.full(G, S), np.full(G * M, -np.inf)]
    hi = np.r_[cnt, np.full(G, S), np.repeat(bound, G)]
    c = -(value / cnt[:, None]).reshape(-1)
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=np.ones(E * G),
               bounds=Bounds(0, np.repeat(cnt, G).astype(float)), options={"time_limit": float(time_limit)})
    status = {0: "optimal", 1: "time limit"}.get(res.status, "failed")
    if res.x is None:
        return None, status
    n = np.rint(res.x).astype(np.int64).reshape(E, G)
    row = np.concatenate([np.repeat(np.arange(E), n[:, g]) for g in range(G)])
    return canonical(row, topo), status
