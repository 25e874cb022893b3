"""What placement reads: per-layer expert loads and consecutive-layer transitions, from a moekit trace, an SGLang `stat`
dump (`logical_count`), or plain arrays; and the few model facts placement needs (groups, hidden size, layer count).

Dimension legend: T tokens, K selected, E experts, L MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.analysis import affinity_counts
from moekit.errors import UserError


@dataclass
class RoutingStats:
    """counts[l, e]: selections of expert e in MoE layer l (one per token and top-k slot, as the engines count).
    pairs[l, p, q]: token transitions from expert p in layer l to expert q in layer l + 1; a token contributes 1 per
    layer transition, spread evenly over its K x K' expert pairs (ExFlow's top-1 trace, arXiv 2401.08383, generalised to
    top-k), so pairs[l].sum() = T. None when the source has counts only (SGLang `stat`)."""

    counts: np.ndarray  # [L, E] float64
    layers: list[int]  # decoder-layer index of each MoE layer
    pairs: np.ndarray | None = None  # [L-1, E, E] float64
    top_k: int | None = None
    tokens: int | None = None
    num_hidden_layers: int | None = None  # every decoder layer, when the source says
    source: dict = field(default_factory=dict)
    parts: np.ndarray | None = None  # [S, L, E] counts of S disjoint halves of the tokens (balance that must hold on
    # each, not just on their sum: balanced-affinity's guard against fitting the cap to one sample)

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]


def stats_from_ids(ids: list[np.ndarray], num_experts: int, layers: list[int] | None = None,
                   first_half: np.ndarray | None = None, **kw) -> RoutingStats:
    """Per-layer selections ids[l] [T, K] of the same T tokens -> RoutingStats; `first_half` [T] bool splits the tokens
    into the two parts (default: the first and second T / 2 tokens)."""
    if not ids:
        raise ValueError("need at least one MoE layer")
    T = len(ids[0])
    half = np.arange(T) < T // 2 if first_half is None else np.asarray(first_half, bool)
    count = lambda a: np.bincount(np.asarray(a).reshape(-1), minlength=num_experts)  # noqa: E731
    counts = np.stack([count(a) for a in ids]).astype(np.float64)
    kw.setdefault("parts", np.stack([np.stack([count(a[m]) for a in ids]) for m in (half, ~half)]).astype(np.float64))
    pairs = np.stack([transition_pairs(a, b, num_experts) for a, b in zip(ids[:-1], ids[1:])]) if len(ids) > 1 \
        else np.zeros((0, num_experts, num_experts))
    return RoutingStats(counts, list(layers if layers is not None else range(len(ids))), pairs,
                        top_k=int(np.asarray(ids[0]).shape[1]), tokens=int(np.asarray(ids[0]).shape[0]), **kw)


def transition_pairs(ids_from: np.ndarray, ids_to: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] token transitions between two consecutive MoE layers (each token's K x K' pairs weigh 1 / (K K'))."""
    k = np.asarray(ids_from).shape[1] * np.asarray(ids_to).shape[1]
    return affinity_counts(ids_from, ids_to, num_experts) / k


def stats_from_trace(trace, tokens: np.ndarray | None = None, on_layer=None) -> RoutingStats:
    """A moekit trace (moekit.trace.Trace) -> RoutingStats, over all tokens or a boolean token mask [T]."""
    from moekit.trace import schema

    source = {"kind": "moekit trace", "path": str(trace.folder), "model": trace.manifest.get("model")}
    check_plannable(trace)
    nhl = trace.manifest.get("num_hidden_layers")
    if trace.kind == schema.KIND_COUNTS:
        if tokens is not None:
            raise UserError(f"{trace.folder} holds counts only: it cannot be split by token")
        return RoutingStats(trace.counts().astype(np.float64), list(trace.layers), None, trace.top_k,
                            trace.manifest.get("tokens"), nhl, source)
    ids = []
    for l in trace.layers:
        a = trace.ids(l)
        ids.append(a if tokens is None else a[tokens])
        if on_layer is not None:
            on_layer()
    if not len(ids[0]):
        raise UserError(f"{trace.folder} has no tokens to plan from: record a longer trace")
    seq, dom = trace.seq_id, trace.domain
    half = first_halves(seq if tokens is None else seq[tokens], dom if tokens is None else dom[tokens])
    return stats_from_ids(ids, trace.num_experts, trace.layers, half, num_hidden_layers=nhl, source=source)


