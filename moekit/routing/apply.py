"""Applying routing policies to a model without patching transformers: a forward hook on each MoE layer's router
returns the router's output recomputed under the policy, in the router's own output format.

Rows. A router sees the step's tokens as rows [T, H] (batch-major: row b * S + s for a [B, S] batch, or packed
requests one after another). `RoutingHooks.use(spans)` assigns row ranges to routings, so one step can carry a
different policy per request (continuous batching); rows no span covers keep the stock routing, untouched.

    hooks = attach(view)                       # once per model
    with hooks.use(routing): model(ids)        # every row
    hooks.set_rows([RowSpan(0, 5, ra), RowSpan(5, 9, rb)])   # the server, before each step; hooks.clear() after
    hooks.remove()

Dropped slots carry the sentinel id (moekit.routing.policies.sentinel) with weight 0. transformers' eager loops skip
it (one_hot over E + 1 classes) except where the experts module one-hots over E (GPT-OSS) or E + zero experts
(LongCat-Flash), or loops over every class it hit (NemotronH): there a pre-hook on the experts module hands the token's
first expert id with weight 0 instead (one extra row computed, times 0). JetMoE's dispatch lists leave them out.
moekit's offloaded engine skips sentinels itself (no read, no cache access). Hash-routed layers (DeepSeek-V4) get no
hook: their experts come from a token-id table, which no policy changes.
Dimension legend: T tokens, E experts, K selected, S shared experts.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moekit.models.view import Rerouted
from moekit.routing.policies import Routing, sentinel

# families whose eager experts loop cannot take the sentinel id (tests/routing/test_identity.py probes every family)
NO_SENTINEL = frozenset({"gpt_oss", "longcat_flash", "nemotron_h"})


@dataclass(frozen=True)
class RowSpan:
    """Rows [start, stop) of a router call routed by `routing` (None: stock). One request's rows: C3PO treats
    stop - 1 as the request's last position."""

    start: int
    stop: int
    routing: Routing | None

    def __post_init__(self):
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"bad row span [{self.start}, {self.stop})")


def batch_spans(routings: list[Routing | None], seq_len: int) -> list[RowSpan]:
    """Spans for a [B, S] batch whose b-th sequence is routed by routings[b]."""
    return [RowSpan(b * seq_len, (b + 1) * seq_len, r) for b, r in enumerate(routings)]


def packed_spans(routings: list[Routing | None], lengths: list[int]) -> list[RowSpan]:
    """Spans for requests packed one after another (lengths[i] rows each), as a continuous-batching step lays them."""
    spans, start = [], 0
    for r, n in zip(routings, lengths, strict=True):
        spans.append(RowSpan(start, start + n, r))
        start += n
    return spans


class RoutingHooks:
    """The hooks on one model's routers, and the row spans the next forward passes are routed by."""

    def __init__(self, view):
        self.view = view
        self.spans: list[RowSpan] = []
        self.whole: Routing | None = None  # every row, whatever T is
        self.calls = 0  # router calls rerouted (tests)
        self._handles = []
        offloaded = getattr(view.model.config, "_experts_implementation", None) == "moekit_offload"
        for layer in view.layers:
            if layer.rule.hashed:
                continue
            # prepend: run before any capture hook (moekit trace records what the policy selected)
            self._handles.append(layer.router.register_forward_hook(self._hook(layer), prepend=True))
            if layer.adapter.model_type in NO_SENTINEL and not offloaded:
                self._handles.append(layer.experts.register_forward_pre_hook(_sentinel_to_first(layer)))

    # ---- what the engine / server calls
    def set_rows(self, spans: list[RowSpan]) -> None:
        for s in spans:
            if s.routing is not None:
                _bind(s.routing, self.view)
        self.whole, self.spans = None, sorted(spans, key=lambda s: s.start)

    def set_all(self, routing: Routing | None) -> None:
        if routing is not None:
            _bind(routing, self.view)
        self.whole, self.spans = routing, []

    def clear(self) -> None:
        self.whole, self.spans = None, []

    @contextmanager
    def use(self, routing_or_spans):
        """Route every row by a Routing, or rows by a list of RowSpans, inside the block."""
        saved = (self.whole, self.spans)
        if isinstance(routing_or_spans, list):
            self.set_rows(routing_or_spans)
        else:
            self.set_all(routing_or_spans)
        try:
            yield self
        finally:
            self.whole, self.spans = saved

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---- the hook
    def _hook(self, layer):
        def hook(module, args, out):
            if self.whole is None and not self.spans:
                return None
            logits, weights, ids = layer.parse_router_output(out)
            shared = None
            if layer.rule.shared_logits:  # Inkling returns its routed logits only; its shared ones join the weights
                x = args[0]
                logits, shared = layer.router_logits(x.reshape(-1, x.shape[-1])), out[3]
            spans = [RowSpan(0, logits.shape[0], self.whole)] if self.whole is not None else self.spans
            new_w, new_ids, new_shared = reroute(layer, logits, weights, ids, spans, shared)
            self.calls += 1
            return _format(layer, out, new_w.to(weights.dtype), new_ids, new_shared)

        return hook


