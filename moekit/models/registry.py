"""Adapters: where a transformers MoE family keeps its router, experts and shared experts, and its routing rule.

An adapter is data. Add a family by calling `register(Adapter(...))` in a small module under moekit/models/ and importing
it in moekit/models/__init__.py. Looked up by `config.model_type` (megablocks `dmlp_registry` style).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moekit.registry import Registry
from moekit.ops.routing import RoutingRule


@dataclass(frozen=True)
class ExpertLayout:
    """How the fused expert tensors are stored (transformers' `use_experts_implementation` flags)."""

    transposed: bool = False  # [E, H, 2I] and [E, I, H] (x @ W) instead of [E, 2I, H] and [E, H, I] (F.linear)
    interleaved: bool = False  # gate/up columns interleaved g0, u0, g1, u1, ... (GPT-OSS) instead of [gate; up]
    has_bias: bool = False  # gate_up_proj_bias [E, 2I] and down_proj_bias [E, H]
    has_gate: bool = True  # False: up_proj only, act(up)
    single_neuron: bool = False  # experts of one neuron, rows of two [E, H] embeddings (Doge CDMoE, PEER)


@dataclass(frozen=True)
class Adapter:
    model_type: str
    rule: Callable  # (config, router module) -> RoutingRule
    expert_count_keys: tuple[str, ...]  # config keys that hold the routed expert count
    top_k_key: str = "num_experts_per_tok"
    block: str = "mlp"  # decoder-layer attribute of the MoE block
    router: str = "gate"  # MoE-block attributes ...
    experts: str = "experts"
    shared: str | None = None  # shared expert MLP, added to every token's output
    shared_gate: str | None = None  # Linear(H, 1) whose sigmoid scales the shared expert (Qwen2-MoE)
    shared_on_layer: bool = False  # `shared` is a decoder-layer attribute, fed the block's input (GraniteMoeShared)
    shared_block_mlp: bool = False  # the block's own gate_proj / up_proj / down_proj are its shared expert (Doge)
    shared_mix_key: str | None = None  # config key: "sum" (default) or "average" of routed and shared (Cohere2-MoE)
    post_norm: str | None = None  # MoE-block attribute of a norm the block applies to its output (AXK1)
    identity_experts_key: str | None = None  # config key: zero-compute experts after the routed ones (LongCat-Flash)
    routed_scale_key: str | None = None  # config key of a factor on the routed-expert sum, outside the router (Laguna)
    router_linear: str | None = None  # router attribute holding the Linear with the router weight (HunYuan `wg`)
    correction_bias: str | None = None  # attribute path of e_score_correction_bias, under the router ...
    correction_bias_on_block: bool = False  # ... or under the MoE block, which hands it to the router (MiniMax-M2)
    router_fp32: bool = False  # router linear computed in float32 whatever the model dtype
    router_softcap_key: str | None = None  # config key of the router logit soft-cap: cap * tanh(logits / cap) (Laguna)
    layout: ExpertLayout | None = None  # None: read the flags use_experts_implementation sets on the experts module
    activation: Callable | None = None  # (config, experts module) -> activation; None: act(gate) * up, hidden_act
    router_output: str = "logits_weights_ids"  # what the router returns: one of ROUTER_OUTPUTS
    # --- experts stored other than as transformers' fused `experts` module (paths relative to the MoE block)
    fused: tuple[tuple[str, str], ...] = ()  # fused tensor name -> path under the experts module (JetMoE, Doge)
    per_expert: tuple[tuple[str, str], ...] = ()  # one module per expert, `expert_{e}`: canonical name -> path
    # --- what the block does around the routed experts
    expert_in: tuple[str, ...] = ()  # block modules applied, in order, to the experts' input (latent projections)
    expert_out: tuple[str, ...] = ()  # ... and to the routed sum (NemotronH, MuseSpark)
    output_bias: str | None = None  # block parameter [H] added to the block output (JetMoE)
    router_logit_scale_key: str | None = None  # config key of a factor on the router logits (MuseSpark)
    router_scale: str | None = None  # router parameter multiplying the final weights (Inkling global_scale)
    hash_table: str | None = None  # router buffer [V, K]: token id -> experts, for rule.hashed layers (DeepSeek-V4)
    router_state: bool = False  # the router also takes the previous MoE layer's router state (Zaya)
    token_dropout_key: str | None = None  # config key p: the block scales expert outputs by 1 - p at inference (NLLB)
    stacks: tuple[tuple[str, str, str], ...] = ()  # (kind, layers path, MoE-block path): encoder-decoder models
    loop_keys: tuple[str, str, str] | None = None  # config keys (first, end, passes) of layers run several times
    fixed_count: str = ""  # why the expert count cannot change (no prune / merge), "" when it can
    fixed_routing: str = ""  # why inference routing policies cannot apply (moekit/routing), "" when they can
    notes: str = ""

    def __post_init__(self):
        if self.router_output not in ROUTER_OUTPUTS:
            raise ValueError(f"{self.model_type}: unknown router_output {self.router_output!r}")
        if self.fused and self.per_expert:
            raise ValueError(f"{self.model_type}: experts are either fused tensors or one module each, not both")

    @property
    def seq2seq(self) -> bool:
        return bool(self.stacks)


# router_output values: how a family's router module reports its routing (MoELayer.parse_router_output reads them)
ROUTER_OUTPUTS = (
    "logits_weights_ids",  # (logits [T, E], weights [T, K], ids [T, K]): transformers' MoE router contract
    "scores_logits",  # Llama 4: (dense scores [T, E] zero off the top-k, logits)
    "with_extra",  # (logits, weights, ids, something else): Inkling's shared gammas, Zaya's router state
    "logits",  # the router is a Linear: its logits; the block routes them inline (Doge)
    "sorted_dispatch",  # JetMoE: (flat positions sorted by expert, token index, gates, expert sizes, logits)
    "capacity_mask",  # Switch: (one-hot dispatch [.., E] zeroed over capacity, top-1 probability [.., 1], logits)
    "dense_gates",  # NLLB-MoE: (top-1 one-hot [T, E], combine weights [T, E] zero off the kept top-2, logits)
)


_ADAPTERS: Registry = Registry("adapter", unknown="model type {name!r} is not a supported MoE family; supported: {known}")


def register(adapter: Adapter) -> Adapter:
    return _ADAPTERS.register(adapter.model_type, adapter)


def supported() -> list[str]:
    return _ADAPTERS.names()


def get(model_type: str) -> Adapter:
    return _ADAPTERS.lookup(model_type)


__all__ = ["Adapter", "ExpertLayout", "RoutingRule", "get", "register", "supported"]
