"""Expert load: frequency, soft usage, load-balance loss, MaxVio and routing entropy of one MoE layer.

ids [T, K] selected experts (weight-descending), weights [T, K], logits [T, E] optional, seq_id [T].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekit.analysis._common import (
    check_ids,
    check_logits,
    check_weights,
    entropy_bits,
    segment_sums,
    sequence_bounds,
    softmax,
)

_LN2 = float(np.log(2.0))


def expert_counts(ids, n_experts: int) -> np.ndarray:
    """Number of tokens that selected each expert, [E] int64 (the load of docs/conventions.md §Routing statistics)."""
    ids = check_ids(ids, n_experts)
    return np.bincount(ids.ravel(), minlength=n_experts).astype(np.int64)


def expert_frequency(ids, n_experts: int) -> np.ndarray:
    """f_e = count(e in K_t) / sum of counts, [E] (docs/conventions.md §Routing statistics). Sums to 1; uniform routing
    gives 1/E."""
    counts = expert_counts(ids, n_experts)
    return counts / max(int(counts.sum()), 1)


def soft_usage(logits) -> np.ndarray:
    """Mean gate probability mean_t softmax(s_t)_e, [E] (docs/conventions.md §Routing statistics)."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must have shape [T, E] with T >= 1, got {logits.shape}")
    return softmax(check_logits(logits, *logits.shape)).mean(axis=0, dtype=np.float64)


def _renormalised_topk(weights, ids) -> np.ndarray:
    """Top-k weights divided by their per-token sum, [T, K]. A token whose every selection has weight 0 (all dropped
    over an expert's capacity, Switch / NLLB-MoE, or sent to Zaya's skip expert) spreads its mass evenly over the
    experts it recorded: the router's choice, without a weight to say by how much."""
    w = check_weights(weights, ids)
    total = w.sum(axis=1, keepdims=True)  # [T, 1]
    if (total < 0).any():
        raise ValueError("top-k weights must be >= 0 to renormalise")
    unweighted = (total == 0)[:, 0]
    if unweighted.any():
        w = w.copy()
        w[unweighted], total = 1.0, np.where(total == 0, w.shape[1], total)
    return w / total  # [T, K]


def gate_probs(ids, n_experts: int, weights=None, logits=None) -> tuple[np.ndarray, str]:
    """Per-token gate probabilities [T, E] and their source ("logits" or "topk_weights"): the p_t behind P_i of the
    load-balance loss (arXiv 2501.11873).

    With logits: softmax(s_t). Without: the approximation p_t,e = w_t,e / sum_k w_t,k for the selected experts and 0
    elsewhere (the renormalised top-k weights), which ignores the probability mass the router gave unselected experts.
    """
    ids = check_ids(ids, n_experts)
    if logits is not None:
        return softmax(check_logits(logits, ids.shape[0], n_experts)), "logits"
    if weights is None:
        raise ValueError("gate probabilities need logits or top-k weights")
    probs = np.zeros((ids.shape[0], n_experts))  # [T, E]
    np.put_along_axis(probs, ids, _renormalised_topk(weights, ids), axis=1)
    return probs, "topk_weights"


@dataclass(frozen=True)
class LoadBalance:
    """Load-balance loss at two granularities ("Demons in the Detail", arXiv 2501.11873)."""

    global_lbl: float  # E * sum_i f_i P_i over all tokens
    sequence_lbl: float  # mean over sequences of the per-sequence LBL
    p_source: str  # "logits" or "topk_weights" (see gate_probs)


def load_balance_loss(ids, n_experts: int, seq_id, weights=None, logits=None) -> LoadBalance:
    """LBL = E * sum_i f_i * P_i, f_i = selection frequency (sums to 1), P_i = mean gate probability (arXiv 2501.11873,
    Eq. 1 with the normalisation of docs/conventions.md §Routing statistics: perfectly balanced routing gives 1.0).

    Global: f and P over all tokens (global-batch balancing). Sequence: f and P within each sequence, LBL per sequence,
    then the mean (what micro-batch balancing with one sequence per micro-batch optimises). P uses softmax(logits) when
    given, else the renormalised top-k weights (see `gate_probs`).
    """
    ids = check_ids(ids, n_experts)
    if logits is None and weights is None:
        raise ValueError("the load-balance loss needs logits or top-k weights")
    starts, lengths = sequence_bounds(seq_id, ids.shape[0])
    stats = _gate_stats(ids, n_experts, weights, logits, starts, lengths)
    return _lbl(ids, stats, _seq_counts(ids, starts, lengths, n_experts), lengths)


