"""Training the routing-path predictor (predictor.py) from routing traces: `moekit predictor train TRACE... --out P`.

A trace holds every token's id and routing but not the hidden states, so training re-runs the model over the trace's
sequences (same windows, same batch size and padding as `moekit trace`) and captures each MoE layer's expert input;
the recomputed routing must match the trace's (else the trace came from another model or dtype: refused). Targets come
from the routing within each sequence: routing heads the experts d MoE layers ahead in execution order, reuse heads
whether each expert of the layer is used again within h tokens (a sequence's last tokens have no label for the horizons
that run past its end: masked, not counted as "not used").

Per layer: inputs normalised (mean / std over the training tokens, folded into the first layer afterwards), one hidden
layer (GELU), binary cross-entropy over all heads, AdamW with a one-cycle schedule, minibatches of 512. Every
`1 / validation`-th sequence is held out (spread over the trace's domains) and the recall of the heads is reported on it.
Dimension legend: N tokens, T tokens of a sequence, K selected, E experts, H hidden, L MoE layers, F features, O outputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from moekit.errors import UserError
from moekit.runtime.predictor import (GROUPS, HORIZONS, TENSORS, PredictorSpec, RoutingPredictor, model_hash,
                                      routing_rows)

# progress(description, total) -> a context manager yielding tick(n=1), as moekit.cli.progress_bar
Progress = Callable[[str, int], contextlib.AbstractContextManager]


def _no_progress(description: str, total: int):
    return contextlib.nullcontext(lambda n=1: None)


@dataclass(frozen=True)
class TrainOptions:
    width: int = 128
    reuse_width: int = 64
    lookahead: int = 1
    horizons: tuple[int, ...] = HORIZONS
    steps: int = 4000  # minibatches per layer (one-cycle schedule over them)
    lr: float = 3e-3
    batch: int = 512
    validation: float = 0.1  # fraction of sequences held out (every 1/validation-th); 0: none
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")
        if self.width < 1 or self.reuse_width < 1 or self.lookahead < 1:
            raise UserError(f"--width, --reuse-width and --lookahead must be >= 1, got {self.width}, "
                            f"{self.reuse_width}, {self.lookahead}")
        if not 0 <= self.validation < 1:
            raise UserError(f"--validation must lie in [0, 1), got {self.validation}")
        if self.lr <= 0 or self.batch < 1:
            raise UserError(f"lr must be > 0 and batch >= 1, got {self.lr}, {self.batch}")


@dataclass
class Collected:
    """Per MoE layer position: expert inputs x [N, H] (float16), routing ids / weights [N, K]; seq [N] sequence
    index of every token (tokens of a sequence contiguous, in order)."""

    x: list[np.ndarray]
    ids: list[np.ndarray]
    weights: list[np.ndarray]
    seq: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.seq.shape[0])


# traces --------------------------------------------------------------------------------------------------------------
@dataclass
class TraceText:
    """The token sequences of one or more traces and what is needed to recompute their features."""

    sequences: list[np.ndarray]  # [T] int32 each
    ids: list[list[np.ndarray]]  # per sequence, per MoE layer position: the trace's routing [T, K]
    model: str | None  # the checkpoint the (first) trace names
    batch_size: int
    dtype: str | None  # what its routing was computed in (traces record it since the predictor came)


def read_traces(folders, max_tokens: int | None = None) -> TraceText:
    """Sequences of token-level traces of one model, every s-th sequence when max_tokens caps them (spread over the
    traces' domains rather than their first ones)."""
    import moekit.trace
    from moekit.analysis._common import sequence_bounds

    traces = [moekit.trace.open(f) for f in folders]
    if not traces:
        raise UserError("no trace given: pass TRACE folders written by `moekit trace`")
    first = traces[0].manifest
    for t in traces:
        if t.kind != "tokens":
            raise UserError(f"{t.folder} is an aggregate trace (counts only): training needs per-token routing")
        for key in ("model_type", "layers", "num_experts", "top_k"):
            if t.manifest[key] != first[key]:
                raise UserError(f"{t.folder}: its {key} differs from {traces[0].folder}'s: train on traces of one model")
    seqs, ids = [], []
    for t in traces:
        tokens, layers = t.token_id.astype(np.int32), [t.ids(l).astype(np.int64) for l in t.layers]
        starts, lengths = sequence_bounds(t.seq_id, t.num_tokens)
        for a, n in zip(starts.tolist(), lengths.tolist()):
            seqs.append(tokens[a:a + n])
            ids.append([x[a:a + n] for x in layers])
    total = sum(len(s) for s in seqs)
    if max_tokens is not None and total > max_tokens:
        every = math.ceil(total / max_tokens)
        seqs, ids = seqs[::every], ids[::every]
    return TraceText(seqs, ids, first.get("model"), int(first.get("options", {}).get("batch_size", 8)),
                     first.get("dtype"))


def routing_agreement(data: Collected, text: TraceText) -> float:
    """Fraction of (token, layer) whose recomputed expert set equals the trace's."""
    same = total = 0
    for pos in range(len(data.ids)):
        mine = np.sort(data.ids[pos], axis=1)
        theirs = np.sort(np.concatenate([s[pos] for s in text.ids]), axis=1)
        same, total = same + int((mine == theirs).all(axis=1).sum()), total + mine.shape[0]
    return same / total if total else float("nan")


# features ------------------------------------------------------------------------------------------------------------
def collect(view, sequences: list[np.ndarray], batch_size: int = 8, progress: Progress = _no_progress) -> Collected:
    """Run the model over token sequences (each [T] int, right-padded in batches as `moekit trace` does) and capture
    each MoE layer's expert input and routing (by weight descending, as traces store it)."""
    from moekit.trace.capture import RouterCapture

    L = len(view.layers)
    xs, ids, ws = [[] for _ in range(L)], [[] for _ in range(L)], [[] for _ in range(L)]
    with RouterCapture(view, inputs=True) as cap, progress("computing features", len(sequences)) as tick:
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start:start + batch_size]
            S = max(len(s) for s in batch)
            inp = torch.zeros((len(batch), S), dtype=torch.long)  # [B, S]
            keep = torch.zeros((len(batch), S), dtype=torch.bool)
            for b, s in enumerate(batch):
                inp[b, :len(s)], keep[b, :len(s)] = torch.as_tensor(np.asarray(s, np.int64)), True
            with torch.inference_mode():
                view.forward(inp, head=False, use_cache=False)
            keep = keep.reshape(-1)
            inputs, routed = cap.take_inputs(keep), cap.take(keep)
            for pos, layer in enumerate(view.layers):
                xs[pos].append(inputs[layer.index].to(torch.float16).numpy())
                ids[pos].append(routed[layer.index][0].astype(np.int64))
                ws[pos].append(routed[layer.index][1])
            tick(len(batch))
    seq = np.concatenate([np.full(len(s), i, np.int64) for i, s in enumerate(sequences)])
    return Collected([np.concatenate(a) for a in xs], [np.concatenate(a) for a in ids],
                     [np.concatenate(a) for a in ws], seq)