def reroute(layer, logits, weights, ids, spans: list[RowSpan], shared=None):
    """(weights [T, K'], ids [T, K'], shared weights [T, S] or None) for a router call: each span's rows under its
    routing, the others as the router chose them; narrower pieces padded with the sentinel (weight 0). shared [T, S]:
    the router's own shared-expert weights (Inkling; logits [T, E + S] then)."""
    T = logits.shape[0]
    if spans and spans[-1].stop > T:
        raise ValueError(f"row span [{spans[-1].start}, {spans[-1].stop}) beyond this call's {T} rows")
    pieces, at = [], 0

    def stock(a, b):
        pieces.append((weights[a:b].float(), ids[a:b], None if shared is None else shared[a:b].float()))

    for s in spans:
        if s.start > at:
            stock(at, s.start)
        if s.routing is None:
            stock(s.start, s.stop)
        else:
            pieces.append(s.routing.route(layer, logits[s.start:s.stop], s, router_ids=ids[s.start:s.stop]))
        at = s.stop
    if at < T:
        stock(at, T)
    if len(pieces) == 1:
        return pieces[0]
    k = max(p[1].shape[1] for p in pieces)
    fill = sentinel(layer)
    w = torch.cat([torch.nn.functional.pad(p[0], (0, k - p[0].shape[1])) for p in pieces])
    i = torch.cat([torch.nn.functional.pad(p[1], (0, k - p[1].shape[1]), value=fill) for p in pieces])
    return w, i, None if shared is None else torch.cat([p[2] for p in pieces])


def _format(layer, out, weights, ids, shared=None) -> Rerouted:
    """The router's own return value with the new selection, carrying it (moekit.models.view.Rerouted)."""
    kind = layer.adapter.router_output
    if kind == "scores_logits":  # Llama 4: dense scores [T, E], zero off the selection
        scores = out[0]
        dense = torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=scores.dtype, device=scores.device)
        return Rerouted((dense.scatter_(1, ids, weights)[:, :-1], out[1]), (out[1], weights, ids))
    if kind == "sorted_dispatch":
        return Rerouted(_sorted_dispatch(weights, ids, layer.num_experts, out[4]), (out[4], weights, ids))
    if kind == "with_extra":  # Inkling: its shared experts' new weights; Zaya: the router state, as it was
        extra = shared.to(out[3].dtype) if shared is not None else out[3]
        return Rerouted((out[0], weights, ids, extra), (out[0], weights, ids))
    assert kind == "logits_weights_ids", f"{layer.adapter.model_type}: no policy applies to {kind} routers"
    return Rerouted((out[0], weights, ids), (out[0], weights, ids))


def _sorted_dispatch(weights, ids, num_experts: int, logits):
    """JetMoE's gating output (JetMoeTopKGating.forward) for a selection [T, K']: the flat positions t * K' + k sorted
    by expert as the gating sorts them, their tokens and gates, the tokens per expert, the logits. Dropped slots
    (ids >= E) sort last and are left out: no expert sees them."""
    flat = ids.reshape(-1)  # [T*K']
    real = flat < num_experts
    _, order = flat.sort(0)
    order = order[: int(real.sum())]
    sizes = torch.bincount(flat[real], minlength=num_experts).tolist()
    return order, order.div(ids.shape[1], rounding_mode="trunc"), weights.reshape(-1)[order], sizes, logits


def _sentinel_to_first(layer):
    width = sentinel(layer)

    def pre_hook(module, args):
        hidden, ids, weights, *rest = args
        if ids.shape[1] == 1:  # LongCat-Flash's loop squeezes a K of 1 away: give it a second, dropped slot
            ids = torch.cat([ids, torch.full_like(ids, width)], dim=1)
            weights = torch.cat([weights, torch.zeros_like(weights)], dim=1)
        dropped = ids >= width
        if not bool(dropped.any()):
            return None
        return (hidden, torch.where(dropped, ids[:, :1], ids), weights.masked_fill(dropped, 0), *rest)

    return pre_hook


def _bind(routing: Routing, view) -> None:
    if routing.bound_to is not view:
        routing.bind(view)


@contextmanager
def apply(view, routing: Routing | None):
    """Route the model by `routing` inside the block (None: stock, no hooks)."""
    if routing is None:
        yield None
        return
    hooks = attach(view)
    try:
        with hooks.use(routing):
            yield hooks
    finally:
        hooks.remove()


def attach(view) -> RoutingHooks:
    return RoutingHooks(view)
