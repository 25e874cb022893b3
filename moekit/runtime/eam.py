"""Expert prediction by activation-matrix matching (MoE-Infinity, Xue et al., arXiv 2401.14361, §4).

An Expert Activation Matrix (EAM) of a request is M [L, E], M[l, e] = tokens of the request routed to expert e at MoE
layer position l. The collection [N, L, E] holds the EAMs of past requests (one per trace sequence). While a request
runs, its partial EAM is matched to the collection by cosine similarity over the rows seen so far; the best match's row
of a later layer names the experts to prefetch (its largest counts).

Rows are normalised to sum 1 before the cosine (MoE-Infinity normalises the EAM per layer): a row becomes the layer's
expert distribution, so a layer that has seen one token more than another (decode, mid-step) or a long prefill does
not outweigh the other layers, and a short request compares with a long one.

Collection cap: greedy farthest-point sampling on cosine distance (see `cap_collection`), not MoE-Infinity's
clustering: deterministic, no random initialisation, and it keeps rare request types (a domain seen once) that a
"keep the most recent" rule would forget.

Layer positions 0..L-1 index the MoE layers (trace.layers order), not decoder layers.
Dimension legend: T tokens, K selected per token, E experts, L MoE layers, N stored EAMs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moekit.analysis._common import sequence_bounds


# EAMs -----------------------------------------------------------------------------------------------------------------
def eam_from_ids(ids_per_layer, num_experts: int) -> np.ndarray:
    """One request's EAM [L, E] int64 from its routing ids, one [T, K] array per MoE layer (arXiv 2401.14361, §4.1)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    rows = []
    for l, ids in enumerate(ids_per_layer):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"layer position {l}: ids must have shape [T, K], got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
            raise ValueError(f"layer position {l}: expert ids must lie in [0, {num_experts}), got {ids.min()}..{ids.max()}")
        rows.append(np.bincount(ids.ravel(), minlength=num_experts))  # [E]
    if not rows:
        raise ValueError("an EAM needs at least one MoE layer")
    return np.stack(rows).astype(np.int64)  # [L, E]


def normalise_rows(eam) -> np.ndarray:
    """Each row divided by its sum (float64, same shape); all-zero rows stay zero (a layer not seen yet)."""
    eam = np.asarray(eam, dtype=np.float64)
    total = eam.sum(axis=-1, keepdims=True)  # [..., L, 1]
    return np.divide(eam, total, out=np.zeros_like(eam), where=total > 0)


def sequence_ids(trace) -> list[list[np.ndarray]]:
    """Routing ids of a trace (folder or moekit.trace.Trace) split by sequence: [S][L] arrays [T_s, K] (int64)."""
    trace = _open(trace)
    layers = [trace.ids(l).astype(np.int64) for l in trace.layers]  # L x [T, K]
    starts, lengths = sequence_bounds(trace.seq_id, trace.num_tokens)  # [S], [S], as moekit.analysis splits them
    return [[ids[a:a + n] for ids in layers] for a, n in zip(starts.tolist(), lengths.tolist())]


def collection_from_sequences(seqs, num_experts: int, max_eams: int = 512) -> np.ndarray:
    """The EAM collection [N, L, E] int64 of sequences [S][L] -> [T_s, K], capped at max_eams (`cap_collection`)."""
    if not seqs:
        raise ValueError("an EAM collection needs at least one sequence")
    return cap_collection(np.stack([eam_from_ids(s, num_experts) for s in seqs]), max_eams)


def collection_from_trace(trace, max_eams: int = 512, sequences=None) -> np.ndarray:
    """One EAM per sequence of a trace (folder or Trace), capped at max_eams: [N, L, E] int64. `sequences` optionally
    selects sequence indices (e.g. a training split; the rest can be held out for `replay`)."""
    trace = _open(trace)
    seqs = sequence_ids(trace)
    if sequences is not None:
        seqs = [seqs[i] for i in np.arange(len(seqs))[sequences].tolist()]
    return collection_from_sequences(seqs, trace.num_experts, max_eams)


def cap_collection(eams, max_eams: int) -> np.ndarray:
    """At most max_eams of eams [N, L, E], in their original order, by greedy farthest-point sampling.

    Start from the first EAM; repeatedly add the one whose cosine distance (row-normalised, as `match` compares) to its
    nearest kept EAM is largest (ties: lowest index). Stops early when every remaining EAM is a direction already kept
    (distance 0): duplicates add nothing to matching. The kept set covers the space of requests, as MoE-Infinity's
    clustering aims to, without its random initialisation. Cost O(N * max_eams * L * E).
    """
    eams = np.asarray(eams)
    if max_eams < 1:
        raise ValueError(f"max_eams must be >= 1, got {max_eams}")
    if eams.ndim != 3 or eams.shape[0] == 0:
        raise ValueError(f"EAMs must have shape [N, L, E] with N >= 1, got {eams.shape}")
    if eams.shape[0] <= max_eams:
        return eams
    unit = _unit(normalise_rows(eams).reshape(eams.shape[0], -1))  # [N, L*E]
    kept = [0]
    nearest = 1.0 - unit @ unit[0]  # [N] distance to the nearest kept EAM
    while len(kept) < max_eams:
        i = int(np.argmax(nearest))
        if nearest[i] <= 1e-12:  # the rest duplicate kept directions (up to rounding)
            break
        kept.append(i)
        nearest = np.minimum(nearest, 1.0 - unit @ unit[i])
    return eams[np.sort(kept)]


