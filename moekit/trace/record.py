"""`record`: run a model over data with router hooks and write the routing trace, chunk by chunk, resumably.

A chunk is a fixed number of consecutive sequences (chunk_tokens // seq_len), so chunk boundaries depend only on the
options and the data: a resumed run skips the sequences of the chunks the manifest lists and recomputes the rest in the
same batches, which gives the same trace as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moekit.errors import UserError
from moekit.files import check_out, disk_errors
from moekit.models.validate import check_routing, open_checkpoint
from moekit.trace import schema, store
from moekit.trace.capture import RouterCapture
from moekit.trace.data import Sequence, Source, encoder, resolve_data, sequences


@dataclass(frozen=True)
class TraceOptions:
    seq_len: int = 512
    batch_size: int = 8
    max_tokens: int | None = None
    skip_tokens: int = 0  # drop the first tokens (split equally across the data sources) before tracing
    chunk_tokens: int = 65536  # tokens per chunk file (rounded to whole sequences): bounds memory
    logits: bool = False  # also store the full router logits (float16)
    activation_stats: bool = False  # per layer x expert max |in| / |out| of the down projection

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.skip_tokens < 0:
            raise UserError(f"--skip-tokens must be >= 0, got {self.skip_tokens}")

    @property
    def chunk_sequences(self) -> int:
        return max(1, self.chunk_tokens // self.seq_len)


def record(
    model,
    data: list[str] | list[Source],
    out: Path,
    *,
    tokenizer=None,
    options: TraceOptions = TraceOptions(),
    resume: bool = False,
    dtype=None,
    on_tokens: Callable[[int], None] | None = None,
    routing=None,
    calib: list[str] | None = None,
    predictor=None,
    _stop_after_chunks: int | None = None,  # tests: simulate a run killed after N chunks
) -> dict:
    """Trace `model` (checkpoint folder, nn.Module or MoEView) over `data` into folder `out`; returns the manifest.
    Everything cheap is checked before the weights are read: the data files, --out, the checkpoint and its tokenizer.
    routing: a moekit.routing.Routing the model runs under; the trace records what it selected (manifest "routing":
    its spec, the widest K, the sentinel id of dropped slots); `calib` is its calibration data (skip=auto).
    predictor (a file or a moekit.runtime.predictor.RoutingPredictor) adds its cache forecasts (forecast_L{l})."""
    sources = data if data and isinstance(data[0], Source) else resolve_data(data)
    out = Path(out)
    _check_out(out, resume)
    if calib:
        resolve_data(calib)  # the routing's calibration data (skip=auto), before the weights too
    predictor = _predictor(predictor)
    if tokenizer is None and not isinstance(model, (str, Path)):
        raise ValueError("tracing an in-memory model needs tokenizer=...")
    if isinstance(model, (str, Path)):
        checked = open_checkpoint(model, tokenizer=tokenizer is None, dtype=dtype)
        check_routing(routing, checked.view)  # its layers and experts, before the weights
        if predictor is not None:
            predictor.check(checked.view)
        tokenizer = tokenizer or checked.tokenizer
    view, model_name = _view(model, dtype)
    if predictor is not None:
        predictor.check(view)
    encode = encoder(tokenizer)
    fresh = new_manifest(view, model_name, sources, options, predictor)
    if routing is not None:  # a moekit.routing.Routing (duck-typed: the trace stage does not import plans)
        routing.prepare(view, tokenizer, calib, per_prompt=False)
        fresh["routing"] = routing.trace_manifest(view)
        fresh["ids_dtype"] = schema.ids_dtype(fresh["routing"]["sentinel"] + 1).name
    manifest = _prepare(out, fresh, resume)
    if manifest["completed"]:
        return manifest
    stream = sequences(sources, encode, options.seq_len, options.max_tokens, options.skip_tokens)
    done = len(manifest["chunks"])
    stream = islice(stream, done * options.chunk_sequences, None)  # completed chunks: skip their sequences
    width = schema.ids_width(manifest)
    pa_schema = schema.token_schema(manifest["layers"], width, manifest["num_experts"], options.logits,
                                    id_dtype=np.dtype(manifest["ids_dtype"]), forecasts=predictor is not None)
    applied = routing.applied(view) if routing is not None else nullcontext()
    with applied, RouterCapture(view, logits=options.logits, activation_stats=options.activation_stats,
                                width=width, id_dtype=np.dtype(manifest["ids_dtype"]),
                                inputs=predictor is not None) as cap:
        for i, chunk in enumerate(_batched(stream, options.chunk_sequences), start=done):
            if _stop_after_chunks is not None and i - done >= _stop_after_chunks:
                return manifest
            arrays = _trace_chunk(view, cap, chunk, options, manifest["domain_names"], on_tokens, predictor)
            with _resumable(out):
                store.write_table_atomic(out / schema.chunk_name(i), store.chunk_table(arrays, pa_schema))
                _add_chunk(manifest, i, chunk)
                store.write_manifest(out, manifest)
    manifest["completed"] = True
    with _resumable(out):
        store.write_manifest(out, manifest)
    return manifest


@contextmanager
def _resumable(out: Path):
    """A failed write (a full disk) keeps the complete chunks: the message says how to continue."""
    try:
        yield
    except UserError as err:
        raise UserError(f"{err} (the complete chunks are kept: add --resume to continue the trace in {out})") from None


def new_manifest(view, model_name: str, sources: list[Source], options: TraceOptions, predictor=None) -> dict:
    import moekit

    return {
        "schema_version": schema.SCHEMA_VERSION,
        "kind": schema.KIND_TOKENS,
        "moekit_version": getattr(moekit, "__version__", "unknown"),
        "model": model_name,
        "model_type": view.model_type,
        "dtype": str(next(view.model.parameters()).dtype).removeprefix("torch."),  # what the routing was computed in
        "config_hash": config_hash(view.config),
        "data": [s.describe() for s in sources],
        "options": {**asdict(options), "chunk_sequences": options.chunk_sequences},
        "seq_len": options.seq_len,
        "layers": [index for index, *_ in view.trace_layers()],
        "layer_kinds": [kind for *_, kind in view.trace_layers()],  # added compatibly: traces without it are decoders
        "layer_of": [m.index for _, m, *_ in view.trace_layers()],  # added compatibly: a loop pass's decoder layer
        "hash_routed": [m.index for m in view.layers if m.rule.hashed],  # added compatibly: token-table layers
        "num_hidden_layers": view.num_layers,  # dense layers included (SGLang's placement map has a row for each)
        "top_k": view.top_k,
        "num_experts": view.num_experts,
        "ids_dtype": schema.ids_dtype(view.num_experts).name,
        "logits": options.logits,
        "activation_stats": options.activation_stats,
        "predictor": None if predictor is None else predictor.describe(),
        "domain_names": [],
        "tokens": 0,
        "sequences": 0,
        "chunks": [],
        "completed": False,
    }


# what must match for a resumed run to continue an earlier one
RESUME_KEYS = ("schema_version", "model_type", "config_hash", "data", "options", "layers", "top_k", "num_experts",
               "routing", "predictor")


def config_hash(config, ignore: tuple[str, ...] = ()) -> str:
    """sha256 of the model config, without bookkeeping keys that do not change the model (paths, versions, backends)
    and without the keys in `ignore`."""
    d = {k: v for k, v in config.to_dict().items()
         if not k.startswith("_") and k != "transformers_version" and k not in ignore}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _started(out: Path) -> bool:
    """Whether `out` holds more than the temporary files of a run killed before its first manifest landed."""
    return out.is_dir() and any(p not in store.temp_files(out) for p in out.iterdir())


def _check_out(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    if _started(out):
        if not resume:
            raise UserError(f"--out {out} is not empty: pass --resume to continue that trace, or choose another --out")
        from moekit.trace.reader import read_manifest

        read_manifest(out)  # a folder that is not a trace (or a damaged one) fails before the weights are read
    else:
        check_out(out, exist_ok=True)


def _prepare(out: Path, fresh: dict, resume: bool) -> dict:
    """Create `out`, or reopen it for --resume: discard partial files and check the run is the same run."""
    if _started(out):
        return _reopen(out, fresh)
    created = not out.exists()
    with disk_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    store.discard_temp_files(out)
    try:
        store.write_manifest(out, fresh)
    except UserError:  # a full disk before anything was traced: leave nothing behind
        if created:
            out.rmdir()
        raise
    return fresh


def _reopen(out: Path, fresh: dict) -> dict:
    from moekit.trace.reader import check_chunk, read_manifest

    old = read_manifest(out)
    defaults = asdict(TraceOptions())  # an option added since that trace was written ran at its default then
    old["options"] = {**{k: v for k, v in defaults.items() if k not in old.get("options", {})}, **old.get("options", {})}
    for key in RESUME_KEYS:
        if old.get(key) != fresh.get(key):
            raise UserError(f"cannot --resume {out}: its manifest's {key} differs from this run's (was "
                            f"{old.get(key)!r}); rerun with the same model, data and options, or choose another --out")
    store.discard_temp_files(out)
    _drop_damaged_chunks(out, old, check_chunk)
    listed = {c["file"] for c in old["chunks"]}
    for orphan in out.glob("chunk-*.parquet"):  # written but killed before the manifest listed it: redo it
        if orphan.name not in listed:
            orphan.unlink()
    return {**old, "model": fresh["model"]}


def _drop_damaged_chunks(out: Path, manifest: dict, check) -> None:
    """Forget the first missing or unreadable chunk and every chunk after it, so --resume rewrites them."""
    for k, c in enumerate(manifest["chunks"]):
        if not check(out / c["file"]):
            for later in manifest["chunks"][k:]:
                manifest["tokens"] -= later["tokens"]
                manifest["sequences"] -= later["sequences"]
            del manifest["chunks"][k:]
            manifest["completed"] = False
            return


def _trace_chunk(view, cap: RouterCapture, chunk: list[Sequence], options, domain_names, on_tokens,
                 predictor=None) -> store.ChunkArrays:
    meta, per_layer = [], {index: [] for index, *_ in view.trace_layers()}
    forecasts = {index: [] for index in per_layer}
    for start in range(0, len(chunk), options.batch_size):
        batch = chunk[start:start + options.batch_size]
        input_ids, keep = _pad(batch)  # [B, S], [B*S]
        # an encoder attends both ways: it is told where the padding is (a causal decoder never sees it)
        mask = {"attention_mask": keep.view(input_ids.shape).long()} if view.seq2seq else {}
        with torch.inference_mode():
            view.forward(input_ids, head=False, use_cache=False, **mask)
        inputs = cap.take_inputs(keep) if predictor is not None else None
        for pos, (index, arrays) in enumerate(cap.take(keep).items()):
            per_layer[index].append(arrays)
            if predictor is not None:  # the forecast the runtime would give the policy for these tokens
                with torch.inference_mode():
                    forecasts[index].append(predictor.forecast(pos, inputs[index], torch.from_numpy(
                        arrays[0].astype(np.int64)), torch.from_numpy(arrays[1])))
        meta.append(_token_meta(batch, domain_names))
        if on_tokens is not None:
            on_tokens(int(keep.sum()))
    cat = lambda xs: np.concatenate(xs) if xs[0] is not None else None  # noqa: E731
    layers = {i: [cat([a[j] for a in arrs]) for j in range(3)] for i, arrs in per_layer.items()}
    return store.ChunkArrays(
        seq_id=np.concatenate([m[0] for m in meta]),
        position=np.concatenate([m[1] for m in meta]),
        token_id=np.concatenate([m[2] for m in meta]),
        domain=np.concatenate([m[3] for m in meta]),
        domain_names=list(domain_names),
        ids={i: v[0] for i, v in layers.items()},
        weights={i: v[1] for i, v in layers.items()},
        logits={i: v[2] for i, v in layers.items() if v[2] is not None},
        forecasts={i: np.concatenate(f) for i, f in forecasts.items() if f},
        act_max=cap.pop_activation_maxima() if options.activation_stats else None,
    )


def _pad(batch: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence. Causal attention: real tokens never see the padding after them, and routing
    is per token, so padding changes nothing that is recorded; it is dropped by `keep`."""
    S = max(len(s.token_ids) for s in batch)
    ids = torch.zeros((len(batch), S), dtype=torch.long)  # [B, S]
    keep = torch.zeros((len(batch), S), dtype=torch.bool)
    for b, s in enumerate(batch):
        ids[b, : len(s.token_ids)] = torch.from_numpy(s.token_ids)
        keep[b, : len(s.token_ids)] = True
    return ids, keep.reshape(-1)  # [B*S] in the routers' (row-major) token order


