"""All routing metrics of a trace in one call: arrays in, one JSON-serialisable `results` dict out (what
moekit.report.html renders and what a CLI prints or saves).

Layers are given as a list of dicts {"ids": [T, K], "weights": [T, K] (optional), "logits": [T, E] (optional)}, all over
the same tokens, with the token metadata shared by all layers (seq_id, position, token_id, domain [T]).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np

from moekit.analysis import _stack
from moekit.analysis._common import check_ids, check_tokens_vector, sequence_bounds
from moekit.analysis.cache import POLICIES, capacities_for, hit_rates_from_batch
from moekit.analysis.coactivation import affinity_concentration, affinity_counts, affinity_from_counts, coactivation
from moekit.analysis.load import summarise_layer
from moekit.analysis.locality import SEGMENT_LENGTHS, sch_from_batch, segment_routing_performance
from moekit.analysis.specialisation import domain_jsd, domain_nmi, domain_usage, token_expert_npmi
from moekit.analysis.super_experts import super_experts
from moekit.errors import UserError

SCHEMA = "moekit.analysis/1"

CONVENTIONS = {
    "frequency": "f_e = selections of e / all selections (T*K)",
    "lbl": "E * sum_i f_i P_i (arXiv 2501.11873); P from softmax(logits) when traced, else renormalised top-k weights "
           "(lbl_source); sequence = mean of per-sequence LBL, global = over all tokens",
    "max_vio": "(max load - mean load) / mean load (arXiv 2408.15664); sequence = mean over sequences",
    "token_entropy": "bits; over all E experts from logits, else over the renormalised top-k weights (entropy_source)",
    "affinity": "P(e_{l+1}=q | e_l=p) from all pairs of selections of one token in consecutive layers "
                "(arXiv 2401.08383); topk_mass = mean over p (weighted by p's selections) of the mass of the row's "
                "K largest entries",
    "domain_jsd": "Jensen-Shannon divergence in bits (square of scipy's distance), in [0, 1]",
    "domain_nmi": "I(domain; expert) / H(domain), every top-k selection one observation",
    "npmi": "RICE (arXiv 2505.14681); probabilities over top-k selections; tokens with fewer than min_count "
            "occurrences skipped",
    "srp": "arXiv 2505.16056; best F1 over tau in 0..m, one tau per layer; windows inside sequences",
    "sch": "arXiv 2505.16056 released-code conventions: per sequence, judged before the token, first C distinct "
           "experts count as hits, hits/(T*K) per sequence then mean; sequences shorter than m skipped",
    "cache": "LRU / LFU (perfect, ties by recency) / Belady MIN / opt with SCH's conventions (free fill counts as "
             "hits), so capacity >= E scores 1.0; the runtime simulator counts cold misses instead. opt (MIN with "
             "bypass, a token's experts requested together) is the offline ceiling under these conventions; plain "
             "MIN is not always above LFU and SCH here",
    "super_experts": "arXiv 2507.23279: first 75% of layers, output_max > 99.5th percentile and > max/10",
}


@contextmanager
def _timed(timings: dict | None, name: str):
    """Add this block's wall and CPU seconds to timings[name] = {"wall": ..., "cpu": ...} (when timings is given)."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    if timings is not None:
        entry = timings.setdefault(name, {"wall": 0.0, "cpu": 0.0})
        entry["wall"] += time.perf_counter() - wall
        entry["cpu"] += time.process_time() - cpu


