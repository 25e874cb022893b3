"""DeepSeek's Expert Parallelism Load Balancer (deepseek-ai/EPLB `eplb.py` at d52c72d), ported to numpy.

Dimension legend: L MoE layers, E logical experts, P physical slots (E + redundant), G GPUs, N nodes.

The port follows eplb.py step by step (SGLang's `eplb_algorithms/deepseek.py` and vLLM's `policy/default.py` are copies):
- `balanced_packing`: items in descending weight, each to the lightest pack that still has room (ties: the lowest
  pack index, Python `min`); `rank_in_pack` is insertion order. c == 1 (one item per pack) is the identity, unsorted.
- `replicate_experts`: slot i = expert i for i < E; each extra slot goes to argmax w_e / cnt_e (ties: the first index,
  torch `max`), whose replica rank is the old count.
- `rebalance_experts_hierarchical`: groups -> nodes (packing group loads), replicas within each node, replicas -> the
  node's GPUs (packing w / cnt); `rebalance_experts` uses it when num_groups % num_nodes == 0, otherwise the same
  function with one group and one node (the "global" policy, EPLB commit e1100fe).
Arithmetic is float32 as in eplb.py (`weight.float()`), so near-ties resolve as there.

One deliberate deviation: eplb.py sorts with `torch.sort` (stable=False), which orders ties between *different* experts
in an implementation-defined way; here ties sort by (-load, id), so a plan is reproducible everywhere. Ties between
replicas of one expert can only change the replica rank, never the map.
"""

from __future__ import annotations

import numpy as np


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """weight [X, n] -> (pack_index [X, n], rank_in_pack [X, n]): n items into num_packs packs of n / num_packs items."""
    rows, n = weight.shape
    assert n % num_packs == 0, (n, num_packs)
    per_pack = n // num_packs
    if per_pack == 1:
        return np.broadcast_to(np.arange(n), (rows, n)).copy(), np.zeros((rows, n), np.int64)
    weight = weight.astype(np.float32, copy=False)
    pack_index = np.full((rows, n), -1, np.int64)
    rank_in_pack = np.full((rows, n), -1, np.int64)
    for i in range(rows):
        loads = np.zeros(num_packs, np.float32)
        items = np.zeros(num_packs, np.int64)
        for item in sort_desc(weight[i]):
            open_packs = np.flatnonzero(items < per_pack)
            pack = open_packs[np.argmin(loads[open_packs])]  # argmin: the first (lowest-index) lightest pack
            pack_index[i, item], rank_in_pack[i, item] = pack, items[pack]
            loads[pack] += weight[i, item]
            items[pack] += 1
    return pack_index, rank_in_pack


def sort_desc(w: np.ndarray) -> np.ndarray:
    """Indices by descending weight, ties by ascending index: the (-load, id) rule."""
    return np.lexsort((np.arange(len(w)), -w))


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [X, n] -> (phy2log [X, num_phy], replica rank [X, num_phy], logcnt [X, n]), minimising the largest
    per-replica load greedily."""
    rows, n = weight.shape
    assert num_phy >= n, (num_phy, n)
    weight = weight.astype(np.float32, copy=False)
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (rows, 1))
    rank = np.zeros((rows, num_phy), np.int64)
    logcnt = np.ones((rows, n), np.int64)
    r = np.arange(rows)
    for i in range(n, num_phy):
        pick = np.argmax(weight / logcnt.astype(np.float32), axis=-1)  # [X]; first index on ties, as torch max
        phy2log[:, i], rank[:, i] = pick, logcnt[r, pick]
        logcnt[r, pick] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int,
                                   num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [L, E] -> (phy2log [L, P], phyrank [L, P], logcnt [L, E]); eplb.py's three steps."""
    L, E = weight.shape
    assert E % num_groups == 0 and num_groups % num_nodes == 0 and num_gpus % num_nodes == 0
    assert num_physical % num_gpus == 0
    group_size, groups_per_node = E // num_groups, num_groups // num_nodes
    per_gpu = num_physical // num_gpus
    weight = weight.astype(np.float32, copy=False)

    # 1. groups -> nodes; relabel experts node-major: mlog = (node * groups_per_node + rank) * group_size + j
    group_load = weight.reshape(L, num_groups, group_size).sum(-1, dtype=np.float32)  # [L, groups]
    gpack, grank = balanced_packing(group_load, num_nodes)
    log2mlog = (((gpack * groups_per_node + grank) * group_size)[:, :, None] + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)

    # 2. replicas within each node: [L * N, E / N] -> [L * N, P / N]
    w_mlog = np.take_along_axis(weight, mlog2log, -1).reshape(-1, E // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(w_mlog, num_physical // num_nodes)

    # 3. replicas -> the node's GPUs, packing per-replica loads w / cnt
    w_phy = np.take_along_axis(w_mlog / mlogcnt.astype(np.float32), phy2mlog, -1)
    pack, rank = balanced_packing(w_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)  # [L * N, P / N]
    pphy2mlog = (pphy2mlog.reshape(L, num_nodes, -1) + (np.arange(num_nodes) * (E // num_nodes))[None, :, None])
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog.reshape(L, -1), -1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, -1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, -1)
    return pphy2log, pphyrank, logcnt


def is_hierarchical(num_groups: int, num_nodes: int) -> bool:
    """eplb.py's policy rule: hierarchical when the nodes divide the groups (N = 1 included), global otherwise."""
    return num_groups % num_nodes == 0


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point: weight [L, E] -> (phy2log [L, P], log2phy [L, E, maxcnt] padded with -1, logcnt [L, E])."""
    weight = np.asarray(weight, dtype=np.float32)
    L, E = weight.shape
    if is_hierarchical(num_groups, num_nodes):
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    maxcnt = int(logcnt.max())
    log2phy = np.full((L, E * maxcnt), -1, np.int64)
    np.put_along_axis(log2phy, phy2log * maxcnt + phyrank, np.broadcast_to(np.arange(num_replicas), phy2log.shape), 1)
    return phy2log, log2phy.reshape(L, E, maxcnt), logcnt