def features(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, num_experts: int) -> torch.Tensor:
    """[N, F] float32: the expert input, then the routing weights scattered over the experts (as
    RoutingPredictor.logits builds them)."""
    f = np.zeros((x.shape[0], x.shape[1] + num_experts), np.float32)
    f[:, :x.shape[1]] = x
    ids, weights = routing_rows(ids, weights.astype(np.float32), num_experts)
    np.add.at(f[:, x.shape[1]:], (np.arange(len(ids))[:, None], ids), weights)  # add: a dropped slot adds 0
    return torch.from_numpy(f)


# targets -------------------------------------------------------------------------------------------------------------
def _onehot(ids: np.ndarray, E: int) -> np.ndarray:
    """[N, E] bool of the routed experts (ids >= E name none: dropped slots)."""
    out = np.zeros((ids.shape[0], E + 1), bool)  # [N, E + 1]: column E collects the slots that name no expert
    np.put_along_axis(out, np.minimum(ids, E), True, axis=1)
    return out[:, :E]


def targets(spec: PredictorSpec, ids: list[np.ndarray], seq: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, mask) [N, D + R, E] bool for layer position `position`: the routing heads, then the reuse heads. A label exists when its target token lies in
    the same sequence; a reuse label for horizon h also when the expert is used before the sequence ends."""
    E, N = spec.num_experts, seq.shape[0]
    hot = [_onehot(i, E) for i in ids]  # L x [N, E]
    index = np.arange(N)
    last = np.r_[np.nonzero(seq[1:] != seq[:-1])[0], N - 1]  # [S] last token of each sequence
    remaining = last[np.searchsorted(last, index)] - index  # [N] tokens left in the sequence after each token
    heads = spec.lookahead + len(spec.horizons)
    y, m = np.zeros((N, heads, E), bool), np.zeros((N, heads, E), bool)
    for d in range(1, spec.lookahead + 1):
        ahead, layer = spec.target(position, d)
        ok = remaining >= ahead  # [N]
        y[ok, d - 1] = hot[layer][index[ok] + ahead]
        m[ok, d - 1] = True
    used = np.zeros((N, E), bool)  # used within the next h tokens, built up as h grows
    for j, h in enumerate(spec.horizons):
        for step in range(spec.horizons[j - 1] + 1 if j else 1, h + 1):
            ok = remaining >= step
            used[ok] |= hot[position][index[ok] + step]
        head = spec.lookahead + j
        y[:, head] = used
        m[:, head] = used | (remaining >= h)[:, None]
    return y, m


# fitting -------------------------------------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    """The trained form of one head group of RoutingPredictor.logits (normalised inputs; folded in afterwards)."""

    def __init__(self, spec: PredictorSpec, group: str):
        super().__init__()
        width, heads, skip = spec.group(group)
        self.width, self.skip = width, skip * spec.num_experts
        self.first = torch.nn.Linear(spec.features, width + self.skip)
        self.second = torch.nn.Linear(width, heads * spec.num_experts)
        with torch.no_grad():
            self.first.weight[width:] = 0  # the linear path starts at zero
            self.first.bias[width:] = 0

    def forward(self, f):
        a = self.first(f)
        z = self.second(torch.nn.functional.gelu(a[:, :self.width]))
        return z + a[:, self.width:] if self.skip else z


def fit_layer(f: torch.Tensor, y: np.ndarray, m: np.ndarray, spec: PredictorSpec, group: str, options: TrainOptions,
              tick=lambda n=1: None) -> dict[str, np.ndarray]:
    """Head group `group` of one layer position on features f [N, F] and that group's labels / mask [N, heads, E];
    returns its weights with the normalisation folded in (RoutingPredictor's tensor names, one layer)."""
    torch.manual_seed(options.seed)
    mu, sd = f.mean(0), f.std(0) + 1e-4  # [F]
    fn = (f - mu) / sd
    y, m = torch.from_numpy(y.reshape(len(y), -1)), torch.from_numpy(m.reshape(len(m), -1))
    net = _Net(spec, group)
    opt = torch.optim.AdamW(net.parameters(), options.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, options.lr, total_steps=options.steps)
    perm, at = torch.randperm(len(fn)), 0
    for step in range(options.steps):
        if at + options.batch > len(fn):  # a new pass over the data, reshuffled
            perm, at = torch.randperm(len(fn)), 0
        b = perm[at:at + options.batch]
        at += options.batch
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(fn[b]), y[b].float(), reduction="none")
        loss = (loss * m[b]).sum() / m[b].sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 99:
            tick(100)
    tick(options.steps % 100)
    return fold(net, mu, sd, spec, group)


