"""Which experts fire together: co-activation within a layer, affinity across consecutive layers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekit.analysis._common import check_ids, entropy_bits


def _pair_counts(a: np.ndarray, b: np.ndarray, n_experts: int) -> np.ndarray:
    """sum_t onehot(a_t)^T onehot(b_t), [E, E] int64, for selections a [T, K], b [T, K'].

    One bincount per pair of slots (K * K' passes over T), which is exact and avoids a [T, K, K'] temporary. (A float32
    one-hot product a.T @ b would be shorter, but OpenBLAS is pathologically slow for this 32 x 1M x 32 shape.)
    """
    out = np.zeros(n_experts * n_experts, dtype=np.int64)
    left = a.astype(np.int64) * n_experts  # [T, K]
    for i in range(a.shape[1]):
        for j in range(b.shape[1]):
            out += np.bincount(left[:, i] + b[:, j], minlength=n_experts * n_experts)
    return out.reshape(n_experts, n_experts)


def coactivation(ids, n_experts: int) -> np.ndarray:
    """C_ij = number of tokens whose top-k contains both i and j, [E, E] int64 (STUN, arXiv 2409.06211).
    Symmetric; the diagonal C_ii is expert i's token count."""
    ids = check_ids(ids, n_experts)
    return _pair_counts(ids, ids, n_experts)


def affinity_counts(ids_from, ids_to, n_experts: int) -> np.ndarray:
    """A_pq = number of (selection p in layer l, selection q in layer l+1) pairs of the same token, [E, E] int64.

    Every token contributes all K_l * K_{l+1} pairs of its selections (ExFlow, arXiv 2401.08383, Sec. 3: inter-layer
    expert affinity estimated from routing traces).
    """
    a = check_ids(ids_from, n_experts)
    b = check_ids(ids_to, n_experts)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"both layers need the same tokens, got T = {a.shape[0]} and {b.shape[0]}")
    return _pair_counts(a, b, n_experts)


def affinity(ids_from, ids_to, n_experts: int) -> np.ndarray:
    """P(e_{l+1} = q | e_l = p), [E, E]: rows of `affinity_counts` normalised to 1 (ExFlow, arXiv 2401.08383).

    Rows of experts never selected in layer l are NaN (undefined conditional).
    """
    return affinity_from_counts(affinity_counts(ids_from, ids_to, n_experts))


def affinity_from_counts(counts) -> np.ndarray:
    """Row-normalise affinity counts [E, E] into P(e_{l+1} = q | e_l = p); unused rows NaN."""
    counts = np.asarray(counts, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)  # [E, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, counts / np.where(rows > 0, rows, 1.0), np.nan)


@dataclass(frozen=True)
class AffinityConcentration:
    """How predictable layer l+1's experts are from layer l's, averaged over p weighted by p's selections."""

    topk_mass: float  # mean over p of the mass of row p's k largest entries; k/E = uniform, 1 = deterministic
    row_entropy_bits: float  # mean over p of H(row p); log2 E = uniform
    k: int


def affinity_concentration(counts, k: int) -> AffinityConcentration:
    """Concentration of an affinity count matrix [E, E] (ExFlow, arXiv 2401.08383, motivates placement by affinity).

    Each row is weighted by its count (so frequently used experts weigh more and unused rows drop out). With k = top-k
    of layer l+1, a fully predictable next layer gives topk_mass = 1 (each token's K next-layer experts are the row's
    top K).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or (counts < 0).any():
        raise ValueError(f"counts must be a non-negative square matrix [E, E], got shape {counts.shape}")
    if not 1 <= k <= counts.shape[1]:
        raise ValueError(f"k must be in [1, E], got {k}")
    rows = counts.sum(axis=1)  # [E]
    used = rows > 0
    if not used.any():
        return AffinityConcentration(float("nan"), float("nan"), k)
    p = counts[used] / rows[used, None]  # [E', E]
    top = np.sort(p, axis=1)[:, -k:].sum(axis=1)  # [E'] mass of the k largest entries
    w = rows[used] / rows[used].sum()
    return AffinityConcentration(float(w @ top), float(w @ entropy_bits(p)), k)
