"""Input checks and small helpers shared by the analysis modules.

Dimension legend: T tokens, E experts, K selected per token, L layers, S sequences, D domains.
Every public analysis function takes plain numpy arrays (the trace contract):
  ids      int   [T, K] or [L, T, K]  selected expert ids, ordered by routing weight descending
  weights  float [T, K]               routing weights of those experts
  logits   float [T, E]               router logits (optional)
  seq_id   int   [T]                  tokens of one sequence are contiguous and in position order
"""

from __future__ import annotations

import numpy as np
from scipy import sparse


def check_ids(ids, n_experts: int, *, allow_layers: bool = False) -> np.ndarray:
    """Validate selected expert ids: integer [T, K] (or [L, T, K]), in [0, E), distinct within a token."""
    ids = np.asarray(ids)
    ndims = (2, 3) if allow_layers else (2,)
    if ids.ndim not in ndims:
        want = "[T, K] or [L, T, K]" if allow_layers else "[T, K]"
        raise ValueError(f"ids must have shape {want}, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    if int(n_experts) < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    if ids.shape[-1] < 1:
        raise ValueError("ids must select at least one expert per token (K >= 1)")
    if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
        raise ValueError(f"expert ids must lie in [0, {n_experts}), got range [{ids.min()}, {ids.max()}]")
    if ids.shape[-1] > 1 and ids.size and _has_repeats(ids.reshape(-1, ids.shape[-1])):
        # The cache simulations assume a token never names an expert twice (a top-k selection cannot).
        raise ValueError("a token selects the same expert twice; ids must be distinct within a token")
    return ids


def _has_repeats(rows: np.ndarray) -> bool:
    """Whether any row of [N, K] repeats a value; K(K-1)/2 column compares for small K (cheaper than a sort)."""
    top_k = rows.shape[1]
    if top_k > 8:
        srt = np.sort(rows, axis=1)
        return bool((srt[:, 1:] == srt[:, :-1]).any())
    return any(bool((rows[:, i] == rows[:, j]).any()) for i in range(top_k) for j in range(i + 1, top_k))


def check_weights(weights, ids: np.ndarray) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != ids.shape:
        raise ValueError(f"weights shape {weights.shape} must equal ids shape {ids.shape}")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights must be finite and non-negative")
    return weights


def check_logits(logits, n_tokens: int, n_experts: int) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.shape != (n_tokens, n_experts):
        raise ValueError(f"logits must have shape [T, E] = {(n_tokens, n_experts)}, got {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("logits must be finite")
    return logits


def check_tokens_vector(x, n_tokens: int, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.shape != (n_tokens,):
        raise ValueError(f"{name} must have shape [T] = ({n_tokens},), got {x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {x.dtype}")
    return x


def sequence_bounds(seq_id, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each sequence, in token order: ([S], [S]).

    Raises ValueError when a sequence's tokens are not contiguous (the trace contract).
    """
    seq_id = check_tokens_vector(seq_id, n_tokens, "seq_id")
    if n_tokens == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.flatnonzero(seq_id[1:] != seq_id[:-1]) + 1
    starts = np.concatenate(([0], change)).astype(np.int64)  # [S]
    if np.unique(seq_id[starts]).size != starts.size:
        raise ValueError("tokens of a sequence must be contiguous in seq_id (a sequence id reappears later)")
    lengths = np.diff(np.append(starts, n_tokens))  # [S]
    return starts, lengths


def sequence_index(seq_id, n_tokens: int) -> tuple[np.ndarray, int]:
    """Dense sequence index 0..S-1 of every token, [T], and S."""
    starts, lengths = sequence_bounds(seq_id, n_tokens)
    return np.repeat(np.arange(starts.size), lengths), int(starts.size)


def segment_sums(x: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sums of the rows of x [T, E] over each contiguous sequence, [S, E], in x's float precision.

    A sparse [S, T] indicator product: far faster than np.add.reduceat on [T, E] arrays with short rows.
    """
    n_tok, n_seq = x.shape[0], starts.size
    dtype = np.result_type(x.dtype, np.float32)
    seq = np.repeat(np.arange(n_seq), lengths)  # [T]
    ind = sparse.csr_matrix((np.ones(n_tok, dtype), (seq, np.arange(n_tok))), shape=(n_seq, n_tok))
    return np.asarray(ind @ x.astype(dtype, copy=False))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax, [T, E] -> [T, E], in float32 for float32 input (the trace dtype) and float64 otherwise."""
    z = np.asarray(logits)
    z = z - z.max(axis=-1, keepdims=True).astype(np.result_type(z, np.float32))
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True, dtype=np.float64).astype(z.dtype)
    return z


def entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in bits of distributions along `axis` (0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


def check_capacities(capacities) -> np.ndarray:
    caps = np.asarray(capacities, dtype=np.int64).reshape(-1)
    if caps.size == 0 or (caps < 1).any():
        raise ValueError(f"capacities must be positive integers, got {capacities}")
    return caps