@dataclass(frozen=True)
class _GateStats:
    p_sum: np.ndarray  # [E] gate probability summed over all tokens
    p_seq: np.ndarray | None  # [S, E] summed within each sequence
    token_entropy: np.ndarray  # [T] bits
    source: str


def _gate_stats(ids, n_experts, weights, logits, starts=None, lengths=None, block: int = 1 << 16) -> _GateStats:
    """Sums of the gate probabilities (global, per sequence) and per-token entropy without a dense [T, E] array:
    softmax over blocks of tokens from logits, or bincounts of the renormalised top-k weights (see `gate_probs`)."""
    n_tok = ids.shape[0]
    seq = None if starts is None else np.repeat(np.arange(starts.size), lengths)  # [T]
    if logits is None:
        w = _renormalised_topk(weights, ids)  # [T, K]
        p_sum = np.bincount(ids.ravel(), weights=w.ravel(), minlength=n_experts)
        p_seq = None if seq is None else np.bincount((seq[:, None] * n_experts + ids).ravel(), weights=w.ravel(),
                                                     minlength=starts.size * n_experts).reshape(-1, n_experts)
        return _GateStats(p_sum, p_seq, entropy_bits(w), "topk_weights")
    logits = check_logits(logits, n_tok, n_experts)
    p_sum, h = np.zeros(n_experts), np.empty(n_tok)
    p_seq = None if seq is None else np.zeros((starts.size, n_experts))
    for lo in range(0, n_tok, block):
        hi = min(lo + block, n_tok)
        p, h[lo:hi] = _softmax_entropy(logits[lo:hi])  # [b, E], [b]
        p_sum += p.sum(axis=0, dtype=np.float64)
        if seq is not None:  # the block's sequences are a contiguous range of sequence indices
            first, last = seq[lo], seq[hi - 1]
            part = segment_sums(p, starts[first:last + 1] - lo, _clip_lengths(starts, lengths, first, last, lo, hi))
            p_seq[first:last + 1] += part
    return _GateStats(p_sum, p_seq, h, "logits")


def _clip_lengths(starts, lengths, first, last, lo, hi) -> np.ndarray:
    """Lengths of sequences first..last restricted to tokens lo..hi-1."""
    begin = np.maximum(starts[first:last + 1], lo)
    end = np.minimum(starts[first:last + 1] + lengths[first:last + 1], hi)
    return end - begin


def _seq_counts(ids, starts, lengths, n_experts) -> np.ndarray:
    """Selections of each expert within each sequence, [S, E] int64."""
    seq = np.repeat(np.arange(starts.size), lengths)  # [T]
    keys = (seq[:, None] * n_experts + ids).ravel()
    return np.bincount(keys, minlength=starts.size * n_experts).reshape(starts.size, n_experts)


def _lbl(ids, stats: _GateStats, seq_counts, lengths) -> LoadBalance:
    (n_tok, top_k), n_experts = ids.shape, seq_counts.shape[1]
    if n_tok == 0:
        return LoadBalance(float("nan"), float("nan"), stats.source)
    f_global = seq_counts.sum(axis=0) / (n_tok * top_k)  # [E]
    lbl_global = n_experts * float(f_global @ (stats.p_sum / n_tok))
    f_seq = seq_counts / (lengths[:, None] * top_k)  # [S, E]
    per_seq = n_experts * (f_seq * stats.p_seq / lengths[:, None]).sum(axis=1)  # [S]
    return LoadBalance(lbl_global, float(per_seq.mean()), stats.source)


