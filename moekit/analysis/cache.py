"""Expert-cache hit rate versus capacity for LRU, LFU, Belady MIN and the offline optimum, per layer.

Conventions (SCH's, from the moe-lrc released code, arXiv 2505.16056, so that these curves and SCH share one plot): each
sequence is its own stream starting from an empty cache; a token's K experts are judged hit or miss against the cache
as it was before the token, then inserted in order (an insertion may evict another expert of the same token); the first
C distinct experts of a sequence fill free space and count as hits; hit rate = hits / (T_s * K) per sequence, then the
mean over sequences. A running system (the runtime's simulator) counts cold misses as misses instead: with these
conventions a cache of capacity >= E always scores 1.0.

Policies (all evict the resident with the lowest priority, so all are stack algorithms, Mattson et al. 1970, and every
capacity comes out of one pass of the priority-stack kernel in _stack.py):
  lru     priority = last use.
  lfu     priority = uses so far in the sequence (perfect LFU: counts survive eviction), ties by last use.
  belady  priority = sooner next use (Belady 1966, MIN): the offline ceiling for a demand-fetch cache, as in the
          moe-lrc code (src/50_chr_calc.py, calc_beladi).
  opt     the offline optimum under these conventions: after each token keep the C experts, among the cached ones and
          the token's, used soonest in later tokens (MIN with bypass, a token's experts requested together).
Deviation from "Belady is the ceiling" (docs/conventions.md §Hit-rate conventions): under these conventions a token's
hits are judged before it, and a policy may evict an expert it has just inserted while inserting the next one of the
same token, i.e. not keep it; LFU and SCH then sometimes beat plain MIN (never for K = 1; LRU never for C >= K, since it
keeps the whole token). `opt` is the true ceiling (the tests check it against an exhaustive search over all cache
trajectories) and is the one to plot as such; plain MIN is kept because it is the paper's. Slow literal simulations
(_reference.py) are the references; `cache_hit_rate_reference` runs them.
"""

from __future__ import annotations

import numpy as np

from moekit.analysis import _reference, _stack
from moekit.analysis._common import check_capacities, check_ids, sequence_bounds

POLICIES = ("lru", "lfu", "belady", "opt")


def _check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; supported: {', '.join(POLICIES)}")
    return policy


def cache_hit_rates(ids, seq_id, n_experts: int, capacities, policy: str = "lru") -> np.ndarray:
    """Hit rate for each capacity: ids [T, K] -> [C]; ids [L, T, K] (layers sharing seq_id) -> [L, C].

    All capacities in one pass of the priority stack (Mattson et al. 1970); conventions of SCH (arXiv 2505.16056), see
    the module docstring. Capacities are in experts (`capacities_for(top_k)` gives multiples of top-k).
    """
    _check_policy(policy)
    ids = check_ids(ids, n_experts, allow_layers=True)
    caps = check_capacities(capacities)
    batch = _stack.make_batch(ids if ids.ndim == 3 else ids[None], *sequence_bounds(seq_id, ids.shape[-2]), n_experts)
    rates = hit_rates_from_batch(batch, caps, policy)  # [L, C]
    return rates if ids.ndim == 3 else rates[0]


def hit_rates_from_batch(batch: _stack.SeqBatch, caps: np.ndarray, policy: str,
                         reuse: _stack.Reuse | None = None) -> np.ndarray:
    """[L, C] hit rates of an already laid-out batch (lets one layout and one reuse scan serve several policies)."""
    width = int(min(batch.n_experts, caps.max()))
    eff = _stack.effective_depths(batch, width, _check_policy(policy), reuse_=reuse)
    return _stack.hit_rates(eff, batch, caps)


def capacities_for(top_k: int, multiples=(1, 2, 3, 4)) -> np.ndarray:
    """Cache sizes given as multiples of top-k, [C]."""
    return np.asarray(multiples, dtype=np.int64) * int(top_k)


def cache_hit_rate_reference(ids, seq_id, n_experts: int, capacity: int, policy: str = "lru") -> float:
    """Slow literal simulation of one capacity (sets, evict the lowest priority; Belady 1966 for MIN): the reference for
    `cache_hit_rates`, same conventions. ids [T, K]."""
    _check_policy(policy)
    ids = check_ids(ids, n_experts)
    starts, lengths = sequence_bounds(seq_id, ids.shape[0])
    rates = []
    for start, length in zip(starts, lengths):
        rows = ids[start:start + length].tolist()
        state: dict = {}
        if policy == "lru":
            prio = _reference.lru_priority(state)
        elif policy == "lfu":
            prio = _reference.lfu_priority(state)
        elif policy == "belady":
            prio = _reference.belady_priority(rows, state)
        else:
            prio = _reference.opt_priority(rows, state)
        hits = _reference.simulate_hits(rows, int(capacity), prio, state, bypass=policy == "opt")
        rates.append(hits / (length * ids.shape[1]))
    return float(np.mean(rates)) if rates else float("nan")
