"""Expert pruning (methods, formulas, papers: docs/compression.md): keep N of the E routed experts of every MoE layer.

A method turns calibration statistics (MoE-block inputs X, outputs Z, and for EASY-EP the residual stream h) into a
`Plan`: per MoE layer the kept expert ids (ascending) and a score per expert (higher = more worth keeping).
`keep_experts` applies it; `prune_checkpoint` is the whole pipeline behind `moekit prune`.

Methods live in a registry (`register`): random, frequency, tcess (PreMoe), easy-ep (EASY-EP), naee (NAEE enumeration).

One deviation shared by all methods: when the router is group-limited (DeepSeek-V3 style, n_group > 1), each group keeps
N / n_group experts, ranked by the method's score within the group. A transformers config holds one group size, and
experts belong to groups by position, so an uneven keep would silently move kept experts into other groups and change
which experts the router may pick together; keeping groups balanced preserves the routing structure exactly.

Dimension legend: T calibration tokens, E experts, K selected per token, H hidden size, N kept experts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moekit.compress.calib import Calibration, collect
from moekit.errors import UserError, at_least
from moekit.registry import Registry
from moekit.models.view import MoELayer, MoEView
from moekit.ops.reference import expert_mlp
from moekit.ops.routing import route

SCHEMA_VERSION = 1
DEFAULT_MAX_TOKENS = 8192
POST_BLOCK_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")  # norms on the MoE output (OLMo2, AFMoE)


@dataclass(frozen=True)
class PruneOptions:
    seed: int = 0  # random
    tcess_r: float = 0.0  # tcess: minimum renormalised top-k probability for a selection to count
    tcess_signal: str = "logit"  # tcess: s = router logit (PreMoe's code) or "prob" (softmax probability)
    naee_max_subsets: int = 5000  # naee: enumerate exactly up to this many candidate sets, else greedy removal

    def __post_init__(self):
        if self.tcess_signal not in ("logit", "prob"):
            raise ValueError(f"tcess_signal must be 'logit' or 'prob', got {self.tcess_signal!r}")
        if self.naee_max_subsets < 1:
            raise ValueError(f"naee_max_subsets must be >= 1, got {self.naee_max_subsets}")


@dataclass
class Stats:
    """What the methods read: calibration X / Z per MoE layer, and the residual stream h (EASY-EP only)."""

    cal: Calibration
    h: dict[int, torch.Tensor] = field(default_factory=dict)  # decoder layer -> residual before the MoE block [T, H]
    sample_len: int | None = None  # calibration window length: NAEE sums its loss per window


@dataclass
class Plan:
    method: str
    keep: dict[int, list[int]]  # decoder layer -> kept expert ids, ascending
    scores: dict[int, list[float]]  # decoder layer -> [E] score per expert (higher = keep)
    search: str = "top-n"  # top-n | exact | greedy
    info: dict = field(default_factory=dict)

    def dropped(self, num_experts: int) -> dict[int, list[int]]:
        return {i: sorted(set(range(num_experts)) - set(ids)) for i, ids in self.keep.items()}


@dataclass(frozen=True)
class Method:
    name: str
    plan: Callable[[MoEView, Stats, int, PruneOptions, Callable | None], Plan]
    needs_residual: bool = False
    summary: str = ""


METHODS: Registry = Registry("pruning method")


def register(method: Method) -> Method:
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    return METHODS.lookup(name)


# ---------------------------------------------------------------- shared helpers


def select_top(scores: torch.Tensor, n: int, n_group: int = 1) -> list[int]:
    """Ids of the n best experts (ties: lower id first), n / n_group of them from each group of E / n_group
    consecutive experts (see the module docstring); ascending."""
    E = scores.numel()
    per, size = n // n_group, E // n_group
    kept = []
    for g in range(n_group):
        group = scores[g * size:(g + 1) * size].double()
        order = sorted(range(size), key=lambda i: (-group[i].item(), i))
        kept += [g * size + i for i in order[:per]]
    return sorted(kept)


def top_n_plan(name: str, view: MoEView, scores: Mapping[int, torch.Tensor], n: int) -> Plan:
    n_group = view.layers[0].rule.n_group
    return Plan(
        method=name,
        keep={i: select_top(s, n, n_group) for i, s in scores.items()},
        scores={i: [float(v) for v in s] for i, s in scores.items()},
    )


def routing(layer: MoELayer, x: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """(logits [T, E] float32, weights [T, K], ids [T, K]) as the layer routes MoE-block inputs x [T, H]: windows of
    seq_len tokens (capacity-limited routers count their capacity per window)."""
    logits = layer.router_logits(x.to(layer.router_linear.weight.dtype)).float()  # the router's dtype, as in the model
    sequences = x.shape[0] // seq_len if seq_len and layer.rule.drops_tokens else 1
    weights, ids = layer.route_logits(logits, sequences=sequences)
    return logits, weights, ids


def expert_weights(layer: MoELayer, e: int) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in layer.get_expert(e).items()}


def _per_layer(view: MoEView, fn: Callable[[MoELayer], torch.Tensor], tick) -> dict[int, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for layer in view.layers:
            out[layer.index] = fn(layer)
            if tick is not None:
                tick(1)
    return out


# ---------------------------------------------------------------- random, frequency


def plan_random(view: MoEView, stats: Stats, n: int, opts: PruneOptions, tick=None) -> Plan:
    """Uniformly random N experts per layer (seeded): the floor every method must beat."""
    gen = torch.Generator().manual_seed(opts.seed)
    scores = _per_layer(view, lambda layer: torch.rand(layer.num_experts, generator=gen), tick)
    return top_n_plan("random", view, scores, n)


def frequency_scores(layer: MoELayer, x: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    """[E] how often each expert is among a calibration token's selected K (frequency baseline, docs/compression.md)."""
    _, _, ids = routing(layer, x, seq_len)
    return torch.bincount(ids.reshape(-1), minlength=layer.num_experts).float()