def max_violation(load) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load (arXiv 2408.15664, Sec. 4.1). 0 = perfectly balanced."""
    load = np.asarray(load, dtype=np.float64)
    if load.ndim != 1 or load.size == 0:
        raise ValueError(f"load must be a non-empty vector [E], got shape {load.shape}")
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else float("nan")


def sequence_max_violation(ids, n_experts: int, seq_id) -> float:
    """Mean over sequences of MaxVio of the per-sequence expert counts (the batch-level MaxVio of arXiv 2408.15664 with
    one sequence per batch)."""
    ids = check_ids(ids, n_experts)
    starts, lengths = sequence_bounds(seq_id, ids.shape[0])
    return _seq_maxvio(_seq_counts(ids, starts, lengths, n_experts))


def _seq_maxvio(seq_counts) -> float:
    if seq_counts.shape[0] == 0:
        return float("nan")
    counts = seq_counts.astype(np.float64)  # [S, E]
    mean = counts.mean(axis=1)  # [S]
    return float(((counts.max(axis=1) - mean) / mean).mean())


def token_entropy(ids, n_experts: int, weights=None, logits=None) -> tuple[np.ndarray, str]:
    """Routing entropy of each token in bits, [T], and its source (docs/conventions.md §Routing statistics, routing
    entropy per token).

    From logits: H(softmax(s_t)) over all E experts (max log2 E). Without logits: H of the renormalised top-k weights
    (max log2 K), a different, smaller quantity; the source string says which.
    """
    ids = check_ids(ids, n_experts)
    if logits is None and weights is None:
        raise ValueError("token entropy needs logits or top-k weights")
    stats = _gate_stats(ids, n_experts, weights, logits)
    return stats.token_entropy, stats.source


def _softmax_entropy(logits) -> tuple[np.ndarray, np.ndarray]:
    """softmax(logits) [T, E] and its entropy in bits [T], via H = ln(sum_e exp z_e) - sum_e p_e z_e (z = s - max s).

    Stays in the logits' precision (float32 traces: float32), which is ample for a 0..log2(E) entropy."""
    z = np.asarray(logits)
    z = z - z.max(axis=1, keepdims=True).astype(np.result_type(z, np.float32))  # [T, E]
    p = np.exp(z)
    total = p.sum(axis=1)  # [T]
    p /= total[:, None]
    h = (np.log(total) - np.einsum("te,te->t", p, z)) / _LN2  # [T]
    return p, np.maximum(h, 0.0)


def layer_entropy(frequency) -> float:
    """Entropy in bits of the layer's expert frequency distribution f (docs/conventions.md §Routing statistics); log2 E
    = perfectly even."""
    f = np.asarray(frequency, dtype=np.float64)
    if f.ndim != 1 or f.size == 0 or (f < 0).any():
        raise ValueError("frequency must be a non-negative vector [E]")
    total = f.sum()
    return float(entropy_bits(f / total)) if total > 0 else float("nan")


@dataclass(frozen=True)
class LayerSummary:
    """One row of the per-layer summary table, plus the layer's usage vectors."""

    n_tokens: int
    top_k: int
    counts: np.ndarray  # [E] tokens per expert
    frequency: np.ndarray  # [E] f_e
    soft_usage: np.ndarray | None  # [E] mean softmax(logits); None without logits
    layer_entropy_bits: float  # entropy of f (max log2 E)
    token_entropy_bits: float  # mean per-token routing entropy
    entropy_source: str  # "logits" (over E), "topk_weights" (renormalised top-k, max log2 K) or "none"
    global_lbl: float
    sequence_lbl: float
    max_vio_global: float
    max_vio_sequence: float
    unused_experts: int


def summarise_layer(ids, n_experts: int, seq_id, weights=None, logits=None) -> LayerSummary:
    """Everything in this module for one layer in one pass over the logits. Gate probabilities and token entropy come
    from logits when given, else from the renormalised top-k weights, else are NaN (entropy_source says which)."""
    ids = check_ids(ids, n_experts)
    starts, lengths = sequence_bounds(seq_id, ids.shape[0])
    seq_counts = _seq_counts(ids, starts, lengths, n_experts)  # [S, E]
    counts = seq_counts.sum(axis=0)  # [E]
    if logits is None and weights is None:
        stats, lbl = None, LoadBalance(float("nan"), float("nan"), "none")
    else:
        stats = _gate_stats(ids, n_experts, weights, logits, starts, lengths)
        lbl = _lbl(ids, stats, seq_counts, lengths)
    tok_h = stats.token_entropy if stats is not None else np.full(ids.shape[0], np.nan)
    return LayerSummary(
        n_tokens=int(ids.shape[0]), top_k=int(ids.shape[1]), counts=counts, frequency=counts / max(counts.sum(), 1),
        soft_usage=stats.p_sum / ids.shape[0] if stats is not None and stats.source == "logits" else None,
        layer_entropy_bits=layer_entropy(counts) if counts.any() else float("nan"),
        token_entropy_bits=float(tok_h.mean()) if tok_h.size else float("nan"), entropy_source=lbl.p_source,
        global_lbl=lbl.global_lbl, sequence_lbl=lbl.sequence_lbl, max_vio_global=max_violation(counts),
        max_vio_sequence=_seq_maxvio(seq_counts), unused_experts=int((counts == 0).sum()))