def fold(net: _Net, mu: torch.Tensor, sd: torch.Tensor, spec: PredictorSpec, group: str) -> dict[str, np.ndarray]:
    """RoutingPredictor weights of `group` computing net((f - mu) / sd) on raw features f: the normalisation goes into
    the first layer, the linear path's bias into the output bias."""
    with torch.no_grad():
        w1 = net.first.weight.T / sd[:, None]  # [F, S]
        b1 = net.first.bias - (mu / sd) @ net.first.weight.T  # [S]
        H, W = spec.hidden_size, net.width
        b2 = net.second.bias.clone()
        if net.skip:
            b2 += b1[W:]
        return {f"{group}.w1x": w1[:H].numpy(), f"{group}.w1r": w1[H:].numpy(), f"{group}.b1": b1[:W].numpy(),
                f"{group}.w2": net.second.weight.T.contiguous().numpy(), f"{group}.b2": b2.numpy()}


def pack(spec: PredictorSpec, fitted: list[dict[str, np.ndarray]], training: dict) -> RoutingPredictor:
    """One predictor from per-layer weights (each layer's dict holds both groups' tensors)."""
    if len(fitted) != spec.num_layers:
        raise ValueError(f"{len(fitted)} fitted layers for a spec of {spec.num_layers}")
    names = [f"{g}.{t}" for g in GROUPS for t in TENSORS]
    return RoutingPredictor(spec, {k: np.stack([f[k] for f in fitted]) for k in names}, training)


def train_spec(spec: PredictorSpec, data: Collected, held: np.ndarray, options: TrainOptions,
               progress: Progress = _no_progress) -> RoutingPredictor:
    """Both head groups of every layer position, fitted on the tokens where held [N] is false."""
    fitted, D = [], spec.lookahead
    with progress("training the predictor", 2 * spec.num_layers * options.steps) as tick:
        for pos in range(spec.num_layers):
            f = features(data.x[pos], data.ids[pos], data.weights[pos], spec.num_experts)[~held]
            y, m = (a[~held] for a in targets(spec, data.ids, data.seq, pos))
            fitted.append({**fit_layer(f, y[:, :D], m[:, :D], spec, "route", options, tick),
                           **fit_layer(f, y[:, D:], m[:, D:], spec, "reuse", options, tick)})
    return pack(spec, fitted, {})