def check_plannable(trace) -> None:
    """From its manifest: a trace placement can plan from (the model's own routing, some tokens, a decoder-only model
    without loop layers)."""
    from moekit.trace import schema

    if trace.manifest.get("routing"):  # traces recorded under a routing policy may hold dropped-slot sentinels
        raise UserError(f"{trace.folder} was recorded under a routing policy: plan placement from a trace of the "
                        f"model's own routing")
    if trace.kind == schema.KIND_TOKENS and trace.num_tokens == 0:
        raise UserError(f"{trace.folder} has no tokens to plan from: record a longer trace")
    kinds = set(trace.layer_kinds.values())  # layouts SGLang's and vLLM's expert-parallel maps cannot express
    model = trace.manifest.get("model_type")
    if "encoder" in kinds:
        raise UserError(f"{trace.folder} is a trace of an encoder-decoder model ({model}): SGLang and vLLM, whose "
                        f"expert-parallel placement moekit plans, serve decoder-only MoE models")
    if any(" pass " in k for k in kinds):
        raise UserError(f"{trace.folder} runs loop layers several times a forward ({model}): SGLang's and vLLM's "
                        f"placement maps have one row per decoder layer, and moekit does not fold a loop layer's "
                        f"passes into one")


def first_halves(seq_id: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """[T] bool: tokens in the first half of their domain's sequences (in sequence order)."""
    out = np.zeros(len(seq_id), bool)
    for d in np.unique(domain):
        seqs = np.unique(seq_id[domain == d])
        out |= np.isin(seq_id, seqs[: max(1, len(seqs) // 2)]) & (domain == d)
    return out


def stats_from_sglang(dump: Path) -> RoutingStats:
    """An SGLang `stat` dump: logical_count [num_hidden_layers, E] (dense layers are zero rows and are left out)."""
    from moekit.trace.sglang import read_logical_count

    counts = read_logical_count(dump)
    layers = np.flatnonzero(counts.sum(axis=1) > 0).tolist()
    if not layers:
        raise UserError(f"{dump} counts no expert selection in any layer: record some traffic before dumping")
    return RoutingStats(counts[layers].astype(np.float64), layers, None, None, None, int(counts.shape[0]),
                        {"kind": "sglang stat dump", "path": str(dump)})


@dataclass(frozen=True)
class ModelFacts:
    """What placement needs to know about the model, read from its config alone (meta device, no weights)."""

    path: str
    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    num_groups: int
    topk_group: int
    hidden_size: int
    expert_params: int  # parameters of one routed expert
    dtype_bytes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__, moe_layers=list(self.moe_layers))


def model_facts(path: Path) -> ModelFacts:
    import moekit.models

    view = moekit.models.load(Path(path), meta=True)
    layer = view.layers[0]
    return ModelFacts(str(path), int(getattr(view.config, "num_hidden_layers", None) or view.num_layers),
                      tuple(m.index for m in view.layers), view.num_experts, view.top_k, layer.rule.n_group,
                      layer.rule.topk_group, int(view.config.hidden_size), layer.expert_numel(),
                      layer.expert_params()[0].element_size())


def traced_model(source) -> Path | None:
    """The checkpoint folder a moekit trace (a Trace, or its RoutingStats) was recorded from, when it is still
    there."""
    model = source.source.get("model") if isinstance(source, RoutingStats) else source.manifest.get("model")
    if not isinstance(model, str):
        return None
    return Path(model) if model and (Path(model) / "config.json").is_file() else None
