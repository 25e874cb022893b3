"""Inference routing policies (the "routing policy" plan stage): choose and steer experts at inference.

    routing = moekit.routing.parse("top-p=0.5")            # or parse(None, steer="experts.json")
    with moekit.routing.apply(view, routing): model(ids)   # every router call rerouted by forward hooks

Policies, their papers and where moekit deviates: docs/routing.md. Per-request routing in one batch: apply.py.
"""

from moekit.routing import c3po, replay  # noqa: F401  (register the replay and c3po policies)
from moekit.routing.apply import NO_SENTINEL, RoutingHooks, RowSpan, apply, attach, batch_spans, packed_spans
from moekit.routing.policies import POLICIES, Policy, Routing, sentinel
from moekit.routing.spec import parse, parse_request, read_steering, write_steering

__all__ = ["NO_SENTINEL", "POLICIES", "Policy", "Routing", "RoutingHooks", "RowSpan", "apply", "attach",
           "batch_spans", "packed_spans", "parse", "parse_request", "read_steering", "sentinel", "write_steering"]