def plan_frequency(view: MoEView, stats: Stats, n: int, opts: PruneOptions, tick=None) -> Plan:
    """Keep the N most frequently selected experts on the calibration text."""
    scores = _per_layer(view, lambda layer: frequency_scores(layer, stats.cal.x[layer.index], stats.sample_len), tick)
    return top_n_plan("frequency", view, scores, n)


# ---------------------------------------------------------------- PreMoe TCESS


def tcess_scores(signal: torch.Tensor, ids: torch.Tensor, r: float = 0.0) -> torch.Tensor:
    """PreMoe task-conditioned expected selection score (arXiv 2505.17639, github JarvisPei/PreMoe
    `collect_utils.collect_moe_gate_logits_r1`): m_{t,e} = s_{t,e} if e is among token t's selected experts and its
    renormalised top-k probability softmax(s_{t,K_t})_e >= r, else 0; score_e = mean_t m_{t,e}.

    signal s [T, E] (router logits in PreMoe's code), ids [T, K] the selected experts -> [E].
    """
    selected = signal.gather(1, ids)  # [T, K]
    keep = torch.softmax(selected, dim=-1) >= r  # [T, K] the paper's relative-magnitude filter
    m = torch.zeros_like(signal).scatter(1, ids, selected * keep)  # [T, E]
    return m.mean(dim=0)


def plan_tcess(view: MoEView, stats: Stats, n: int, opts: PruneOptions, tick=None) -> Plan:
    """PreMoe TCESS (arXiv 2505.17639). s is the router logit, as in PreMoe's released code (tcess_signal="prob" uses the
    softmax probability instead). Deviation: K_t is the layer's actual selection (its routing rule, group limits and
    correction bias included) where PreMoe's code takes a plain top-k of the logits; for softmax routers they agree."""

    def score(layer: MoELayer) -> torch.Tensor:
        logits, _, ids = routing(layer, stats.cal.x[layer.index], stats.sample_len)
        signal = logits if opts.tcess_signal == "logit" else torch.softmax(logits, dim=-1)
        return tcess_scores(signal, ids, opts.tcess_r)

    plan = top_n_plan("tcess", view, _per_layer(view, score, tick), n)
    plan.info = {"signal": opts.tcess_signal, "r": opts.tcess_r}
    return plan


# ---------------------------------------------------------------- EASY-EP