# matching and prediction ---------------------------------------------------------------------------------------------
def match(collection, partial, upto: int) -> int:
    """Index of the stored EAM most cosine-similar to `partial` [L, E] over rows 0..upto inclusive, both
    row-normalised (arXiv 2401.14361, §4.2). Ties: lowest index. ValueError when those rows of partial are all zero."""
    collection, partial = _check(collection, partial)
    _check_upto(upto, collection.shape[1])
    normed = normalise_rows(collection)  # [N, L, E]
    return _best(normed, _cumulative_sq_norms(normed), normalise_rows(partial), upto)


def predict_layer(collection, partial, upto: int, layer: int, k: int) -> np.ndarray:
    """At most k experts for MoE layer position `layer`: the largest counts of the matched EAM's row `layer` (ties: lowest
    id; experts that row never used are not predicted). With nothing observed yet (upto < 0 or rows 0..upto all zero:
    the first layer of a fresh request) the row is the collection's mean normalised row instead."""
    collection, partial = _check(collection, partial)
    normed = normalise_rows(collection)  # [N, L, E]
    return _predict(normed, _cumulative_sq_norms(normed), normalise_rows(partial), upto, layer, k)


def _predict(normed, sq_norms, partial_normed, upto, layer, k) -> np.ndarray:
    n_layers = normed.shape[1]
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer position {layer} is outside 0..{n_layers - 1}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    upto = min(upto, n_layers - 1)
    if upto < 0 or not partial_normed[:upto + 1].any():
        row = normed[:, layer].mean(axis=0)  # [E]
    else:
        row = normed[_best(normed, sq_norms, partial_normed, upto), layer]  # [E]
    top = np.argsort(-row, kind="stable")[:k]  # stable: equal counts keep ascending expert ids
    return top[row[top] > 0]


def _best(normed, sq_norms, partial_normed, upto) -> int:
    """argmax over stored EAMs of cosine(rows 0..upto); normed [N, L, E], sq_norms [N, L] cumulative."""
    p = partial_normed[:upto + 1]  # [u, E]
    p_norm = float(np.sqrt((p * p).sum()))
    if p_norm == 0.0:
        raise ValueError(f"the partial EAM's rows 0..{upto} are all zero: nothing to match")
    dots = np.einsum("nue,ue->n", normed[:, :upto + 1], p)  # [N]
    norms = np.sqrt(sq_norms[:, upto]) * p_norm  # [N]
    sims = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)  # a stored EAM with empty rows: 0
    return int(np.argmax(sims))  # first maximum: lowest index


def _cumulative_sq_norms(normed) -> np.ndarray:
    """[N, L]: squared norm of rows 0..l of each stored EAM, so a match over rows 0..upto needs no recomputation."""
    return np.cumsum((normed * normed).sum(axis=2), axis=1)