def _token_meta(batch: list[Sequence], domain_names: list[str]):
    for s in batch:
        if s.domain not in domain_names:
            domain_names.append(s.domain)
    seq = np.concatenate([np.full(len(s.token_ids), s.seq_id, np.int64) for s in batch])
    pos = np.concatenate([np.arange(s.start, s.start + len(s.token_ids), dtype=np.int32) for s in batch])
    tok = np.concatenate([s.token_ids for s in batch]).astype(np.int32)
    dom = np.concatenate([np.full(len(s.token_ids), domain_names.index(s.domain), np.int32) for s in batch])
    return seq, pos, tok, dom


def _add_chunk(manifest: dict, i: int, chunk: list[Sequence]) -> None:
    tokens = sum(len(s.token_ids) for s in chunk)
    manifest["chunks"].append({"file": schema.chunk_name(i), "first_seq_id": chunk[0].seq_id,
                               "sequences": len(chunk), "tokens": tokens})
    manifest["tokens"] += tokens
    manifest["sequences"] += len(chunk)


def _batched(it: Iterator, n: int) -> Iterator[list]:
    while batch := list(islice(it, n)):
        yield batch


def _view(model, dtype):
    import moekit.models
    from moekit.models import MoEView

    if isinstance(model, MoEView):
        return model, type(model.model).__name__
    if isinstance(model, nn.Module):
        return moekit.models.load(model), type(model).__name__
    view = moekit.models.load(model, dtype=dtype)
    view.model.eval()
    return view, str(model)


def _predictor(predictor):
    """A RoutingPredictor from a path (read before the model, so a bad file fails fast), or as given."""
    if predictor is None or not isinstance(predictor, (str, Path)):
        return predictor
    from moekit.runtime.predictor import load

    return load(predictor)