def easy_ep_scores(gates: torch.Tensor, ids: torch.Tensor, out_norms: torch.Tensor, h: torch.Tensor,
                   y: torch.Tensor, num_experts: int) -> torch.Tensor:
    """EASY-EP (arXiv 2504.06792, Eq. for Score_l(e)): sum_t sum_{e in K_t} g_{t,e} ||E_e(x_t)||_2
    max(1 - cos(h_t, h_t + y_t), 0).

    gates, ids, out_norms [T, K] (gate weight, expert id, ||E_e(x_t)||), h, y [T, H] (residual before the routed experts,
    routed output) -> [E].
    """
    change = (1 - torch.cosine_similarity(h.double(), (h + y).double(), dim=-1)).clamp(min=0)  # [T]
    contrib = gates.double() * out_norms.double() * change[:, None]  # [T, K]
    return torch.zeros(num_experts, dtype=torch.float64).index_add_(0, ids.reshape(-1), contrib.reshape(-1))


def routed_outputs(layer: MoELayer, x: torch.Tensor, weights: torch.Tensor,
                   ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(routed output y [T, H], ||E_e(x_t)|| [T, K] of each selection), float32, looping over experts like the
    reference MoE (moekit.ops.reference); experts working in a latent space see and give it (MoELayer.expert_input)."""
    x = _expert_input(layer, x)
    y, norms = torch.zeros_like(x), torch.zeros(ids.shape)
    for e in range(layer.num_experts):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        w, g = expert_weights(layer, e), weights[tok, slot, None].float()  # g [t, 1]
        out = expert_mlp(x[tok], w, layer.activation, layer.expert_norm)  # [t, H]
        norms[tok, slot] = out.norm(dim=-1)
        y.index_add_(0, tok, expert_mlp(x[tok] * g, w, layer.activation, layer.expert_norm)
                     if layer.rule.weight_on_input else out * g)
    return layer.expert_output(y.to(layer.expert_params()[0].dtype)).float(), norms


def _expert_input(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """What the routed experts compute on for block inputs x, float32 (a latent projection runs in the model
    dtype)."""
    return layer.expert_input(x.to(layer.expert_params()[0].dtype)).float() if layer.adapter.expert_in else x.float()


def plan_easy_ep(view: MoEView, stats: Stats, n: int, opts: PruneOptions, tick=None) -> Plan:
    """EASY-EP expert scores (arXiv 2504.06792, github RUCAIBox/EASYEP) from one calibration pass; keep the top N.
    g are the final gate weights (renormalised and scaled as the model uses them); shared experts are in neither y nor
    h's update (h is the residual entering the MoE block, see `collect_stats`)."""

    def score(layer: MoELayer) -> torch.Tensor:
        x = stats.cal.x[layer.index]
        _, weights, ids = routing(layer, x, stats.sample_len)
        y, norms = routed_outputs(layer, x, weights, ids)
        return easy_ep_scores(weights, ids, norms, stats.h[layer.index], y, layer.num_experts)

    return top_n_plan("easy-ep", view, _per_layer(view, score, tick), n)


# ---------------------------------------------------------------- NAEE enumeration


def count_kept_sets(num_experts: int, n: int, n_group: int = 1) -> int:
    """How many candidate kept sets there are (n / n_group from each group)."""
    return math.comb(num_experts // n_group, n // n_group) ** n_group


def kept_sets(num_experts: int, n: int, n_group: int = 1):
    """Every candidate kept set (ascending ids), n / n_group per group, generated lazily: check count_kept_sets first."""
    size, per = num_experts // n_group, n // n_group
    groups = [range(g * size, (g + 1) * size) for g in range(n_group)]
    for parts in itertools.product(*[itertools.combinations(group, per) for group in groups]):
        yield sorted(sum(parts, ()))


class NaeeLayer:
    """Reconstruction loss of one MoE layer with only a kept set of experts (arXiv 2402.14800, NAEE Eq. 3):
    loss(D) = sum over calibration windows of ||Z - Z_D||_F in float64, Z the original block output (the K-term weighted
    sum of expert outputs is formed in float32, the difference and norms in float64).

    Deviation (same effect, stated precisely): instead of setting the dropped experts' logits to -inf, the routing rule
    runs on the kept experts' logits (and correction bias) only, which is what the pruned model computes; for softmax
    routers the two are identical, for sigmoid routers with a selection bias -inf alone would still let a dropped
    expert be chosen through its bias.
    """

    def __init__(self, layer: MoELayer, x: torch.Tensor, z: torch.Tensor, sample_len: int | None):
        self.layer, self.rule = layer, layer.rule
        self.logits, _, _ = routing(layer, x, sample_len)  # [T, E (+ extra router rows)]
        bias = layer.correction_bias
        self.bias = None if bias is None else bias.float()
        self.sequences = x.shape[0] // sample_len if sample_len and layer.rule.drops_tokens else 1
        self.x = x.float()
        shared = layer.shared_forward(x.to(layer.router_linear.weight.dtype)).float()
        self.target = (z.float() - shared).double()  # [T, H] Z minus the shared experts: what the routed ones must give
        self.sample_len = sample_len or x.shape[0]
        # every expert on every token, once: a candidate set then costs a gather, not an expert pass
        self.outputs = None if layer.rule.weight_on_input else torch.stack(
            [expert_mlp(xe, expert_weights(layer, e), layer.activation, layer.expert_norm)
             for xe in [_expert_input(layer, x)] for e in range(layer.num_experts)]
        )  # [E, T, H]

    def loss(self, keep: list[int]) -> float:
        idx = torch.as_tensor(keep)
        E = self.layer.num_experts
        columns = torch.cat([idx, torch.arange(E, self.logits.shape[1])])  # extra rows (skip, shared, zero) stay
        bias = None if self.bias is None else self.bias[columns if self.bias.shape[0] > E else idx]
        weights, local = route(self.logits[:, columns], self.rule, bias, scale=self.layer.router_scale,
                               sequences=self.sequences)
        ids = columns[local]  # [T, K] global expert ids
        return self._distance(weights, ids)

    def loss_without(self, e: int) -> float:
        """The loss with expert e's logit at -inf and the full rule: the paper's own masking, used for the per-expert
        scores (a single drop would unbalance router groups)."""
        logits = self.logits.clone()
        logits[:, e] = float("-inf")
        weights, ids = route(logits, self.rule, self.bias, scale=self.layer.router_scale, sequences=self.sequences)
        return self._distance(weights, ids)

    def _distance(self, weights: torch.Tensor, ids: torch.Tensor) -> float:
        weights = torch.nan_to_num(weights)  # a softmax row of -inf only cannot happen (K <= kept), but sigmoid(-inf)=0
        if self.outputs is None:
            routed = routed_outputs(self.layer, self.x, weights, ids)[0].double()
        else:
            picked = self.outputs[ids, torch.arange(ids.shape[0])[:, None]]  # [T, K, H]
            routed = torch.bmm(weights.float()[:, None, :], picked).squeeze(1)  # [T, H]; a K-term sum
            routed = layer_output(self.layer, routed).double()
        diff = self.target - routed
        return sum(torch.linalg.norm(chunk).item() for chunk in torch.split(diff, self.sample_len))


def layer_output(layer: MoELayer, routed: torch.Tensor) -> torch.Tensor:
    """A routed sum from the experts' (latent) space into the block's hidden space, float32."""
    if not layer.adapter.expert_out:
        return routed
    return layer.expert_output(routed.to(layer.expert_params()[0].dtype)).float()


def naee_exact(loss: Callable[[list[int]], float], candidates) -> tuple[list[int], float]:
    best, best_loss = None, math.inf
    for keep in candidates:
        value = loss(keep)
        if value < best_loss:
            best, best_loss = keep, value
    return best, best_loss


def naee_greedy(loss: Callable[[list[int]], float], num_experts: int, n: int,
                n_group: int = 1) -> tuple[list[int], float]:
    """Greedy removal (the fallback when enumeration is infeasible, labelled so): drop, one at a time, the expert whose
    removal gives the smallest loss, never taking a group below n / n_group."""
    keep, size, per = list(range(num_experts)), num_experts // n_group, n // n_group
    best_loss = loss(keep)
    while len(keep) > n:
        removable = [e for e in keep if sum(k // size == e // size for k in keep) > per]
        trials = [(loss([k for k in keep if k != e]), e) for e in removable]
        best_loss, drop = min(trials)
        keep.remove(drop)
    return keep, best_loss


def plan_naee(view: MoEView, stats: Stats, n: int, opts: PruneOptions, tick=None) -> Plan:
    """NAEE expert pruning by enumeration (arXiv 2402.14800, github Lucky-Lance/Expert_Sparsity): per layer the kept set
    minimising the reconstruction loss (see NaeeLayer). Exact over every candidate set when there are at most
    opts.naee_max_subsets of them, otherwise greedy removal (search="greedy" in the plan and compression.json).
    Scores (reported only): minus the loss with that expert alone masked (higher = keep, as for the other methods)."""
    E, n_group = view.num_experts, view.layers[0].rule.n_group
    count = count_kept_sets(E, n, n_group)
    search = "exact" if count <= opts.naee_max_subsets else "greedy"
    keep, scores, losses = {}, {}, {}
    with torch.no_grad():
        for layer in view.layers:
            naee = NaeeLayer(layer, stats.cal.x[layer.index], stats.cal.z[layer.index], stats.sample_len)
            if search == "exact":
                keep[layer.index], losses[layer.index] = naee_exact(naee.loss, kept_sets(E, n, n_group))
            else:
                keep[layer.index], losses[layer.index] = naee_greedy(naee.loss, E, n, n_group)
            scores[layer.index] = [-naee.loss_without(e) for e in range(E)]
            if tick is not None:
                tick(1)
    return Plan("naee", keep, scores, search=search,
                info={"loss": losses, "max_subsets": opts.naee_max_subsets, "candidate_sets": count})


register(Method("random", plan_random, summary="seeded uniformly random experts"))
register(Method("frequency", plan_frequency, summary="the N most often selected on the calibration text"))
register(Method("tcess", plan_tcess, summary="PreMoe task-conditioned expected selection score, arXiv 2505.17639"))
register(Method("easy-ep", plan_easy_ep, needs_residual=True,
                summary="EASY-EP gate x output norm x residual change, arXiv 2504.06792"))
register(Method("naee", plan_naee, summary="NAEE reconstruction-loss enumeration (greedy when too many), arXiv 2402.14800"))


# ---------------------------------------------------------------- calibration


def check_residual_identity(view: MoEView) -> None:
    """EASY-EP's h is read as (decoder-layer output) - (MoE-block output): exact when the layer adds the block's output
    straight to the residual (every pre-norm family). Families that normalise the block output first are refused."""
    for layer in view.layers:
        decoder = view.decoder_layers[layer.index]
        norms = [name for name in POST_BLOCK_NORMS if hasattr(decoder, name)]
        if norms:
            raise UserError(f"easy-ep needs the residual stream before the MoE block; this {view.model_type} layer "
                            f"normalises the block output ({norms[0]}), so it cannot be recovered: use another method")


def collect_stats(view: MoEView, batches, max_tokens: int | None, residual: bool = False,
                  sample_len: int | None = None) -> Stats:
    """Calibration X / Z (moekit.compress.calib.collect), plus h = decoder-layer output - MoE-block output when
    `residual` (see check_residual_identity): the residual stream entering the MoE block, the input of the
    post-attention norm in pre-norm layers, shared experts not included."""
    if not residual:
        return Stats(collect(view, batches, max_tokens), sample_len=sample_len)
    check_residual_identity(view)
    outs: dict[int, list[torch.Tensor]] = {}
    decoders = view.decoder_layers
    handles = [decoders[m.index].register_forward_hook(_keep_output(m.index, outs)) for m in view.layers]
    try:
        cal = collect(view, batches, max_tokens)
    finally:
        for handle in handles:
            handle.remove()
    h = {i: torch.cat(parts)[:cal.tokens] - cal.z[i] for i, parts in outs.items()}
    return Stats(cal, h, sample_len=sample_len)


def _keep_output(index: int, outs: dict):
    def hook(module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        outs.setdefault(index, []).append(out.reshape(-1, out.shape[-1]).float().cpu())

    return hook


# ---------------------------------------------------------------- the command


def resolve_keep(spec: str | int | float, num_experts: int, top_k: int, n_group: int = 1) -> int:
    """--keep N (an integer) or FRACTION (0 < f < 1, e.g. 0.75) -> N, checked against the router."""
    text = str(spec).strip()
    try:
        n = int(text) if text.lstrip("+-").isdigit() else round(float(text) * num_experts)
        if "." in text and not 0 < float(text) <= 1:
            raise ValueError
    except ValueError:
        raise UserError(f"--keep {spec}: give a number of experts (e.g. 24) or a fraction in (0, 1] (e.g. 0.75)") from None
    if n < 1:
        raise UserError(f"--keep {spec}: keeps no expert; keep at least {top_k}")
    if n > num_experts:
        raise UserError(f"--keep {spec}: the model has only {num_experts} experts per layer")
    if n < top_k:
        raise UserError(f"--keep {spec}: the router selects top-{top_k}; keep at least {top_k}")
    if n % n_group:
        raise UserError(f"--keep {spec}: the router splits experts into {n_group} groups; keep a multiple of {n_group}")
    return n


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prune_view(view: MoEView, stats: Stats, n: int, method: str, opts: PruneOptions | None = None,
               tick=None) -> Plan:
    """Plan with the named method and apply it in place (keep_experts)."""
    from moekit.compress.edit import keep_experts

    plan = get_method(method).plan(view, stats, n, opts or PruneOptions(), tick)
    keep_experts(view, plan.keep)
    return plan


def report(plan: Plan, *, source, num_experts: int, n: int, calib: dict, opts: PruneOptions,
           bytes_before: int, bytes_after: int) -> dict:
    """compression.json for a pruned checkpoint (schema_version 1)."""
    dropped = plan.dropped(num_experts)
    label = f"{plan.method} ({plan.search})" if plan.method == "naee" else plan.method
    return {
        "schema_version": SCHEMA_VERSION, "kind": "prune", "method": plan.method, "method_label": label,
        "search": plan.search, "source": str(source), "experts_before": num_experts, "experts_after": n,
        "calibration": calib, "options": asdict(opts), "info": plan.info,
        "layers": {str(i): {"kept": plan.keep[i], "dropped": dropped[i], "scores": plan.scores[i]} for i in plan.keep},
        "bytes_before": bytes_before, "bytes_after": bytes_after,
    }


def prune_checkpoint(model_path: Path, keep: str, method: str, calib: list[str], out: Path, *,
                     max_tokens: int = DEFAULT_MAX_TOKENS, seq_len: int = 256, opts: PruneOptions | None = None,
                     progress_factory=None) -> dict:
    """`moekit prune`: check everything cheap first, calibrate, plan, edit, save atomically; returns the report."""
    import moekit.models
    from moekit.compress.checkpoint import save_checkpoint
    from moekit.compress.calibdata import calib_windows
    from moekit.compress.evaluate import batches
    from moekit.files import check_out
    from moekit.models.validate import open_checkpoint
    from moekit.trace.data import resolve_data

    spec, opts = get_method(method), opts or PruneOptions()
    check_out(out)
    at_least("--max-tokens", max_tokens)
    at_least("--seq-len", seq_len)
    sources = resolve_data(calib)
    checked = open_checkpoint(model_path, tokenizer=True)
    meta = checked.view
    meta.require("prune", resize=True, routing=method != "random")
    n = resolve_keep(keep, meta.num_experts, meta.top_k, meta.layers[0].rule.n_group)
    if spec.needs_residual:
        check_residual_identity(meta)  # structure only: the meta view tells
    windows = calib_windows(checked.tokenizer, sources, seq_len=seq_len, max_tokens=max_tokens)
    view = moekit.models.load(model_path)
    calib_batches = list(batches([w for ws in windows.values() for w in ws]))
    E, before = view.num_experts, model_bytes(view.model)
    with _progress(progress_factory, "calibrating", len(calib_batches)) as tick:
        stats = collect_stats(view, _ticking(calib_batches, tick), max_tokens, spec.needs_residual, seq_len)
    with _progress(progress_factory, f"scoring ({method})", len(view.layers)) as tick:
        plan = prune_view(view, stats, n, method, opts, tick)
    calib_info = {"data": calib, "tokens": stats.cal.tokens, "seq_len": seq_len,
                  "domains": {d: int(sum(len(w) for w in ws)) for d, ws in windows.items()}}
    rep = report(plan, source=model_path, num_experts=E, n=n, calib=calib_info, opts=opts, bytes_before=before,
                 bytes_after=model_bytes(view.model))
    save_checkpoint(view.model, Path(out), source=Path(model_path), report=rep)
    return rep


def _ticking(items, tick):
    for item in items:
        yield item
        tick(1)


class _progress:
    """progress_factory(description, total) is a context manager yielding tick(n); without one, ticks are dropped."""

    def __init__(self, factory, description: str, total: int):
        self.cm = factory(description, total) if factory is not None else None

    def __enter__(self):
        return self.cm.__enter__() if self.cm is not None else (lambda n: None)

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc) if self.cm is not None else False
