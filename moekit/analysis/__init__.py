"""Routing analysis: pure functions from trace arrays to tables (ALGORITHMS.md §1).

Inputs follow the trace contract: per MoE layer ids [T, K] (weight-descending), weights [T, K], logits [T, E] optional;
per token seq_id, position, token_id, domain [T]. No torch, no file I/O.

  load            expert frequency, soft usage, load-balance loss (sequence / global), MaxVio, routing entropy
  coactivation    co-activation matrix, inter-layer affinity and its concentration
  specialisation  per-domain usage, JS divergence, domain NMI, token-expert nPMI
  locality        SRP and SCH (local routing consistency)
  cache           LRU / LFU / Belady hit rate vs capacity
  super_experts   Super Experts from down-projection output maxima
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekit.analysis.cache import POLICIES, cache_hit_rate_reference, cache_hit_rates, capacities_for
from moekit.analysis.coactivation import (AffinityConcentration, affinity, affinity_concentration, affinity_counts,
                                          coactivation)
from moekit.analysis.load import (LoadBalance, expert_counts, expert_frequency, gate_probs, layer_entropy,
                                  load_balance_loss, max_violation, sequence_max_violation, soft_usage, token_entropy)
from moekit.analysis.locality import (SEGMENT_LENGTHS, SRPResult, sch_reference, segment_cache_hit_rate,
                                      segment_routing_performance, srp_reference)
from moekit.analysis.specialisation import (TokenExpertNPMI, domain_counts, domain_jsd, domain_nmi, domain_usage,
                                            token_expert_npmi)
from moekit.analysis.super_experts import SuperExpert, super_experts

__all__ = [
    "POLICIES", "SEGMENT_LENGTHS", "AffinityConcentration", "LayerSummary", "LoadBalance", "SRPResult", "SuperExpert",
    "TokenExpertNPMI", "affinity", "affinity_concentration", "affinity_counts", "cache_hit_rate_reference",
    "cache_hit_rates", "capacities_for", "coactivation", "domain_counts", "domain_jsd", "domain_nmi", "domain_usage",
    "expert_counts", "expert_frequency", "gate_probs", "layer_entropy", "load_balance_loss", "max_violation",
    "sch_reference", "segment_cache_hit_rate", "segment_routing_performance", "sequence_max_violation", "soft_usage",
    "srp_reference", "summarise_layer", "super_experts", "token_entropy", "token_expert_npmi",
]


@dataclass(frozen=True)
class LayerSummary:
    """One row of the per-layer summary table."""

    n_tokens: int
    top_k: int
    layer_entropy_bits: float  # entropy of the expert frequency distribution (max log2 E)
    token_entropy_bits: float  # mean per-token routing entropy
    entropy_source: str  # "logits" (over E) or "topk_weights" (over the renormalised top-k, max log2 K)
    global_lbl: float
    sequence_lbl: float
    lbl_source: str
    max_vio_global: float
    max_vio_sequence: float
    unused_experts: int


def summarise_layer(ids, n_experts: int, seq_id, weights=None, logits=None) -> LayerSummary:
    """Summary-table row of one layer, from the functions in `load`."""
    counts = expert_counts(ids, n_experts)
    tok_h, h_src = token_entropy(ids, n_experts, weights, logits)
    lbl = load_balance_loss(ids, n_experts, seq_id, weights, logits)
    return LayerSummary(
        n_tokens=int(np.shape(ids)[0]), top_k=int(np.shape(ids)[1]),
        layer_entropy_bits=layer_entropy(counts), token_entropy_bits=float(tok_h.mean()) if tok_h.size else float("nan"),
        entropy_source=h_src, global_lbl=lbl.global_lbl, sequence_lbl=lbl.sequence_lbl, lbl_source=lbl.p_source,
        max_vio_global=max_violation(counts), max_vio_sequence=sequence_max_violation(ids, n_experts, seq_id),
        unused_experts=int((counts == 0).sum()),
    )
