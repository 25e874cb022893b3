"""Inference routing policies: which experts run, chosen per token from the router logits (docs/routing.md).

Each policy is a small object that edits a `Plan` (moekit/routing/select.py) for one router call of one MoE layer: it
changes the logits (steer, force/mask), the eligible set (mask, force), the selection (topk, top-p, skip, rank,
replay, C3PO's override) or the weights (scale). `Routing` chains the policies of one spec and checks they fit the
model (`bind`). Policies are registered by name (STYLE 11); a spec names them, '+' between two:

    topk=2 | top-p=0.5[,renorm] | skip=0.3|auto | rank=2 | mask=L:E,... | force=L:E,... | steer=LAMBDA@L:E,...
    scale=BETA@L:E,... | replay=TRACE | c3po=REFERENCE[,k=3,layers=5]      (L: decoder-layer index, E: expert id)

Options that take a layer range (`layers=a-b`) limit a selection policy to those decoder layers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from moekit.errors import UserError
from moekit.registry import Registry
from moekit.routing import grammar as G
from moekit.routing.select import Plan

POLICIES: Registry = Registry("routing policy", unknown="unknown routing policy {name!r}; known: {known} "
                                                       "(e.g. --routing top-p=0.5, --routing skip=auto)")


def register(name: str):
    def wrap(cls):
        cls.name = name
        return POLICIES.register(name, cls)

    return wrap


class Policy:
    """One routing policy. `selects`: it chooses the kept set itself (at most one such policy in a spec).
    `from_spec(value)` reads the text after "NAME=" (ValueError with the reason when malformed); `example` shows it."""

    name = "base"
    example = ""
    selects = False
    reads_files = False  # its spec names a file it opens (a server never takes such a spec from a request)
    layers: frozenset[int] | None = None  # decoder layers it applies to (None: every MoE layer)

    def check(self, view) -> None:
        """Check the policy against the model (layers, expert ids, the family's rule) from its structure alone, so
        that it can run on a model built on the meta device, before any weight is read."""
        if self.layers is not None:
            _check_layers(view, self.layers, self.spec())

    def bind(self, view) -> None:
        """check, and whatever else the policy needs from the loaded model (calibration, a trace); once per model."""
        self.check(view)

    def applies(self, layer) -> bool:
        """Whether the policy routes `layer`: hash-routed layers (DeepSeek-V4) keep their token table."""
        return not layer.rule.hashed and (self.layers is None or layer.index in self.layers)

    def plan(self, layer, plan: Plan, span) -> None:
        raise NotImplementedError

    def max_k(self, layer) -> int:
        """The most experts a token can keep in `layer` under this policy (the trace's K)."""
        return layer.rule.top_k

    def spec(self) -> str:
        raise NotImplementedError

    def fresh(self) -> Policy:
        """A copy with its own per-request state (replay cursors, C3PO's ω̂); stateless policies return self."""
        return self


# ---------------------------------------------------------------- selection


@register("topk")
@dataclass
class TopK(Policy):
    """Another fixed K (llama.cpp's expert_used_count, transformers' num_experts_per_tok override)."""

    example = "topk=2"

    @classmethod
    def from_spec(cls, value):
        k, *rest = value.split(",")
        return cls(int(k), layers=G.layers(G.options(rest, {"layers"}).get("layers")))

    k: int
    layers: frozenset[int] | None = None

    def __post_init__(self):
        if self.k < 1:
            raise UserError(f"topk={self.k}: K must be >= 1")

    def check(self, view):
        super().check(view)
        for layer in view.layers:
            if self.k != layer.rule.top_k:
                _no_sparsemixer(layer, self.spec())
            room = _selectable(layer)
            if self.applies(layer) and self.k > room:
                raise UserError(f"topk={self.k}: layer {layer.index} can select at most {room} experts "
                                f"({_selectable_why(layer)})")

    def plan(self, layer, plan, span):
        plan.top_k = self.k

    def max_k(self, layer):
        return self.k if self.applies(layer) else layer.rule.top_k

    def spec(self):
        return f"topk={self.k}" + _layers_opt(self.layers)


@register("top-p")
@dataclass
class TopP(Policy):
    """Top-p dynamic routing ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models", arXiv 2403.07652;
    released code ZhenweiAn/Dynamic_MoE `top_p_sampling_batched_all_sequence`): sort p descending and keep the
    smallest prefix whose cumulative sum exceeds P (the crossing expert included; all experts when none does).
    Weights are the raw probabilities (not renormalised) by default; `renorm` applies the family's own rule to the
    kept set, as SCMoE's post-hoc "dynamic" baseline on pre-trained Mixtral does (DavidFanzz/SCMoE).
    moekit ranks by the family's selection score (bias and group limit included) and accumulates p renormalised over
    the eligible experts; sigmoid routers normalise their scores first (an adaptation, not from the paper)."""

    example = "top-p=0.5 or top-p=0.6,renorm"

    @classmethod
    def from_spec(cls, value):
        p, *rest = value.split(",")
        opts = G.options(rest, {"renorm", "layers"})
        return cls(G.number(p, "P"), renorm="renorm" in opts, layers=G.layers(opts.get("layers")))

    p: float
    renorm: bool = False
    layers: frozenset[int] | None = None
    selects = True

    def __post_init__(self):
        if not 0 < self.p or math.isnan(self.p):
            raise UserError(f"top-p={self.p}: P must be > 0 (P >= 1 keeps every expert)")

    def check(self, view):
        super().check(view)
        for layer in view.layers:
            _no_sparsemixer(layer, self.spec())

    def plan(self, layer, plan, span):
        plan.keep, plan.raw = self.keep, not self.renorm

    def keep(self, choice, probs, top_k):
        order = torch.argsort(choice, dim=-1, descending=True, stable=True)  # [T, E]
        cum = probs.gather(1, order).cumsum(dim=-1)  # [T, E]
        crossed = cum > self.p
        last = torch.where(crossed.any(dim=-1), crossed.int().argmax(dim=-1), choice.shape[-1] - 1)  # [T]
        kept_sorted = torch.arange(choice.shape[-1]) <= last[:, None]  # [T, E] over sorted positions
        keep = torch.zeros_like(kept_sorted).scatter_(1, order, kept_sorted)
        return keep & (choice > float("-inf"))

    def max_k(self, layer):
        return _selectable(layer) if self.applies(layer) else layer.rule.top_k

    def spec(self):
        return f"top-p={self.p:g}" + (",renorm" if self.renorm else "") + _layers_opt(self.layers)


@register("skip")
@dataclass
class Skip(Policy):
    """NAEE dynamic skipping ("Not All Experts are Equal", arXiv 2402.14800; Lucky-Lance/Expert_Sparsity
    `DynamicSkippingMixtralSparseMoeBlock`): of the family's top-K, drop every expert whose routing weight is below
    beta times the top-1's (strict: w_i = beta * w_1 is kept), then weight the kept ones by the family's rule
    (Mixtral renormalises: a lone top-1 gets 1.0). `auto` sets beta per layer to the median of w_(2) / w_(1) over
    calibration tokens (`calibrate`), so about half of those tokens skip. The paper is for Mixtral's top-2; for K > 2
    every expert after the first is tested against the same beta * w_1 (an adaptation)."""

    example = "skip=0.3 or skip=auto"

    @classmethod
    def from_spec(cls, value):
        beta, *rest = value.split(",")
        opts = G.options(rest, {"layers"})
        return cls(None if beta == "auto" else G.number(beta, "beta"), layers=G.layers(opts.get("layers")))

    beta: float | None  # None: auto (betas from calibration)
    betas: dict[int, float] = field(default_factory=dict)  # decoder layer -> beta (auto)
    layers: frozenset[int] | None = None
    selects = True

    def __post_init__(self):
        if self.beta is not None and (self.beta < 0 or math.isnan(self.beta)):
            raise UserError(f"skip={self.beta}: beta must be >= 0 (0 keeps the stock top-k)")

    def bind(self, view):
        super().bind(view)
        if self.beta is None and not self.betas:
            raise UserError("skip=auto needs calibration: call moekit.routing.prepare(routing, view, tokenizer) "
                            "(the CLI does it, on --calib data or the demo corpus)")

    def plan(self, layer, plan, span):
        plan.keep = lambda choice, probs, top_k: self.keep(choice, probs, top_k, self.beta_of(layer.index))

    def beta_of(self, index: int) -> float:
        return self.beta if self.beta is not None else self.betas[index]

    @staticmethod
    def keep(choice, probs, top_k, beta):
        ids = torch.topk(choice, top_k, dim=-1).indices  # [T, K] the family's selection
        w = probs.gather(1, ids)  # [T, K]
        top = w.max(dim=-1, keepdim=True)
        kept = (w >= beta * top.values).scatter(1, top.indices, True)  # the top-1 always stays
        return torch.zeros_like(choice, dtype=torch.bool).scatter_(1, ids, kept)

    def spec(self):
        return ("skip=auto" if self.beta is None else f"skip={self.beta:g}") + _layers_opt(self.layers)


@register("rank")
@dataclass
class Rank(Policy):
    """One expert per token: the r-th ranked (0-based) by the family's selection score, weighted by the family's rule
    (renormalised: weight 1.0). SCMoE's weak routing (arXiv 2405.14507; DavidFanzz/SCMoE `student_routed_tok`)."""

    example = "rank=2"

    @classmethod
    def from_spec(cls, value):
        r, *rest = value.split(",")
        return cls(int(r), layers=G.layers(G.options(rest, {"layers"}).get("layers")))

    r: int
    layers: frozenset[int] | None = None
    selects = True

    def __post_init__(self):
        if self.r < 0:
            raise UserError(f"rank={self.r}: the rank is 0-based and must be >= 0")

    def check(self, view):
        super().check(view)
        for layer in view.layers:
            _no_sparsemixer(layer, self.spec())
            if self.applies(layer) and self.r >= _selectable(layer):
                raise UserError(f"rank={self.r}: layer {layer.index} ranks only {_selectable(layer)} experts")

    def plan(self, layer, plan, span):
        plan.keep = self.keep

    def keep(self, choice, probs, top_k):
        ids = torch.topk(choice, self.r + 1, dim=-1).indices[:, self.r:]  # [T, 1]
        return torch.zeros_like(choice, dtype=torch.bool).scatter_(1, ids, True)

    def max_k(self, layer):
        return 1 if self.applies(layer) else layer.rule.top_k

    def spec(self):
        return f"rank={self.r}" + _layers_opt(self.layers)


# ---------------------------------------------------------------- steering: (layer, expert) lists


@dataclass
class _Experts(Policy):
    """A policy on chosen (layer, expert) pairs; `experts` maps decoder layer -> expert ids."""

    experts: dict[int, tuple[int, ...]]

    @classmethod
    def from_spec(cls, value):
        return cls(G.pairs(value.split(",")))

    def check(self, view):
        _check_layers(view, frozenset(self.experts), self.spec())
        for index, ids in self.experts.items():
            width = _width(view.layer(index))
            bad = [e for e in ids if not 0 <= e < width]
            if bad:
                raise UserError(f"{self.spec()}: layer {index} has experts 0..{width - 1}, not {bad}")

    def applies(self, layer):
        return not layer.rule.hashed and layer.index in self.experts

    def _mask(self, layer, plan) -> torch.Tensor:
        m = torch.zeros(plan.logits.shape[-1], dtype=torch.bool)
        m[list(self.experts[layer.index])] = True
        return m

    def pairs(self) -> str:
        return ",".join(f"{l}:{e}" for l, ids in sorted(self.experts.items()) for e in ids)


def _steermoe_logits(layer, z, pos, neg):
    """SteerMoE's rule (adobe-research/SteerMoE `modeling_vllm/qwen3_moe.py`): on log_softmax(z), the promoted experts
    get the row max + 0.01 and the suppressed ones the row min - 0.01; the family's softmax -> top-k follows. Routers
    that do not take a softmax over all experts get the same edit on the raw logits (an adaptation)."""
    x = torch.log_softmax(z, dim=-1) if layer.rule.scoring == "softmax" and not layer.rule.score_after_topk else z
    hi, lo = x.max(dim=-1, keepdim=True).values + 0.01, x.min(dim=-1, keepdim=True).values - 0.01
    if pos is not None:
        x = torch.where(pos, hi, x)
    if neg is not None:
        x = torch.where(neg, lo, x)
    return x


@register("mask")
@dataclass
class Mask(_Experts):
    """Switch experts off (MoTE, arXiv 2502.11096; SteerMoE, arXiv 2509.09660): never selected, the next-best fills
    the slot. Logits edited by SteerMoE's rule, and the experts excluded from selection, so selection biases and group
    limits cannot bring them back."""

    example = "mask=1:3,2:7"

    def plan(self, layer, plan, span):
        off = self._mask(layer, plan)
        plan.logits = _steermoe_logits(layer, plan.logits, None, off)
        plan.allow = ~off if plan.allow is None else plan.allow & ~off

    def spec(self):
        return f"mask={self.pairs()}"


@register("force")
@dataclass
class Force(_Experts):
    """Force experts on (MoTE's "stimulate"; SteerMoE's positive experts): selected for every token, at most K per
    layer. SteerMoE's logit rule gives their weight; the selection is enforced on top of it (bias, groups)."""

    example = "force=1:3"

    def check(self, view):
        super().check(view)
        for index, ids in self.experts.items():
            k = view.layer(index).rule.top_k
            if len(set(ids)) > k:
                raise UserError(f"{self.spec()}: layer {index} selects {k} experts per token; force at most {k}")

    def plan(self, layer, plan, span):
        on = self._mask(layer, plan)
        plan.logits = _steermoe_logits(layer, plan.logits, on, None)
        plan.force = on if plan.force is None else plan.force | on

    def spec(self):
        return f"force={self.pairs()}"


@register("steer")
@dataclass
class Steer(_Experts):
    """Soft steering (Bandarkar et al., "Multilingual Routing in Mixture-of-Experts", arXiv 2510.04694):
    z_e <- z_e + lambda * std(z) for the chosen experts of the chosen layers, before the family's scoring; std over
    the token's E logits (torch.std, unbiased). Stable for |lambda| <= 1 in the paper; 0.5 typical."""

    example = "steer=0.5@1:3,2:7"

    @classmethod
    def from_spec(cls, value):
        lam, experts = G.strength_pairs(value)
        return cls(experts, lam=lam)

    lam: float = 0.5

    def plan(self, layer, plan, span):
        z = plan.logits
        plan.logits = z + self._mask(layer, plan) * (self.lam * z.std(dim=-1, keepdim=True))

    def spec(self):
        return f"steer={self.lam:g}@{self.pairs()}"


@register("scale")
@dataclass
class Scale(_Experts):
    """RICE ("Two Experts Are All You Need for Steering Thinking", arXiv 2505.14681): multiply the routing weight of
    the chosen experts by beta when they are selected, after the family's rule, without renormalising."""

    example = "scale=64@1:3"

    @classmethod
    def from_spec(cls, value):
        beta, experts = G.strength_pairs(value)
        return cls(experts, beta=beta)

    beta: float = 1.0

    def check(self, view):
        super().check(view)
        if not self.beta > 0:
            raise UserError(f"{self.spec()}: beta must be > 0")

    def plan(self, layer, plan, span):
        factor = torch.ones(plan.logits.shape[-1])
        factor[list(self.experts[layer.index])] = self.beta
        plan.scale = factor if plan.scale is None else plan.scale * factor

    def spec(self):
        return f"scale={self.beta:g}@{self.pairs()}"


# ---------------------------------------------------------------- a chain of policies


class Routing:
    """The policies of one spec, applied in order. `fresh()` gives a per-request copy (serve: one per request)."""

    def __init__(self, policies: list[Policy]):
        selecting = [p.spec() for p in policies if p.selects]
        if len(selecting) > 1:
            raise UserError(f"{' and '.join(selecting)} both choose the experts: give one of them")
        self.policies = policies
        self.bound_to = None

    def __repr__(self):
        return f"Routing({self.spec()!r})"

    def spec(self) -> str:
        return "+".join(p.spec() for p in self.policies)

    def check(self, view) -> Routing:
        """Every policy checked against the model's structure (a model on the meta device will do): the CLI calls it
        before any weight is read."""
        _check_family(view, self.spec())
        for p in self.policies:
            with _named_source(p):
                p.check(view)
        return self

    def bind(self, view) -> Routing:
        _check_family(view, self.spec())
        for p in self.policies:
            with _named_source(p):
                p.bind(view)
        self.bound_to = view
        return self

    def fresh(self) -> Routing:
        r = Routing([p.fresh() for p in self.policies])
        r.bound_to = self.bound_to
        return r

    def for_prompt(self, text: str) -> Routing:
        """A per-request copy for a prompt (C3PO derives its ω̂ from the prompt's text; others ignore it)."""
        r = Routing([p.for_prompt(text) if hasattr(p, "for_prompt") else p.fresh() for p in self.policies])
        r.bound_to = self.bound_to
        return r

    def route(self, layer, logits: torch.Tensor, span, router_ids=None):
        """(weights [t, K'], ids [t, K'], shared weights [t, S] or None) for this layer's logits [t, E (+ S)] under
        every policy that applies (router_ids [t, K]: the router's own choice, whose slot order unchanged tokens keep).
        Inkling's logits end with its S shared experts' columns: policies see the routed ones, the weights both."""
        from moekit.routing.select import execute

        S = layer.rule.shared_logits
        routed, shared = (logits[:, :-S], logits[:, -S:]) if S else (logits, None)
        plan = Plan(logits=routed.float(), top_k=layer.rule.top_k, shared=shared)
        for p in self.policies:
            if p.applies(layer):
                p.plan(layer, plan, span)
        return execute(plan, layer.rule, layer.correction_bias, sentinel=_width(layer), router_ids=router_ids,
                       router_scale=layer.router_scale)

    def max_k(self, layer) -> int:
        ks = [p.max_k(layer) for p in self.policies if p.applies(layer)]
        selecting = [p.max_k(layer) for p in self.policies if p.applies(layer) and p.selects]
        return selecting[0] if selecting else max(ks, default=layer.rule.top_k)

    def prepare(self, view, tokenizer=None, calib: list[str] | None = None, per_prompt: bool = True) -> Routing:
        """Bind to the model and calibrate what needs it (moekit.routing.calibrate.prepare)."""
        from moekit.routing.calibrate import prepare

        return prepare(self, view, tokenizer, calib, per_prompt=per_prompt)

    def trace_manifest(self, view) -> dict:
        """What a policy trace records about its routing: the spec, the widest K per token, the dropped slots' id."""
        return {"spec": self.spec(), "max_k": max(self.max_k(m) for m in view.layers),
                "sentinel": sentinel(view.layers[0])}

    def applied(self, view):
        """Context manager: the model routed by this routing inside it (moekit.routing.apply)."""
        from moekit.routing.apply import apply

        return apply(view, self)

    def needs_prompt(self) -> bool:
        """True when a policy adapts to each request's prompt (C3PO): a whole-batch evaluation would not apply it."""
        return any(hasattr(p, "for_prompt") for p in self.policies)

    def find(self, cls):
        return next((p for p in self.policies if isinstance(p, cls)), None)


# ---------------------------------------------------------------- helpers


def sentinel(layer) -> int:
    """The id a dropped slot carries: E (E + zero experts for LongCat-Flash; Zaya's skip expert is this id)."""
    return _width(layer)


def _width(layer) -> int:
    return layer.num_experts + layer.identity_experts


def candidates(layer) -> int:
    """The router's choices per token, the policies' columns: its experts, LongCat's zero experts, Zaya's skip
    expert (Inkling's shared experts are not chosen: they always run)."""
    return _width(layer) + layer.rule.null_experts


def _selectable(layer) -> int:
    rule = layer.rule
    return candidates(layer) // rule.n_group * rule.topk_group


def _selectable_why(layer) -> str:
    rule = layer.rule
    if rule.n_group > 1:
        return f"{rule.topk_group} of {rule.n_group} expert groups are eligible"
    return f"{_width(layer)} experts"


def _no_sparsemixer(layer, spec: str) -> None:
    if layer.rule.scoring == "sparsemixer":
        raise UserError(f"{spec}: {layer.adapter.model_type}'s sparsemixer routing is defined for top-2 only; "
                        f"policies that keep top-2 or fewer of its experts apply (skip, mask, force, steer, scale)")


def _check_layers(view, layers, spec: str) -> None:
    known = [m.index for m in view.layers]
    bad = sorted(set(layers) - set(known))
    if bad:
        raise UserError(f"{spec}: decoder layer(s) {bad} are not MoE layers of this model; MoE layers: {known}")
    hashed = sorted(m.index for m in view.layers if m.index in layers and m.rule.hashed)
    if hashed:
        learned = [m.index for m in view.layers if not m.rule.hashed]
        raise UserError(f"{spec}: decoder layer(s) {hashed} of {view.model_type} are hash-routed (their experts "
                        f"come from a token-id table, not the router's scores): policies apply to its learned-routed "
                        f"layers {learned}")


def _check_family(view, spec: str) -> None:
    """The families no policy applies to (Adapter.fixed_routing) and models with no learned-routed MoE layer."""
    if view.adapter.fixed_routing:
        raise UserError(f"--routing {spec}: routing policies do not apply to {view.model_type}: "
                        f"{view.adapter.fixed_routing}; run it without --routing / --steer")
    if all(m.rule.hashed for m in view.layers):
        raise UserError(f"--routing {spec}: every MoE layer of this {view.model_type} model is hash-routed (experts "
                        f"by token id): no layer takes a routing policy")


def _layers_opt(layers) -> str:
    if layers is None:
        return ""
    ls = sorted(layers)
    if ls == list(range(ls[0], ls[-1] + 1)):
        return f",layers={ls[0]}-{ls[-1]}"
    return ",layers=" + "/".join(map(str, ls))


@contextmanager
def _named_source(policy: Policy):
    """A policy read from a file (`--steer FILE` sets `policy.source`) names that file in its refusal: the user wrote
    the file, not the spec the refusal quotes."""
    try:
        yield
    except UserError as err:
        source = getattr(policy, "source", None)
        if source is None:
            raise
        raise UserError(f"{source}: {err}") from None
