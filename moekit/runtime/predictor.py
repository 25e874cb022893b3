"""A learned routing-path predictor (ExpertFlow, arXiv 2410.17954; Pre-gated MoE, arXiv 2308.12066): for each token at
MoE layer position l, from what the runtime holds when that layer routes (the experts' input x [H] and the layer's
routing, its weights scattered over the E experts), two small MLPs per layer predict

  routing heads, d = 1..lookahead: the experts of the d-th next MoE layer in execution order (layer l+d of this token;
      past the last layer, the next token's first layers: decode runs layer L-1 of token t, then layer 0 of t+1);
  reuse heads, h in horizons: whether each expert of layer l itself is used again within the next h tokens.

The reuse heads give the `predictive` cache policy (policies.py) its forecast: with horizons 1, 2, 4, ..., 2^m,
  forecast_e = sum_h P(e not used within h tokens) = E[min(ceil(log2 D_e), m + 1)],
D_e = tokens until expert e's next use at this layer: a predicted next use on a log scale, larger = farther, rounded to
float16 (traces store it so; the runtime rounds the same way, so both feed the policy the same numbers).

Each group is z = W2 gelu(W1 f + b1) + b2 on the features f = [x, routing weights]; the routing group adds a linear
path f -> its heads (it can represent pre-gating, the next router applied to x). Two groups, not one network with all
heads, because the runtime pays for what it uses: the forecast every step under `predictive`, the routing heads only
when it prefetches (benchmarks/prediction.py measures both against the layer's own compute).

Deviations from the papers, on purpose: ExpertFlow's predictor is a transformer over the whole prompt predicting every
layer at once, and Pre-gated MoE trains a pre-gate per layer jointly with the model; these are one hidden layer per MoE
layer, trained afterwards on routing traces (predictor_train.py), cheap enough for every layer of every decode step.

File (safetensors, written atomically), float32, input normalisation folded into the first layers:
  route.w1x [L, H, Wr + D*E], route.w1r [L, E, Wr + D*E]  first layer and linear path (hidden state / routing rows)
  route.b1 [L, Wr], route.w2 [L, Wr, D*E], route.b2 [L, D*E]
  reuse.w1x [L, H, Wu], reuse.w1r [L, E, Wu], reuse.b1 [L, Wu], reuse.w2 [L, Wu, R*E], reuse.b2 [L, R*E]
(D = lookahead, R = len(horizons)); metadata "format" = "moekit.predictor", "format_version", "spec" (JSON of
PredictorSpec: the model it is for and the heads) and "training" (JSON: data, held-out recall). Other format versions
are refused.
Dimension legend: T tokens, K selected, E experts, H hidden, L MoE layers, W width, D routing heads, R reuse heads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import erf, expit

from moekit.errors import UserError

FORMAT = "moekit.predictor"
FORMAT_VERSION = 1
HORIZONS = (1, 2, 4, 8, 16, 32)
GROUPS = ("route", "reuse")
TENSORS = ("w1x", "w1r", "b1", "w2", "b2")
_SQRT_HALF = 0.7071067811865476


@dataclass(frozen=True)
class PredictorSpec:
    """What a predictor is for (the model it was trained on) and its shape."""

    model_type: str
    config_hash: str  # model_hash(config) of the model it was trained on
    layers: tuple[int, ...]  # decoder indices of the MoE layers, in order
    num_experts: int
    top_k: int
    hidden_size: int
    width: int = 128  # hidden units of the routing heads
    reuse_width: int = 64  # hidden units of the reuse heads
    lookahead: int = 1  # routing heads: the next `lookahead` MoE layers in execution order
    horizons: tuple[int, ...] = HORIZONS  # reuse heads, in tokens

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "horizons", tuple(int(h) for h in self.horizons))
        if not self.layers:
            raise ValueError("a predictor needs at least one MoE layer")
        for name in ("num_experts", "top_k", "hidden_size", "width", "reuse_width", "lookahead"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.horizons or list(self.horizons) != sorted(set(self.horizons)) or self.horizons[0] < 1:
            raise ValueError(f"horizons must be increasing token counts >= 1, got {self.horizons}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def features(self) -> int:
        return self.hidden_size + self.num_experts

    def group(self, name: str) -> tuple[int, int, int]:
        """(hidden units, heads, linear-path heads) of head group `name`."""
        return (self.width, self.lookahead, self.lookahead) if name == "route" else \
            (self.reuse_width, len(self.horizons), 0)

    def target(self, position: int, d: int) -> tuple[int, int]:
        """(tokens ahead, layer position) of routing head d at layer position `position`."""
        return divmod(position + d, self.num_layers)

    def macs(self, name: str) -> int:
        """Multiply-adds per token and layer of head group `name` (the routing rows are top-k of E: a gather)."""
        W, heads, skip = self.group(name)
        return (self.hidden_size + self.top_k) * (W + skip * self.num_experts) + W * heads * self.num_experts


def shapes(spec: PredictorSpec) -> dict[str, tuple[int, ...]]:
    """File tensor name -> shape."""
    L, H, E = spec.num_layers, spec.hidden_size, spec.num_experts
    out = {}
    for g in GROUPS:
        W, heads, skip = spec.group(g)
        S = W + skip * E  # hidden units, then the linear path
        out.update({f"{g}.w1x": (L, H, S), f"{g}.w1r": (L, E, S), f"{g}.b1": (L, W), f"{g}.w2": (L, W, heads * E),
                    f"{g}.b2": (L, heads * E)})
    return out


class RoutingPredictor:
    """The predictor's weights (numpy float32: at one token per call numpy costs a third of torch's per-op overhead)
    and its uses: routing predictions, reuse logits, the cache forecast."""

    def __init__(self, spec: PredictorSpec, tensors: dict[str, np.ndarray] | None = None, training: dict | None = None):
        self.spec, self.training = spec, dict(training or {})
        self.path: Path | None = None  # the file it was read from
        self.tensors: dict[str, np.ndarray] = {}
        for name, shape in shapes(spec).items():
            t = np.zeros(shape, np.float32) if tensors is None else np.ascontiguousarray(tensors[name], np.float32)
            if t.shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {t.shape}")
            self.tensors[name] = t

    # inference ---------------------------------------------------------------------------------------------------------
    def logits(self, group: str, position: int, x, ids, weights) -> np.ndarray:
        """Head logits [T, heads, E] of `group` ("route" or "reuse") at layer position `position`, from the experts'
        inputs x [T, H] and the layer's routing ids / weights [T, K] (numpy or torch)."""
        t = {k: self.tensors[f"{group}.{k}"][position] for k in TENSORS}
        W, heads, skip = self.spec.group(group)
        E = self.spec.num_experts
        x, ids, weights = _np(x, np.float32), *routing_rows(_np(ids, np.int64), _np(weights, np.float32), E)
        a = x @ t["w1x"]  # [T, S]
        a += np.matmul(weights[:, None, :], t["w1r"][ids])[:, 0]  # the routing weights' rows: [T, 1, K] @ [T, K, S]
        h = a[:, :W] + t["b1"]  # [T, W]
        h = 0.5 * h * (1.0 + erf(h * _SQRT_HALF))  # GELU (exact, as torch.nn.GELU)
        z = h @ t["w2"] + t["b2"]  # [T, heads * E]
        if skip:
            z += a[:, W:]  # the linear path
        return z.reshape(x.shape[0], heads, E)

    def forecast(self, position: int, x, ids, weights) -> np.ndarray:
        """The cache forecast [T, E] float16 at layer position `position`: expected ceil(log2 tokens to each expert's
        next use) there (module docstring); the `predictive` policy evicts the largest."""
        z = self.logits("reuse", position, x, ids, weights)  # [T, R, E]
        return expit(-z).sum(1).astype(np.float16)  # sum_h P(not used within h)

    def predict(self, position: int, x, ids, weights, d: int = 1, k: int | None = None) -> np.ndarray:
        """The k (default top-k) most likely experts [T, k] of routing head d (PredictorSpec.target); ties: lowest id."""
        if not 1 <= d <= self.spec.lookahead:
            raise ValueError(f"routing head d must lie in 1..{self.spec.lookahead}, got {d}")
        z = self.logits("route", position, x, ids, weights)[:, d - 1]  # [T, E]
        return np.argsort(-z, axis=-1, kind="stable")[:, :k or self.spec.top_k]

    # checks against a model ------------------------------------------------------------------------------------------
    def check(self, view) -> None:
        """UserError unless this predictor was trained for the model of `view`."""
        s = self.spec
        if getattr(view, "seq2seq", False) or len(view.trace_layers()) != len(view.layers):
            raise UserError(f"{view.model_type}: the routing predictor covers decoder-only models whose MoE layers run "
                            f"once per token (no encoder stack, no loop layers)")
        have = (view.model_type, tuple(m.index for m in view.layers), view.num_experts, view.top_k,
                view.config.hidden_size)
        want = (s.model_type, s.layers, s.num_experts, s.top_k, s.hidden_size)
        if have != want:
            raise UserError(f"the predictor was trained for a {s.model_type} with MoE layers {list(s.layers)}, "
                            f"{s.num_experts} experts, top-{s.top_k}, hidden {s.hidden_size}; this model is a "
                            f"{have[0]} with {list(have[1])}, {have[2]}, top-{have[3]}, hidden {have[4]}: train one "
                            f"for it with `moekit predictor train TRACE --out P`")
        if model_hash(view.config) != s.config_hash:
            raise UserError("the predictor was trained on another model of the same shape (config hash differs): "
                            "train one for this model with `moekit predictor train TRACE --out P`")

    # file ------------------------------------------------------------------------------------------------------------
    def digest(self) -> str:
        """sha256 of the spec and the weights: names the predictor in a trace's manifest."""
        h = hashlib.sha256(json.dumps(asdict(self.spec), sort_keys=True).encode())
        for name in sorted(self.tensors):
            h.update(name.encode())
            h.update(self.tensors[name].tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """What a trace's manifest records about the predictor behind its forecasts."""
        return {"file": None if self.path is None else str(self.path), "sha256": self.digest(),
                "format_version": FORMAT_VERSION, "horizons": list(self.spec.horizons)}

    def save(self, path) -> Path:
        """Write atomically (moekit.files.atomic_file: a temporary file renamed into place; a full disk is one line)."""
        from safetensors.numpy import save_file

        from moekit.files import atomic_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "spec": json.dumps(asdict(self.spec)),
                "training": json.dumps(self.training)}
        with atomic_file(path) as tmp:
            save_file(self.tensors, str(tmp), metadata=meta)
        return path


