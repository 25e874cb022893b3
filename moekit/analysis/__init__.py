"""Routing analysis: pure functions from trace arrays to tables (definitions: docs/conventions.md §Routing statistics).

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

from moekit.analysis.cache import POLICIES, cache_hit_rate_reference, cache_hit_rates, capacities_for
from moekit.analysis.coactivation import (
    AffinityConcentration,
    affinity,
    affinity_concentration,
    affinity_counts,
    affinity_from_counts,
    coactivation,
)
from moekit.analysis.load import (
    LayerSummary,
    LoadBalance,
    expert_counts,
    expert_frequency,
    gate_probs,
    layer_entropy,
    load_balance_loss,
    max_violation,
    sequence_max_violation,
    soft_usage,
    summarise_layer,
    token_entropy,
)
from moekit.analysis.locality import (
    SEGMENT_LENGTHS,
    SRPResult,
    sch_reference,
    segment_cache_hit_rate,
    segment_routing_performance,
    srp_reference,
)
from moekit.analysis.specialisation import (
    TokenExpertNPMI,
    domain_counts,
    domain_jsd,
    domain_nmi,
    domain_usage,
    token_expert_npmi,
)
from moekit.analysis.super_experts import SuperExpert, super_experts

__all__ = [
    "POLICIES",
    "SEGMENT_LENGTHS",
    "AffinityConcentration",
    "LayerSummary",
    "LoadBalance",
    "SRPResult",
    "SuperExpert",
    "TokenExpertNPMI",
    "affinity",
    "affinity_concentration",
    "affinity_counts",
    "affinity_from_counts",
    "cache_hit_rate_reference",
    "cache_hit_rates",
    "capacities_for",
    "coactivation",
    "domain_counts",
    "domain_jsd",
    "domain_nmi",
    "domain_usage",
    "expert_counts",
    "expert_frequency",
    "gate_probs",
    "layer_entropy",
    "load_balance_loss",
    "max_violation",
    "sch_reference",
    "segment_cache_hit_rate",
    "segment_routing_performance",
    "sequence_max_violation",
    "soft_usage",
    "srp_reference",
    "summarise_layer",
    "super_experts",
    "token_entropy",
    "token_expert_npmi",
]
