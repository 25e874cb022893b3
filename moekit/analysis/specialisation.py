"""Domain and token specialisation of experts: per-domain usage, its divergence between domains, domain-expert NMI,
and token-expert nPMI (RICE, arXiv 2505.14681). One MoE layer at a time: ids [T, K]; domain, token_id [T]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import jensenshannon

from moekit.analysis._common import check_ids, check_tokens_vector, entropy_bits


def _check_domain(domain, n_tokens: int, n_domains: int) -> np.ndarray:
    domain = check_tokens_vector(domain, n_tokens, "domain")
    if n_domains < 1:
        raise ValueError(f"n_domains must be >= 1, got {n_domains}")
    if domain.size and (domain.min() < 0 or domain.max() >= n_domains):
        raise ValueError(f"domain codes must lie in [0, {n_domains}), got [{domain.min()}, {domain.max()}]")
    return domain


def domain_counts(ids, domain, n_domains: int, n_experts: int) -> np.ndarray:
    """N[d, e] = number of top-k selections of expert e by tokens of domain d, [D, E] int64 (docs/conventions.md
    §Routing statistics, domain specialisation)."""
    ids = check_ids(ids, n_experts)
    domain = _check_domain(domain, ids.shape[0], n_domains).astype(np.int64)
    keys = domain[:, None] * n_experts + ids  # [T, K]
    return np.bincount(keys.ravel(), minlength=n_domains * n_experts).reshape(n_domains, n_experts)


def domain_usage(ids, domain, n_domains: int, n_experts: int) -> np.ndarray:
    """Per-domain expert frequency, [D, E]: each row sums to 1 (docs/conventions.md §Routing statistics, domain
    specialisation). Domains with no tokens get a NaN row."""
    counts = domain_counts(ids, domain, n_domains, n_experts).astype(np.float64)
    rows = counts.sum(axis=1, keepdims=True)  # [D, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, counts / np.where(rows > 0, rows, 1.0), np.nan)


def domain_jsd(usage) -> np.ndarray:
    """Jensen-Shannon divergence in bits between every pair of domain usage vectors, [D, D], in [0, 1]
    (docs/conventions.md §Routing statistics: divergence of per-domain frequency vectors between domains).

    scipy's `jensenshannon` returns the JS *distance* (the square root); this returns its square, the divergence.
    NaN rows (domains without tokens) give NaN.
    """
    usage = np.asarray(usage, dtype=np.float64)
    if usage.ndim != 2:
        raise ValueError(f"usage must be [D, E], got shape {usage.shape}")
    dist = jensenshannon(usage[:, None, :], usage[None, :, :], axis=2, base=2)  # [D, D]
    return np.square(dist)


def domain_nmi(ids, domain, n_domains: int, n_experts: int) -> float:
    """Normalised mutual information I(domain; expert) / H(domain), in [0, 1] (docs/conventions.md §Routing statistics,
    domain specialisation; normalised by H(domain), so it reads "share of the domain's uncertainty the experts remove").

    Every top-k selection is one observation (domain of its token, selected expert), so a token counts K times. 1 means
    the selected experts determine the domain; 0 means routing ignores the domain. NaN with a single domain (H = 0).
    """
    counts = domain_counts(ids, domain, n_domains, n_experts).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return float("nan")
    joint = counts / total  # [D, E]
    p_d, p_e = joint.sum(axis=1), joint.sum(axis=0)
    h_d = float(entropy_bits(p_d))
    if h_d == 0:
        return float("nan")
    mi = float(entropy_bits(p_d) + entropy_bits(p_e) - entropy_bits(joint.ravel()))
    return max(mi, 0.0) / h_d


@dataclass(frozen=True)
class TokenExpertNPMI:
    """Most associated tokens of each expert, [E, n] each, best first; padded with -1 / NaN / 0."""

    token_ids: np.ndarray  # [E, n] int64
    npmi: np.ndarray  # [E, n]
    counts: np.ndarray  # [E, n] n(x, e) joint selections
    min_count: int


def token_expert_npmi(ids, token_id, n_experts: int, top_n: int = 10, min_count: int = 10) -> TokenExpertNPMI:
    """nPMI between token ids and experts (RICE, arXiv 2505.14681, Eq. for nPMI):
    nPMI(x, e) = log2[p(x, e) / (p(x) p(e))] / (-log2 p(x, e)).

    Probabilities are over top-k selections (N = T * K): p(x, e) = n(x, e) / N, p(e) = n(e) / N, and p(x) = n(x) / T
    (the share of selections made by tokens x). Only tokens occurring at least `min_count` times are ranked, so a token
    seen once with one expert (nPMI near 1 by chance) cannot crowd out real associations. Ties are broken by joint
    count, then token id.
    """
    ids = check_ids(ids, n_experts)
    token_id = check_tokens_vector(token_id, ids.shape[0], "token_id")
    if top_n < 1 or min_count < 1:
        raise ValueError("top_n and min_count must be >= 1")
    n_tok, top_k = ids.shape
    if n_tok and token_id.min() >= 0 and (int(token_id.max()) + 1) * n_experts <= 1 << 25:
        vocab, inv = np.arange(int(token_id.max()) + 1), token_id  # small ids index directly (no sort)
    else:
        vocab, inv = np.unique(token_id, return_inverse=True)  # [V], [T]
    tok_count = np.bincount(inv, minlength=vocab.size)  # [V]
    keys = (inv[:, None].astype(np.int64) * n_experts + ids).ravel()  # [T * K]
    if vocab.size * n_experts <= 1 << 25:
        dense = np.bincount(keys, minlength=vocab.size * n_experts)
        pair_keys = np.flatnonzero(dense)
        pair_n = dense[pair_keys]
    else:
        pair_keys, pair_n = np.unique(keys, return_counts=True)
    x, e = pair_keys // n_experts, pair_keys % n_experts  # [P]
    keep = tok_count[x] >= min_count
    x, e, pair_n = x[keep], e[keep], pair_n[keep]
    n_sel = n_tok * top_k
    p_xe = pair_n / n_sel
    p_x = tok_count[x] / n_tok
    p_e = np.bincount(ids.ravel(), minlength=n_experts)[e] / n_sel
    with np.errstate(divide="ignore", invalid="ignore"):
        npmi = np.where(p_xe < 1, np.log2(p_xe / (p_x * p_e)) / -np.log2(p_xe), 1.0)
    return _top_per_expert(x, e, npmi, pair_n, vocab, n_experts, top_n, min_count)


def _top_per_expert(x, e, npmi, pair_n, vocab, n_experts, top_n, min_count) -> TokenExpertNPMI:
    order = np.lexsort((vocab[x], -pair_n, -npmi, e))  # by expert, then nPMI desc, count desc, token id asc
    e_sorted = e[order]
    group_start = np.searchsorted(e_sorted, e_sorted, side="left")
    rank = np.arange(order.size) - group_start  # position within the expert's list
    sel = order[rank < top_n]
    ids_out = np.full((n_experts, top_n), -1, dtype=np.int64)
    val_out = np.full((n_experts, top_n), np.nan)
    cnt_out = np.zeros((n_experts, top_n), dtype=np.int64)
    r = rank[rank < top_n]
    ids_out[e[sel], r] = vocab[x[sel]]
    val_out[e[sel], r] = npmi[sel]
    cnt_out[e[sel], r] = pair_n[sel]
    return TokenExpertNPMI(ids_out, val_out, cnt_out, min_count)