def to_json(x):
    """numpy arrays / scalars / dataclass-free containers -> plain Python; NaN and inf become None (valid JSON)."""
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, np.ndarray):
        if x.dtype.kind == "f":
            obj = x.astype(object)
            obj[~np.isfinite(x)] = None
            return obj.tolist()
        return x.tolist()
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def analyze_arrays(layers: Sequence[dict], seq_id, n_experts: int, *, position=None, token_id=None, domain=None,
                   domain_names: Sequence[str] | None = None, output_max=None, layer_names: Sequence[str] | None = None,
                   segment_lengths=SEGMENT_LENGTHS, cache_multiples=(1, 2, 3, 4), npmi_top_n: int = 10,
                   npmi_min_count: int = 10, timings: dict | None = None) -> dict:
    """Run every metric of moekit.analysis and return the report's `results` dict (JSON-serialisable).

    Optional inputs switch parts on: token_id -> nPMI; domain (+ domain_names) -> per-domain usage, JSD, NMI;
    output_max [L, E] (max |down_proj output|) -> super experts. `timings`, if given, receives
    {metric: {"wall": s, "cpu": s}}.
    """
    if not layers:
        raise ValueError("need at least one layer")
    ids_l = [check_ids(layer["ids"], n_experts) for layer in layers]
    n_tok = ids_l[0].shape[0]
    if n_tok == 0:
        raise ValueError("the trace has no tokens")
    if any(ids.shape[0] != n_tok for ids in ids_l):
        raise ValueError("every layer must cover the same tokens (same T)")
    with _timed(timings, "validate"):
        starts, lengths = sequence_bounds(seq_id, n_tok)
        if position is not None:
            _check_positions(position, starts, lengths, n_tok)
    names = list(layer_names) if layer_names is not None else [str(i) for i in range(len(layers))]
    res = {"schema": SCHEMA, "n_tokens": n_tok, "n_layers": len(layers), "n_experts": n_experts,
           "n_sequences": int(starts.size), "layer_names": names, "conventions": CONVENTIONS}
    with _timed(timings, "load (LBL, MaxVio, entropy)"):
        res["layers"] = [_layer_row(ids, n_experts, seq_id, layer) for ids, layer in zip(ids_l, layers)]
    with _timed(timings, "coactivation"):
        res["coactivation"] = [coactivation(ids, n_experts) for ids in ids_l]
    with _timed(timings, "affinity"):
        res["affinity"] = [_affinity_entry(i, ids_l[i], ids_l[i + 1], n_experts) for i in range(len(ids_l) - 1)]
    if domain is not None:
        with _timed(timings, "specialisation (domains)"):
            res["domains"] = _domains(ids_l, domain, domain_names, n_experts)
    if token_id is not None:
        with _timed(timings, "npmi"):
            res["npmi"] = [_npmi_entry(ids, token_id, n_experts, npmi_top_n, npmi_min_count) for ids in ids_l]
    with _timed(timings, "srp"):
        srp = [segment_routing_performance(ids, seq_id, n_experts, segment_lengths) for ids in ids_l]
    res["locality"] = {"segment_lengths": srp[0].segment_lengths, "srp": np.stack([r.f1 for r in srp]),
                       "srp_tau": np.stack([r.tau for r in srp])}
    res["cache"] = {"multiples": list(cache_multiples), "policies": list(POLICIES)}
    _locality_and_cache(res, ids_l, starts, lengths, n_experts, segment_lengths, cache_multiples, timings)
    if output_max is not None:
        with _timed(timings, "super_experts"):
            res["super_experts"] = [vars(se) for se in super_experts(output_max)]
    return to_json(res)


def _check_positions(position, starts, lengths, n_tok) -> None:
    position = check_tokens_vector(position, n_tok, "position")
    step = np.diff(position)
    inner = np.ones(max(n_tok - 1, 0), dtype=bool)
    inner[starts[1:] - 1] = False  # pairs that straddle a sequence boundary
    if (step[inner] <= 0).any():
        raise ValueError("positions must increase within each sequence (tokens in position order)")


def _layer_row(ids, n_experts, seq_id, layer) -> dict:
    s = summarise_layer(ids, n_experts, seq_id, layer.get("weights"), layer.get("logits"))
    row = {k: v for k, v in vars(s).items() if k not in ("counts", "frequency", "soft_usage")}
    row.update(counts=s.counts, frequency=s.frequency, soft_usage=s.soft_usage, lbl_source=s.entropy_source)
    return row


def _affinity_entry(i, ids_a, ids_b, n_experts) -> dict:
    counts = affinity_counts(ids_a, ids_b, n_experts)
    conc = affinity_concentration(counts, ids_b.shape[1]) if counts.any() else None
    return {"from": i, "to": i + 1, "matrix": affinity_from_counts(counts),
            "topk_mass": conc.topk_mass if conc else None, "row_entropy_bits": conc.row_entropy_bits if conc else None,
            "k": ids_b.shape[1]}


def _domains(ids_l, domain, domain_names, n_experts) -> dict:
    domain = np.asarray(domain)
    n_dom = len(domain_names) if domain_names is not None else int(domain.max()) + 1 if domain.size else 1
    names = list(domain_names) if domain_names is not None else [str(d) for d in range(n_dom)]
    usage = [domain_usage(ids, domain, n_dom, n_experts) for ids in ids_l]
    return {"names": names, "tokens": np.bincount(domain, minlength=n_dom), "usage": usage,
            "jsd": [domain_jsd(u) for u in usage], "nmi": [domain_nmi(ids, domain, n_dom, n_experts) for ids in ids_l]}


