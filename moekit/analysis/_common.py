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
    if ids.shape[-1] > 1 and ids.size:
        # The cache simulations assume a token never names an expert twice (a top-k selection cannot).
        srt = np.sort(ids.reshape(-1, ids.shape[-1]), axis=1)  # [L*T, K]
        if (srt[:, 1:] == srt[:, :-1]).any():
            raise ValueError("a token selects the same expert twice; ids must be distinct within a token")
    return ids


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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float64, [T, E] -> [T, E]."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in bits of distributions along `axis` (0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


def check_capacities(capacities, width_limit: int | None = None) -> np.ndarray:
    caps = np.asarray(capacities, dtype=np.int64).reshape(-1)
    if caps.size == 0 or (caps < 1).any():
        raise ValueError(f"capacities must be positive integers, got {capacities}")
    return caps
