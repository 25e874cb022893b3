"""Finding experts to steer: contrast two routing traces (A: the behaviour to promote, B: the rest) and rank
(layer, expert) pairs. Pure functions of trace arrays; `find` writes nothing (spec.write_steering does).

Methods (a score per (layer, expert); the top N over all chosen layers are kept, largest first):
- risk-diff (SteerMoE, arXiv 2509.09660; adobe-research/SteerMoE `calc_risk_diff`): P(e in top-k | A token) -
  P(e in top-k | B token), token-pooled. Default action force (SteerMoE forces its positive experts on).
- frequency (MoTE arXiv 2502.11096 fTRI; multilingual steering arXiv 2510.04694 Δ_k): the per-sequence share of tokens
  selecting e, averaged over each trace's sequences (every sequence weighs the same), A minus B. Default action steer,
  strength 0.5 (the multilingual paper's soft lambda).
- npmi (RICE, arXiv 2505.14681): nPMI(x, e) = log2[p(x, e) / (p(x) p(e))] / -log2 p(x, e) over the pooled tokens of
  both traces, x = "the token is A's" (or, with `tokens`, "is one of these token ids in A"); score = nPMI(x_A, e) -
  nPMI(x_B, e). Default action scale, strength 64 (RICE's quoted beta).
"""

from __future__ import annotations

import math

import numpy as np

from moekit.errors import UserError

METHODS = ("risk-diff", "frequency", "npmi")
DEFAULT_ACTION = {"risk-diff": ("force", 0.0), "frequency": ("steer", 0.5), "npmi": ("scale", 64.0)}


def selection_matrix(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, K] ids -> [T, E] bool, True where the token selected the expert (ids >= E: dropped slots)."""
    sel = np.zeros((ids.shape[0], num_experts + 1), bool)
    np.put_along_axis(sel, np.minimum(ids.astype(np.int64), num_experts), True, axis=1)
    return sel[:, :num_experts]


def risk_diff(sel_a: np.ndarray, sel_b: np.ndarray) -> np.ndarray:
    return sel_a.mean(0) - sel_b.mean(0)


def frequency(sel_a, seq_a, sel_b, seq_b) -> np.ndarray:
    return _per_sequence_mean(sel_a, seq_a) - _per_sequence_mean(sel_b, seq_b)


def _per_sequence_mean(sel: np.ndarray, seq: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(seq, return_inverse=True, return_counts=True)
    sums = np.zeros((counts.size, sel.shape[1]))
    np.add.at(sums, inverse, sel)
    return (sums / counts[:, None]).mean(0)


def npmi(x: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """nPMI between a token class x [T] bool and selecting each expert, sel [T, E] -> [E] in [-1, 1] (-1 where the two
    never co-occur)."""
    p_x, p_e = x.mean(), sel.mean(0)
    p_xe = (sel & x[:, None]).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log2(p_xe / (p_x * p_e))
        out = pmi / -np.log2(p_xe)
    out = np.where(p_xe > 0, out, -1.0)
    return np.where(p_xe == 1, 1.0, out)


def find(trace_a, trace_b, method: str = "risk-diff", layers: list[int] | None = None, top: int = 10,
         action: str | None = None, strength: float | None = None, tokens: list[int] | None = None) -> list[dict]:
    """Steering entries [{layer, expert, action, strength, score}] for the top `top` (layer, expert) pairs."""
    from moekit.routing.spec import ACTIONS

    if method not in METHODS:
        raise UserError(f"--method {method!r}: known methods {', '.join(METHODS)}")
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    default_action, default_strength = DEFAULT_ACTION[method]
    action = action or default_action
    if action not in ACTIONS:
        raise UserError(f"--action {action!r}: known actions {', '.join(ACTIONS)}")
    strength = default_strength if strength is None else strength
    if not math.isfinite(strength):  # else the file fails to read back, naming --steer, not this option
        raise UserError(f"--strength must be a finite number, got {strength}")
    if trace_a.num_experts != trace_b.num_experts or trace_a.layers != trace_b.layers:
        raise UserError("the two traces come from different models (MoE layers or expert counts differ)")
    chosen = steerable_layers(trace_a, layers)
    E = trace_a.num_experts
    scores = []
    for l in chosen:
        (sa, seq_a, tok_a), (sb, seq_b, tok_b) = (_selections(t, l) for t in (trace_a, trace_b))
        if method == "risk-diff":
            scores.append(risk_diff(sa, sb))
        elif method == "frequency":
            scores.append(frequency(sa, seq_a, sb, seq_b))
        else:
            in_a = np.concatenate([np.ones(len(sa), bool), np.zeros(len(sb), bool)])  # [T_a + T_b]
            x = in_a if tokens is None else in_a & np.isin(np.concatenate([tok_a, tok_b]), tokens)
            sel = np.concatenate([sa, sb])
            scores.append(npmi(x, sel) - npmi(~in_a, sel))
    flat = np.stack(scores)  # [L', E]
    if action == "force":  # at most K per layer can be forced (SteerMoE)
        flat = _cap_per_layer(flat, trace_a.top_k)
    order = np.argsort(-flat, axis=None, kind="stable")[:min(top, flat.size)]
    return [{"layer": int(chosen[i // E]), "expert": int(i % E), "action": action, "strength": float(strength),
             "score": float(flat.reshape(-1)[i])} for i in order if np.isfinite(flat.reshape(-1)[i])]


def steerable_layers(trace, layers: list[int] | None = None) -> list[int]:
    """The decoder layers a steering file may name for the traced model: its MoE layers (a loop layer once, however
    many passes it ran), without the hash-routed ones; `layers` restricts them. One-line UserError when the family takes
    no routing policy, or nothing is left."""
    from moekit.models.registry import supported, get

    model_type = trace.manifest.get("model_type")
    fixed = get(model_type).fixed_routing if model_type in supported() else ""
    if fixed:
        raise UserError(f"{trace.folder} is a trace of {model_type}, which takes no routing policy ({fixed}): a "
                        f"steering file for it could not be used")
    if trace.layer_of is None:
        raise UserError(f"{trace.folder} traces loop passes without naming their decoder layers (a trace recorded "
                        f"before moekit wrote `layer_of`): record it again")
    learned = [l for l in dict.fromkeys(trace.layer_of.values()) if l not in trace.hash_routed]
    chosen = learned if layers is None else [l for l in learned if l in set(layers)]
    if not chosen:
        hashed = f" ({sorted(trace.hash_routed)} are hash-routed: policies leave them alone)" if trace.hash_routed else ""
        raise UserError(f"--layers selects none of the traced MoE layers policies can steer, {learned}{hashed}")
    return chosen


def _selections(trace, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(selected [N, E] bool, seq_id [N], token_id [N]) of a decoder layer, every pass of a loop layer pooled (a
    token's pass counts as one more observation: the policies steer the layer on every pass)."""
    entries = [i for i in trace.layers if trace.layer_of[i] == layer]
    sel = np.concatenate([selection_matrix(trace.ids(i), trace.num_experts) for i in entries])
    return sel, np.tile(trace.seq_id, len(entries)), np.tile(trace.token_id, len(entries))


def _cap_per_layer(scores: np.ndarray, k: int) -> np.ndarray:
    out = np.full_like(scores, -np.inf)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.put_along_axis(out, best, np.take_along_axis(scores, best, axis=1), axis=1)
    return out
