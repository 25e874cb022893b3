"""Offloaded execution: expert store (disk -> RAM -> GPU), cache policies, pre-gating prefetch, what-if simulator.

    store = moekit.runtime.build_store(view, "store/")
    om = moekit.runtime.offload(view, "store/", "512MB", policy="lfru")   # view.model now runs offloaded
    om.stats()                                                           # per-layer hits, misses, bytes, prefetch

    om = moekit.runtime.open_offloaded("ckpt/", RuntimeOptions(budget="512MB"))  # from a checkpoint: what run/serve use

Definitions: docs/conventions.md (§Physical bound; §Hit-rate conventions: a running system, cold misses count as
misses). docs/runtime.md.
"""

from moekit.runtime.engine import OffloadedModel, format_bytes, min_budget, offload, parse_bytes
from moekit.runtime.policies import available as available_policies
from moekit.runtime.policies import make as make_policy
from moekit.runtime.policies import register
from moekit.runtime.session import RuntimeOptions, check_offloaded, default_store_dir, open_offloaded
from moekit.runtime.store import ExpertStore, build_store

__all__ = [
           "ExpertStore",
           "OffloadedModel",
           "RuntimeOptions",
           "available_policies",
           "build_store",
           "check_offloaded",
           "default_store_dir",
           "format_bytes",
           "make_policy",
           "min_budget",
           "offload",
           "open_offloaded",
           "parse_bytes",
           "register",
]