def split(seq: np.ndarray, validation: float) -> np.ndarray:
    """[N] bool: the tokens of held-out sequences (every round(1 / validation)-th sequence, from the last of each
    block)."""
    if validation <= 0:
        return np.zeros(seq.shape[0], bool)
    every = max(2, round(1 / validation))
    return seq % every == every - 1


def train(view, data: Collected, options: TrainOptions = TrainOptions(), progress: Progress = _no_progress,
          training: dict | None = None) -> RoutingPredictor:
    """Fit a predictor for `view` on collected features; held-out recall goes into its `training` record."""
    spec = PredictorSpec(view.model_type, model_hash(view.config), tuple(m.index for m in view.layers), view.num_experts,
                         view.top_k, view.config.hidden_size, options.width, options.reuse_width, options.lookahead,
                         options.horizons)
    held = split(data.seq, options.validation)
    if held.all() or data.tokens < 2:
        raise UserError(f"{data.tokens} tokens in {int(data.seq.max(initial=-1)) + 1} sequences are too few to train "
                        f"a predictor: trace more text (thousands of tokens)")
    predictor = train_spec(spec, data, held, options, progress)
    report = evaluate(predictor, data, held) if held.any() else {}
    predictor.training = {**(training or {}), "tokens": data.tokens, "held_out_tokens": int(held.sum()),
                          "options": {k: getattr(options, k) for k in TrainOptions.__dataclass_fields__},
                          "held_out": report, "held_out_cache": cache_check(predictor, data, held) if held.any() else {}}
    return predictor


# evaluation ----------------------------------------------------------------------------------------------------------
def cache_check(predictor: RoutingPredictor, data: Collected, mask: np.ndarray, multiple: int = 2) -> dict:
    """Hit rates of `predictive` with this predictor's forecasts and of LFRU (its fallback) at `multiple` x top-k, on
    the tokens where mask [N] is true replayed as one stream per layer (the simulator's conventions). A predictor whose
    forecasts lose to LFRU here makes the cache worse than no predictor: `moekit predictor train` says so."""
    from moekit.runtime.simulate import replay_layer

    spec, cap = predictor.spec, min(multiple * predictor.spec.top_k, predictor.spec.num_experts)
    hits, lookups = {"predictive": 0, "lfru": 0}, 0
    for pos in range(spec.num_layers):
        ids, x, w = data.ids[pos][mask], data.x[pos][mask], data.weights[pos][mask]
        fc = predictor.forecast(pos, x, ids, w)  # [n, E]
        for name in hits:
            c = replay_layer(ids, name, cap, w, num_experts=spec.num_experts,
                             forecasts=fc if name == "predictive" else None)
            hits[name] += c.hits
        lookups += c.hits + c.misses
    return {"capacity": f"{multiple}x", **{name: h / lookups for name, h in hits.items()}}


def evaluate(predictor: RoutingPredictor, data: Collected, mask: np.ndarray | None = None) -> dict:
    """Recall at top-k (k = the model's top-k: a predicted set as large as the actual one) on the tokens where mask
    [N] is true (all by default): `next_layer` = routing head d = 1 from layer positions 0..L-2 (the next layer of the
    same token: what pre-gating predicts), `next_token_first_layer` = head d = 1 from the last layer, `next_token` =
    reuse horizon 1 (this layer, next token). Per layer position and overall."""
    spec = predictor.spec
    mask = np.ones(data.tokens, bool) if mask is None else mask
    L, D = spec.num_layers, spec.lookahead
    sums = np.zeros((2, L, 2))  # [(routing d=1, reuse h=1), L, (correct, actual)]
    for pos in range(L):
        y, m = (a[mask] for a in targets(spec, data.ids, data.seq, pos))
        inputs = data.x[pos][mask], data.ids[pos][mask], data.weights[pos][mask]
        for row, (group, head) in enumerate((("route", 0), ("reuse", D))):
            z = predictor.logits(group, pos, *inputs)[:, head - (D if group == "reuse" else 0)]  # [n, E]
            ok = m[:, head, 0]  # a label exists for the whole row (its target token is in the sequence)
            top = np.argsort(-z[ok], axis=-1, kind="stable")[:, :spec.top_k]  # [n, k]
            sums[row, pos] = np.take_along_axis(y[ok, head], top, axis=1).sum(), y[ok, head].sum()

    def rate(s):
        return float(s[0] / s[1]) if s[1] else float("nan")

    return {"next_layer": {"recall": rate(sums[0, :-1].sum(0)), "layers": [rate(s) for s in sums[0, :-1]]},
            "next_token_first_layer": {"recall": rate(sums[0, -1])},
            "next_token": {"recall": rate(sums[1].sum(0)), "layers": [rate(s) for s in sums[1]]}}