# the running predictor -----------------------------------------------------------------------------------------------
class ActivationMatrixPredictor:
    """MoE-Infinity's activation-aware prefetch prediction for one request at a time, with precision/recall counters
    (the same |predicted|, |actual|, |predicted & actual| sums as the engine's pre-gating LayerStats).

    Per step (a forward of all MoE layers, one token in decode): for each layer position l, `predict(l)` before it
    runs, `observe(l, ids)` after it routes, `score(l, ids)` to count the prediction against what was selected.
    The running EAM accumulates every token of the request; a prediction matches it over rows 0..highest layer
    observed so far, which is rows < l during the first step and all rows once a step has completed (decode).
    """

    def __init__(self, collection, top_k_predict: int):
        collection = np.asarray(collection)
        if collection.ndim != 3 or collection.shape[0] == 0:
            raise ValueError(f"the EAM collection must have shape [N, L, E] with N >= 1, got {collection.shape}")
        if top_k_predict < 1:
            raise ValueError(f"top_k_predict must be >= 1, got {top_k_predict}")
        self.normed = normalise_rows(collection)  # [N, L, E], once: the hot path only matches
        self.sq_norms = _cumulative_sq_norms(self.normed)  # [N, L]
        self.num_layers, self.num_experts = collection.shape[1:]
        self.k = int(top_k_predict)
        self.predicted = self.actual = self.correct = 0
        self.reset()

    def reset(self) -> None:
        """A new request: empty running EAM; counters are kept (they sum over requests)."""
        self.eam = np.zeros((self.num_layers, self.num_experts), np.int64)  # [L, E]
        self.seen = -1  # highest layer position observed in this request
        self.pending: dict[int, set[int]] = {}  # layer position -> prediction not scored yet

    def observe(self, layer_pos: int, ids) -> None:
        """Add the experts selected at layer position `layer_pos`, ids [T, K], to the running EAM."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"expert ids must lie in [0, {self.num_experts}), got {ids.min()}..{ids.max()}")
        self.eam[layer_pos] += np.bincount(ids, minlength=self.num_experts)
        self.seen = max(self.seen, layer_pos)

    def predict(self, layer_pos: int) -> set[int]:
        """Experts predicted for layer position `layer_pos` (at most top_k_predict); remembered for `score`."""
        pred = _predict(self.normed, self.sq_norms, normalise_rows(self.eam), self.seen, layer_pos, self.k)
        self.pending[layer_pos] = out = set(pred.tolist())
        return out

    def score(self, layer_pos: int, actual_ids) -> None:
        """Count the pending prediction for `layer_pos` against the experts selected there, ids [T, K]; a layer with
        no pending prediction counts nothing (as the engine's layers without a prefetch)."""
        pred = self.pending.pop(layer_pos, None)
        if pred is None:
            return
        actual = set(np.unique(np.asarray(actual_ids)).tolist())
        self.predicted += len(pred)
        self.actual += len(actual)
        self.correct += len(pred & actual)

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else float("nan")

    @property
    def recall(self) -> float:
        return self.correct / self.actual if self.actual else float("nan")

    def counters(self) -> dict[str, int]:
        return {"predicted": self.predicted, "actual": self.actual, "correct": self.correct}


# offline evaluation ---------------------------------------------------------------------------------------------------
def replay(collection, ids_per_layer_per_sequence, k: int) -> dict:
    """Precision/recall of next-layer prediction on held-out sequences [S][L] -> ids [T_s, K], decode-like: token by
    token, layer position l >= 1 is predicted from the running EAM after observing layer l-1 (the same targets as
    pre-gating, which has no prediction for the first MoE layer). Per-layer values under "layers" (position 1..L-1).
    """
    pred = ActivationMatrixPredictor(collection, k)
    per_layer = np.zeros((pred.num_layers, 3), np.int64)  # [L, (predicted, actual, correct)]
    tokens = 0
    for seq in ids_per_layer_per_sequence:
        if len(seq) != pred.num_layers:
            raise ValueError(f"a sequence has {len(seq)} layers, the collection {pred.num_layers}")
        pred.reset()
        for t in range(len(seq[0])):
            for l, ids in enumerate(seq):
                row = ids[t:t + 1]  # [1, K]
                if l > 0:
                    before = _totals(pred)
                    pred.predict(l)
                    pred.score(l, row)
                    per_layer[l] += _totals(pred) - before
                pred.observe(l, row)
            tokens += 1
    layers = [{"layer": l, **_rates(*per_layer[l].tolist())} for l in range(1, pred.num_layers)]
    return {**_rates(pred.predicted, pred.actual, pred.correct), "sequences": len(ids_per_layer_per_sequence),
            "tokens": tokens, "eams": int(pred.normed.shape[0]), "k": k, "layers": layers}


def _totals(pred: ActivationMatrixPredictor) -> np.ndarray:
    return np.array([pred.predicted, pred.actual, pred.correct])


def _rates(predicted: int, actual: int, correct: int) -> dict:
    return {"precision": correct / predicted if predicted else float("nan"),
            "recall": correct / actual if actual else float("nan"),
            "predicted": predicted, "actual": actual, "correct": correct}


# helpers ---------------------------------------------------------------------------------------------------------------
def _open(trace):
    if isinstance(trace, (str, Path)):
        import moekit.trace  # torch comes with the recorder: only pay for it when reading a folder

        return moekit.trace.open(trace)
    return trace


def _unit(x) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _check(collection, partial) -> tuple[np.ndarray, np.ndarray]:
    collection, partial = np.asarray(collection), np.asarray(partial)
    if collection.ndim != 3 or collection.shape[0] == 0:
        raise ValueError(f"the EAM collection must have shape [N, L, E] with N >= 1, got {collection.shape}")
    if partial.shape != collection.shape[1:]:
        raise ValueError(f"the partial EAM must have shape {collection.shape[1:]} [L, E], got {partial.shape}")
    return collection, partial


def _check_upto(upto: int, n_layers: int) -> None:
    if not 0 <= upto < n_layers:
        raise ValueError(f"upto must lie in 0..{n_layers - 1}, got {upto}")
