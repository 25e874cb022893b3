"""One typed view over a transformers MoE causal LM: its MoE layers, routers, routing rules, fused experts.

Dimension legend: T tokens, E experts, K selected per token, H hidden size, I expert intermediate size.
Canonical per-expert weights (what get_expert returns and set_expert takes), whatever the fused storage layout:
  gate [I, H], up [I, H], down [H, I]  (+ gate_bias [I], up_bias [I], down_bias [H] when the family has biases)
so an expert computes down(act(gate x) * up x) with F.linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.architecture import get_path
from moekit.models.registry import Adapter, ExpertLayout
from moekit.ops.activations import GatedActivation
from moekit.ops.routing import RoutingRule, joint_shared_weights, route, softcap


class Rerouted(tuple):
    """A router's return value rewritten by a routing policy (moekit/routing/apply.py), in the router's own format,
    carrying the selection it encodes: `selection` = (logits, weights [T, K'], ids [T, K']) with the policy's dropped
    slots (sentinel id, weight 0). Some formats cannot be read back exactly (JetMoE's dispatch lists leave dropped slots
    out; Llama 4's dense scores do not say K'), so `MoELayer.parse_router_output` returns it as it is."""

    selection: tuple

    def __new__(cls, out, selection):
        obj = super().__new__(cls, out)
        obj.selection = selection
        return obj


@dataclass
class MoELayer:
    index: int  # decoder-layer index in the model
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    rule: RoutingRule
    layout: ExpertLayout
    activation: GatedActivation
    adapter: Adapter
    shared: nn.Module | None = None
    shared_gate: nn.Module | None = None
    shared_mix: str = "sum"  # how routed and shared outputs combine: sum | average (Cohere2-MoE)
    routed_scale: float = 1.0  # factor on the routed-expert sum applied by the block, not the router (Laguna)
    router_softcap: float = 0.0  # > 0: the router soft-caps its logits (Laguna)
    post_norm: nn.Module | None = None  # applied to the block's combined output (AXK1)
    identity_experts: int = 0  # ids E .. E + identity_experts - 1 output their input (LongCat-Flash zero experts)
    kind: str = "decoder"  # the stack the layer is in: "encoder" or "decoder"
    passes: int = 1  # how many times one forward runs the layer (Inkling2-Loop's loop layers)
    router_logit_scale: float = 1.0  # factor on the router logits (MuseSpark output_multiplier)
    token_dropout: float = 0.0  # the block scales expert outputs by 1 - token_dropout (NLLB-MoE at inference)

    @property
    def num_experts(self) -> int:
        """Routed experts with weights (LongCat-Flash's gate_up_proj also has rows for its identity experts)."""
        if self.adapter.per_expert:  # NllbMoeExperts also holds its token-dropout module
            return sum(1 for name in self.experts.keys() if name.startswith("expert_"))
        return self._fused("down_proj").shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.expert_views(0)["down"].shape[1]

    @property
    def expert_norm(self) -> nn.Module | None:
        """The norm each routed expert's output goes through before its weight (MuseSpark `post_expert_norm`)."""
        return self.experts.post_expert_norm if getattr(self.experts, "has_post_expert_norm", False) else None

    @property
    def extra_router_rows(self) -> int:
        """Router rows after the routed experts' that are kept whatever experts are kept: LongCat's identity experts,
        Zaya's skip expert, Inkling's shared experts."""
        return self.identity_experts + self.rule.extra_logits

    @property
    def predictable(self) -> bool:
        """Whether the routing is a function of the block input (and, with capacity, of where sequences start) alone,
        what prefetch and calibration re-route: not for hash-routed layers (token ids), Zaya (router state) or product
        keys (other tokens' logit rows)."""
        return not (self.rule.hashed or self.adapter.router_state or self.rule.product_keys)

    @property
    def prefetchable(self) -> bool:
        """Whether pre-gating can predict this layer from the previous layer's experts input: routing that is a function
        of the block input, and experts that see the block input (not a latent projection of it)."""
        return self.predictable and not self.adapter.expert_in

    @property
    def hash_table(self) -> torch.Tensor | None:  # [V, K] token id -> experts (DeepSeek-V4 hash layers)
        return get_path(self.router, self.adapter.hash_table) if self.rule.hashed else None

    @property
    def router_scale(self) -> torch.Tensor | None:  # learned factor on the final weights (Inkling global_scale)
        return get_path(self.router, self.adapter.router_scale) if self.adapter.router_scale else None

    @property
    def correction_bias(self) -> torch.Tensor | None:  # [E], selection only
        buffer = self.correction_bias_buffer
        return None if buffer is None else buffer.reshape(-1)

    @property
    def correction_bias_buffer(self) -> torch.Tensor | None:
        """The module's own selection-bias tensor ([E] or [1, E]), wherever the family keeps it (router or block)."""
        if self.adapter.correction_bias is None or not self.rule.correction_bias:
            return None  # LFM2-MoE: the bias exists only when config.use_expert_bias
        owner = self.block if self.adapter.correction_bias_on_block else self.router
        return get_path(owner, self.adapter.correction_bias)

    @property
    def router_linear(self) -> nn.Module:
        """The module holding the router weight [E, H] (and bias): the router itself, or a Linear inside it."""
        return get_path(self.router, self.adapter.router_linear) if self.adapter.router_linear else self.router

    def router_logits(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """Router logits [T, E (+ rule.extra_logits)] for MoE-block inputs x [T, H], computed as the family's router
        does. state: the router state a Zaya router receives from the previous MoE layer ([T, R], or None)."""
        if self.adapter.router_state:
            return _zaya_logits(self.router, x, state)
        linear = self.router_linear
        weight, bias = linear.weight, getattr(linear, "bias", None)
        if self.adapter.router_fp32:
            x, weight = x.float(), weight.float()
            bias = bias.float() if bias is not None else None
        # routers whose weight dtype differs from the activations' (HunYuan's float32 `wg`) cast the input to it
        logits = F.linear(x.to(weight.dtype), weight, bias)
        if self.router_logit_scale != 1.0:
            logits = logits * self.router_logit_scale
        return softcap(logits.float(), self.router_softcap) if self.router_softcap > 0 else logits

    def route(self, x: torch.Tensor, *, token_ids: torch.Tensor | None = None, state: torch.Tensor | None = None,
              sequences: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, K], ids [T, K]) for block inputs x [T, H] as the model routes them: token_ids [T] for
        hash-routed layers, state for Zaya, sequences (row-major in T) for capacity-limited routers."""
        return self.route_logits(self.router_logits(x, state), token_ids, sequences)

    def route_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-route one call of the router module from the inputs it was given (hidden states [.., H]; a hash
        layer's token ids; Zaya's router state) with moekit's rule -> (logits [T, E (+ extra)], weights, ids)."""
        x = args[0]
        sequences = x.shape[0] if x.dim() == 3 else 1
        token_ids = args[1] if self.rule.hashed else None  # DeepseekV4HashRouter.forward(hidden_states, input_ids)
        state = None
        if self.adapter.router_state:  # ZayaRouter.forward(hidden_states, router_states=None)
            state = kwargs.get("router_states", args[1] if len(args) > 1 else None)
        logits = self.router_logits(x.reshape(-1, x.shape[-1]), state)
        return (logits, *self.route_logits(logits, token_ids, sequences))

    def route_logits(self, logits: torch.Tensor, token_ids: torch.Tensor | None = None,
                     sequences: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, ids) of router logits [T, E (+ extra)], with the layer's selection bias, scale and hash table."""
        ids = None
        if self.rule.hashed:
            if token_ids is None:
                raise ValueError(f"layer {self.index} is hash-routed: its experts follow the token ids (token_ids=...)")
            ids = self.hash_table[token_ids.reshape(-1)].long()  # [T, K]
        return route(logits, self.rule, self.correction_bias, ids=ids, scale=self.router_scale, sequences=sequences)

    def parse_router_output(self, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The router module's return value -> (logits [T, E], weights [T, K], ids [T, K]) as the model used them; a
        slot no expert computed (over capacity, skip expert) has weight 0."""
        if isinstance(out, Rerouted):
            return out.selection
        kind = self.adapter.router_output
        if kind == "scores_logits":  # Llama 4: dense sigmoid scores, zero off the top-k
            scores, logits = out
            weights, ids = scores.topk(self.rule.top_k, dim=-1)
            return logits, weights, ids
        if kind == "with_extra":
            return out[0], out[1], out[2]
        if kind == "logits":  # Doge: the block routes its router_gate's logits inline, as route() does
            logits = out.reshape(-1, out.shape[-1])
            weights, ids = route(logits, self.rule)
            return logits, weights, ids
        if kind == "sorted_dispatch":
            return _parse_sorted_dispatch(out, self.rule.top_k)
        if kind == "capacity_mask":
            return _parse_capacity_mask(out)
        if kind == "dense_gates":
            return _parse_dense_gates(out)
        logits, weights, ids = out
        return logits, weights, ids

    def expert_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the routed experts compute on, from the block input x [T, H]: x, or its latent projection
        (NemotronH fc1_latent_proj, MuseSpark pre_expert_proj + norm)."""
        for name in self.adapter.expert_in:
            x = getattr(self.block, name)(x)
        return x

    def expert_output(self, y: torch.Tensor) -> torch.Tensor:
        """The weighted routed-expert sum [T, H'] back in the block's hidden space [T, H] (NemotronH
        fc2_latent_proj, MuseSpark post_expert_proj; identity for most families)."""
        for name in self.adapter.expert_out:
            y = getattr(self.block, name)(y)
        return y

    def combine(self, routed: torch.Tensor, x: torch.Tensor,
                shared_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Block output [T, H] from the weighted routed-expert sum [T, H'] (H' the experts' width) and the block input
        x [T, H], in the family's op order: back out of the experts' latent space, x routed_scale (and 1 - token
        dropout), + shared experts, averaged when shared_mix is "average", + output bias, then the post-norm.
        shared_weights [T, S]: Inkling's shared-expert gammas."""
        routed = self.expert_output(routed)
        out = routed * self.routed_scale if self.routed_scale != 1.0 else routed
        out = out * (1 - self.token_dropout) if self.token_dropout else out
        if self.shared is not None:
            out = out + self.shared_forward(x, shared_weights)
            out = out / 2 if self.shared_mix == "average" else out
        if self.adapter.output_bias:
            out = out + getattr(self.block, self.adapter.output_bias)
        return self.post_norm(out) if self.post_norm is not None else out

    def shared_forward(self, x: torch.Tensor, shared_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Shared-expert contribution [T, H] (zeros when the family has none). Inkling's shared experts are weighted by
        the router (shared_weights [T, S], computed from x when not given)."""
        if self.shared is None:
            return torch.zeros_like(x)
        if self.rule.shared_logits:
            if shared_weights is None:
                shared_weights = joint_shared_weights(self.router_logits(x).float(), self.rule, self.correction_bias,
                                                      self.router_scale)[2].to(x.dtype)
            return self.shared(x, gammas=shared_weights)
        y = self.shared(x)
        if self.shared_gate is not None:
            y = torch.sigmoid(self.shared_gate(x)) * y
        return y

    def get_expert(self, e: int) -> dict[str, torch.Tensor]:
        """Copies of expert e's weights in canonical orientation (see the module docstring)."""
        return {k: v.clone(memory_format=torch.contiguous_format) for k, v in self.expert_views(e).items()}

    def set_expert(self, e: int, weights: dict[str, torch.Tensor]) -> None:
        views = self.expert_views(e)
        if set(weights) != set(views):
            raise ValueError(f"expert weights need keys {sorted(views)}, got {sorted(weights)}")
        with torch.no_grad():
            for k, v in weights.items():
                if v.shape != views[k].shape:
                    raise ValueError(f"{k}: expected shape {tuple(views[k].shape)}, got {tuple(v.shape)}")
                views[k].copy_(v)

    def expert_numel(self) -> int:
        """Parameters of one routed expert."""
        return sum(v.numel() for v in self.expert_views(0).values())

    def expert_params(self) -> list[nn.Parameter]:
        """The parameters holding the routed experts' weights (fused tensors, or every per-expert module's)."""
        if self.adapter.per_expert:
            return [p for e in range(self.num_experts) for p in self.experts[f"expert_{e}"].parameters()]
        names = ["gate_up_proj" if self.layout.has_gate else "up_proj", "down_proj"]
        if self.layout.has_bias:
            names += [names[0] + "_bias", "down_proj_bias"]
        return [self._fused_param(n) for n in names]

    def _fused_param(self, name: str) -> nn.Parameter:
        return get_path(self.experts, dict(self.adapter.fused).get(name, name))

    def _fused(self, name: str) -> torch.Tensor:
        return self._fused_param(name).detach()  # detached view: writes land in the parameter's storage

    def expert_views(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e's weights in canonical orientation as views into the fused storage: no copy (read-only use;
        writing through them edits the model)."""
        if self.adapter.per_expert:
            module = self.experts[f"expert_{e}"]
            return {k: get_path(module, path).detach() for k, path in self.adapter.per_expert}
        lay, views = self.layout, {}
        if lay.single_neuron:  # Doge: expert e = row e of the input and output embeddings, I = 1
            return {"up": self._fused("up_proj")[e : e + 1], "down": self._fused("down_proj")[e].unsqueeze(1)}
        if lay.has_gate:
            gu = self._fused("gate_up_proj")[e]  # [2I, H], or [H, 2I] transposed
            gu = gu.T if lay.transposed else gu  # [2I, H]
            views["gate"], views["up"] = _split_gate_up(gu, lay.interleaved)
        else:
            up = self._fused("up_proj")[e]
            views["up"] = up.T if lay.transposed else up  # [I, H]
        down = self._fused("down_proj")[e]
        views["down"] = down.T if lay.transposed else down  # [H, I]
        if lay.has_bias:
            bias_name = "gate_up_proj_bias" if lay.has_gate else "up_proj_bias"
            b = self._fused(bias_name)[e]  # [2I] or [I]
            if lay.has_gate:
                views["gate_bias"], views["up_bias"] = _split_gate_up(b, lay.interleaved)
            else:
                views["up_bias"] = b
            views["down_bias"] = self._fused("down_proj_bias")[e]  # [H]
        return views


class BlockMLP:
    """The dense MLP a block makes of its own gate_proj / up_proj / down_proj: Doge's CDMoE adds it to the routed
    experts' output like a shared expert. Not a module of its own: the projections stay the block's."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        return b.down_proj(b.act_fn(b.gate_proj(x)) * b.up_proj(x))


def _split_gate_up(t: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return t[0::2], t[1::2]
    half = t.shape[0] // 2
    return t[:half], t[half:]


def _unpredictable_reason(layers: list[MoELayer]) -> str:
    layer = next(m for m in layers if not m.predictable)
    if layer.rule.hashed:
        return "hash-routed layers pick experts by token id"
    if layer.adapter.router_state:
        return "each router also reads the previous MoE layer's router state"
    return "its product-key router mixes the logits of different tokens"


def _zaya_logits(router: nn.Module, x: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """Zaya's router (ZayaRouter.forward): down-project, add the previous MoE layer's router state scaled per channel
    (its layers after the first), then the router MLP -> [T, E + 1] logits, the last column its skip expert."""
    h = router.down_proj(x)  # [T, R]
    if getattr(router, "use_eda", False) and state is not None:
        h = h + state.reshape(h.shape) * router.router_states_scale
    return router.router_mlp(h)


def _parse_sorted_dispatch(out, top_k: int):
    """JetMoE's gating output -> (logits [T, E], weights [T, K], ids [T, K]) in each token's top-k order: position
    p = t * K + k of the flat top-k, listed expert by expert with their sizes."""
    index_sorted, _, gates, expert_size, logits = out
    experts = torch.repeat_interleave(torch.arange(len(expert_size)), torch.as_tensor(expert_size))  # [T*K]
    ids = torch.empty_like(index_sorted).index_put_((index_sorted,), experts.to(index_sorted.device))
    weights = torch.empty_like(gates).index_put_((index_sorted,), gates)
    return logits, weights.view(-1, top_k), ids.view(-1, top_k)


def _parse_capacity_mask(out):
    """Switch's top-1 router -> (logits, weights, ids): the arg-max expert of every token (recomputed as the router
    does, since the dispatch mask is zero for a dropped token) at its probability, or weight 0 when dropped."""
    dispatch, probs, logits = out
    logits = logits.reshape(-1, logits.shape[-1])
    ids = torch.softmax(logits.float(), dim=-1).to(probs.dtype).argmax(dim=-1, keepdim=True)  # [T, 1]
    kept = dispatch.reshape(-1, dispatch.shape[-1]).sum(dim=-1, keepdim=True) > 0
    return logits, probs.reshape(-1, 1) * kept, ids


def _parse_dense_gates(out):
    """NLLB-MoE's top-2 router -> (logits, weights, ids): its two choices (first by probability, second by logit, as it
    picks them) and their combine weights (0 where dropped)."""
    _, gates, logits = out
    probs = torch.softmax(logits.float(), dim=-1).to(gates.dtype)
    first = probs.argmax(dim=-1)
    second = logits.masked_fill(F.one_hot(first, logits.shape[-1]).bool(), float("-inf")).argmax(dim=-1)
    ids = torch.stack([first, second], dim=-1)  # [T, 2]
    return logits, gates.gather(1, ids), ids


@dataclass
class MoEView:
    model: nn.Module
    adapter: Adapter
    layers: list[MoELayer]  # the MoE layers, in model order (an encoder's before its decoder's)
    dense_layers: list[int] = field(default_factory=list)  # decoder layers with a dense MLP
    text_config: object = None  # the config with the MoE keys: a wrapper's text config, else model.config
    decoder_layers: list[nn.Module] = field(default_factory=list)  # every layer, indexed like MoELayer.index

    @property
    def config(self):
        """The config holding the MoE keys (expert counts, top-k, hidden size): for a multimodal wrapper its
        language model's config (an attribute of model.config, so edits to it are saved with the wrapper)."""
        return self.text_config if self.text_config is not None else self.model.config

    @property
    def model_config(self):
        """The loaded model's own config (the wrapper's, for multimodal models)."""
        return self.model.config

    @property
    def seq2seq(self) -> bool:
        return self.adapter.seq2seq

    def forward(self, input_ids: torch.Tensor, *, head: bool = True, **kwargs):
        """Run the model on text: token ids [B, S]. head=False skips the LM head where the model allows (causal LMs,
        wrappers' base models). An encoder-decoder model reads the ids and is teacher-forced on them as its
        decoder input, shifted right by its decoder start token (moekit traces and calibrates it on plain text)."""
        from moekit.models.architecture import base_model, language_model

        if self.seq2seq:
            return self.model(input_ids=input_ids, decoder_input_ids=self.decoder_inputs(input_ids), **kwargs)
        return (language_model(self.model) if head else base_model(self.model))(input_ids=input_ids, **kwargs)

    def decoder_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder input an encoder-decoder model is teacher-forced with on input_ids [B, S]: the ids shifted right
        by one, the decoder start token first (transformers' shift_tokens_right / T5 _shift_right)."""
        config = self.model.config
        shifted = input_ids.new_full(input_ids.shape, config.pad_token_id)
        shifted[:, 1:] = input_ids[:, :-1]
        shifted[:, 0] = config.decoder_start_token_id
        return shifted

    def require(self, command: str, *, resize: bool = False, causal: bool = False, routing: bool = False) -> None:
        """One line naming why `command` does not apply to this model: resize (prune, merge) needs a changeable expert
        count; causal (run, serve, eval, merge, quantize) a causal LM; routing (calibrated re-routing) routing that is
        a function of the block input (MoELayer.predictable)."""
        from moekit.errors import UserError

        name = self.model_type
        if causal and self.seq2seq:
            raise UserError(f"`moekit {command}` works on causal LMs; {name} is an encoder-decoder model: info, trace, "
                            f"analyze, simulate and prune apply to it")
        if resize and self.adapter.fixed_count:
            raise UserError(f"`moekit {command}` changes the expert count, which {name} cannot: "
                            f"{self.adapter.fixed_count}")
        if routing and not all(m.predictable for m in self.layers):
            raise UserError(f"`moekit {command}` re-routes calibration inputs, but {name}'s routing is not a function "
                            f"of the MoE block input alone ({_unpredictable_reason(self.layers)})")

    @property
    def model_type(self) -> str:
        return self.adapter.model_type

    @property
    def num_layers(self) -> int:
        return len(self.layers) + len(self.dense_layers)

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts

    @property
    def top_k(self) -> int:
        return self.layers[0].rule.top_k

    def trace_layers(self) -> list[tuple[int, MoELayer, int, str]]:
        """(trace index, layer, pass, kind) of every MoE layer run of one forward, in the order a trace lists them:
        each layer's first pass at its own index, then the further passes of loop layers (Inkling2-Loop) after the
        last layer, pass by pass, as transformers numbers their caches."""
        runs = [(m.index, m, 0, m.kind) for m in self.layers]
        looped = [m for m in self.layers if m.passes > 1]
        if looped:
            first, span = min(m.index for m in looped), max(m.index for m in looped) + 1 - min(m.index for m in looped)
            for p in range(1, looped[0].passes):
                runs += [(self.num_layers + (p - 1) * span + m.index - first, m, p, f"{m.kind} pass {p + 1}")
                         for m in looped]
        return runs

    def layer(self, index: int) -> MoELayer:
        """The MoE layer at decoder-layer `index`."""
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise KeyError(f"decoder layer {index} is not an MoE layer; MoE layers: {[m.index for m in self.layers]}")

    def param_counts(self) -> dict[str, int]:
        """Total parameters, and those active for one token (every non-routed parameter plus K routed experts per MoE
        layer). Embeddings count in both; tied embeddings count once."""
        total = sum(p.numel() for p in self.model.parameters())
        routed = sum(sum(p.numel() for p in m.expert_params()) for m in self.layers)
        active_routed = sum(m.rule.top_k * m.expert_numel() for m in self.layers)
        return {"total": total, "active": total - routed + active_routed, "routed_experts": routed}

    def bytes_per_expert(self) -> int:
        layer = self.layers[0]
        return layer.expert_numel() * layer.expert_params()[0].element_size()