def model_hash(config) -> str:
    """The model a predictor belongs to: its config's hash without the dtype (a predictor trained on bfloat16 traces
    serves the float32 run of the same model)."""
    from moekit.trace.record import config_hash

    return config_hash(config, ignore=("dtype", "torch_dtype"))


def load(path) -> RoutingPredictor:
    """Read a predictor file; UserError naming the problem and the fix for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no predictor at {path}: train one with `moekit predictor train TRACE --out {path}`")
    try:
        with safe_open(str(path), "numpy") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable predictor file ({str(err).splitlines()[0]}): train it again with "
                        f"`moekit predictor train TRACE --out {path}`") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is a safetensors file but not a moekit predictor: train one with "
                        f"`moekit predictor train TRACE --out P`")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise UserError(f"{path} has predictor format version {meta.get('format_version')!r}, this moekit reads "
                        f"version {FORMAT_VERSION}: train it again with this moekit")
    try:
        predictor = RoutingPredictor(PredictorSpec(**json.loads(meta["spec"])), tensors,
                                     json.loads(meta.get("training", "{}")))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} is a damaged predictor file ({str(err).splitlines()[0]}): train it again with "
                        f"`moekit predictor train TRACE --out {path}`") from None
    predictor.path = path
    return predictor


def routing_rows(ids: np.ndarray, weights: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """ids / weights [T, K] with slots naming no routed expert (ids >= E: a routing policy's dropped slots, identity
    experts) turned into weight 0 on expert 0: they add nothing to the features."""
    if ids.size and ids.max() >= num_experts:
        real = ids < num_experts
        ids, weights = np.where(real, ids, 0), np.where(real, weights, 0.0).astype(np.float32)
    return ids, weights


def _np(a, dtype) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu", torch.float32 if dtype == np.float32 else torch.int64).numpy()
    return np.asarray(a, dtype=dtype)