def _npmi_entry(ids, token_id, n_experts, top_n, min_count) -> dict:
    r = token_expert_npmi(ids, token_id, n_experts, top_n=top_n, min_count=min_count)
    return {"token_ids": r.token_ids, "npmi": r.npmi, "counts": r.counts, "min_count": r.min_count}


def _locality_and_cache(res, ids_l, starts, lengths, n_experts, segment_lengths, cache_multiples, timings) -> None:
    """SCH and cache curves, with all layers of one top-k in one batch of the stack kernel."""
    n_layers, n_ms = len(ids_l), len(res["locality"]["segment_lengths"])
    sch = [None] * n_layers
    curves = {p: [None] * n_layers for p in POLICIES}
    caps_l = [None] * n_layers
    for top_k in sorted({ids.shape[1] for ids in ids_l}):
        members = [i for i, ids in enumerate(ids_l) if ids.shape[1] == top_k]
        caps = capacities_for(top_k, cache_multiples)
        with _timed(timings, "layout + reuse scan"):
            batch = _stack.make_batch([ids_l[i] for i in members], starts, lengths, n_experts)
            reuse = _stack.reuse(batch)
            _stack.window_uses(batch, reuse, res["locality"]["segment_lengths"])  # one scan for every m
        sch_k = np.empty((len(members), n_ms, caps.size))
        for j, m in enumerate(res["locality"]["segment_lengths"]):
            with _timed(timings, f"sch m={m}"):
                sch_k[:, j] = sch_from_batch(batch, caps, int(m), reuse)
        for policy in POLICIES:
            with _timed(timings, f"cache {policy}"):
                rates = hit_rates_from_batch(batch, caps, policy, reuse)
            for row, i in enumerate(members):
                curves[policy][i] = rates[row]
        for row, i in enumerate(members):
            sch[i], caps_l[i] = sch_k[row], caps
    res["locality"]["sch"] = sch  # [L][M][C]
    res["locality"]["capacities"] = caps_l  # [L][C]
    res["cache"]["capacities"] = caps_l
    res["cache"].update(curves)  # policy -> [L][C]


def check_analysable(trace) -> None:
    """Per-token analyses need a per-token trace with tokens: one line otherwise, before any data is read."""
    if trace.kind != "tokens" or trace.num_tokens == 0:
        raise UserError(f"{trace.folder}: per-token analyses need a per-token trace with tokens (this one is "
                        f"{trace.kind} with {trace.num_tokens} tokens): record one with `moekit trace`")
    if getattr(trace, "sentinel", None) is not None:
        raise UserError(f"{trace.folder} was traced under the routing policy {trace.manifest['routing']['spec']!r} "
                        f"(a variable number of experts per token): the analyses need a fixed top-k; trace without "
                        f"--routing to analyse it (`moekit simulate` replays policy traces)")


def analyze_trace(trace, *, tokenizer=None, timings: dict | None = None, **options) -> dict:
    """analyze_arrays over a recorded trace (`moekit.trace.open(...)`); with a tokenizer, the nPMI tables also carry
    the decoded token strings."""
    check_analysable(trace)
    logits = bool(trace.manifest.get("logits"))
    layers = [{"ids": trace.ids(l), "weights": trace.weights(l), **({"logits": trace.logits(l)} if logits else {})}
              for l in trace.layers]
    stats = trace.activation_stats
    res = analyze_arrays(
        layers, trace.seq_id, trace.num_experts, position=trace.position, token_id=trace.token_id,
        domain=trace.domain if trace.domain_names else None, domain_names=trace.domain_names or None,
        output_max=stats[1] if stats is not None else None, layer_names=[f"L{l}" for l in trace.layers],
        timings=timings, **options,
    )
    if tokenizer is not None:
        for layer in res.get("npmi", []):
            layer["tokens"] = [[tokenizer.decode([t]) if t >= 0 else None for t in toks] for toks in layer["token_ids"]]
    res["trace"] = {"folder": str(trace.folder), "model": trace.manifest.get("model"), "layers": trace.layers}
    return res
