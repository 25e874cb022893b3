"""Reading traces: `open(folder)` -> Trace, with lazy per-layer numpy arrays (the contract of moekit/analysis/).

Arrays span every completed chunk in sequence order. Dimension legend: T tokens, K selected, E experts, L MoE layers.
Damaged or foreign files raise UserError naming the file and the fix (the CLI prints one line and exits 2).
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moekit.errors import UserError, describe
from moekit.trace import schema


def open(folder) -> Trace:  # noqa: A001  (moekit.trace.open mirrors the builtin on purpose)
    return Trace(Path(folder))


def read_manifest(folder: Path) -> dict:
    path = folder / schema.MANIFEST
    if not folder.is_dir():
        raise UserError(f"no trace at {folder}: record one with `moekit trace MODEL --data ... --out {folder}`")
    if not path.is_file():
        raise UserError(f"{path} is missing: not a moekit trace folder (or its run never started); record it again "
                        f"with `moekit trace ... --out {folder}`")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupted ({err}); record the trace again into a new --out") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if type(version) is not int or version != schema.SCHEMA_VERSION:  # True == 1 in Python
        raise UserError(f"{path} has trace schema version {version!r}, this moekit reads version "
                        f"{schema.SCHEMA_VERSION}: record the trace again with this moekit")
    problem = manifest_problem(manifest)
    if problem:
        raise UserError(f"{path} is damaged ({problem}); record the trace again into a new --out")
    return manifest


def _int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def manifest_problem(m: dict) -> str | None:
    """What is wrong with a parsed manifest (the fields readers rely on), or None."""
    kind, layers, chunks = m.get("kind"), m.get("layers"), m.get("chunks")
    if kind not in (schema.KIND_TOKENS, schema.KIND_COUNTS):
        return f"kind {kind!r} is neither {schema.KIND_TOKENS!r} nor {schema.KIND_COUNTS!r}"
    if not isinstance(layers, list) or not all(_int(l) for l in layers) or layers != sorted(set(layers)):
        return "layers is not an ascending list of layer indices"
    if not _int(m.get("num_experts"), 1) or m["num_experts"] > np.iinfo(np.uint16).max + 1:
        return f"num_experts {m.get('num_experts')!r} is not a positive expert count"
    top_k = m.get("top_k")
    if not ((top_k is None and kind == schema.KIND_COUNTS) or (_int(top_k, 1) and top_k <= m["num_experts"])):
        return f"top_k {top_k!r} is not between 1 and num_experts"
    problem = _routing_problem(m) or _layer_kinds_problem(m)
    if problem:
        return problem
    if not isinstance(chunks, list) or not all(_chunk_entry(c) for c in chunks):
        return "chunks is not a list of {file: chunk-NNNNN.parquet, tokens, sequences}"
    if not (_int(m.get("tokens")) or (m.get("tokens") is None and kind == schema.KIND_COUNTS)):
        return f"tokens {m.get('tokens')!r} is not a token count"
    if not _int(m.get("sequences", 0)):
        return f"sequences {m.get('sequences')!r} is not a count"
    names = m.get("domain_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "domain_names is not a list of names"
    for flag in ("completed", "logits", "activation_stats"):
        if not isinstance(m.get(flag, False), bool):
            return f"{flag} is not true or false"
    return None


def _routing_problem(m: dict) -> str | None:
    """A policy trace (manifest "routing"): its widest K and the sentinel id of dropped slots, which the ids' dtype must
    hold (the sentinel is the router's logits width: E, or E + zero experts)."""
    routing, E = m.get("routing"), m["num_experts"]
    if routing is not None:
        if not isinstance(routing, dict) or not isinstance(routing.get("spec"), str):
            return "routing is not an object with the policy's spec"
        if not _int(routing.get("sentinel"), E) or routing["sentinel"] > np.iinfo(np.uint16).max:
            return f"routing sentinel {routing.get('sentinel')!r} is not an id >= num_experts"
        if not _int(routing.get("max_k"), 1) or routing["max_k"] > routing["sentinel"]:
            return f"routing max_k {routing.get('max_k')!r} is not between 1 and the router's width"
    largest = routing["sentinel"] if routing is not None else E - 1
    dtype = m.get("ids_dtype")
    if dtype is not None and (dtype not in ("uint8", "uint16") or np.iinfo(dtype).max < largest):
        return f"ids_dtype {dtype!r} is not an unsigned type that holds expert id {largest}"
    return None


def _layer_kinds_problem(m: dict) -> str | None:
    """Encoder-decoder and loop traces name each layer's kind ("encoder", "decoder", "decoder pass 2", ...)."""
    kinds = m.get("layer_kinds")
    if kinds is not None and (not isinstance(kinds, list) or len(kinds) != len(m["layers"])
                              or not all(isinstance(k, str) for k in kinds)):
        return "layer_kinds is not a list of one name per layer"
    return None


def _chunk_entry(c) -> bool:
    return (isinstance(c, dict) and isinstance(c.get("file"), str) and re.fullmatch(r"chunk-\d{5,}\.parquet", c["file"])
            is not None and _int(c.get("tokens")) and _int(c.get("sequences")))


class Trace:
    def __init__(self, folder: Path):
        self.folder = folder
        self.manifest = read_manifest(folder)
        self.kind: str = self.manifest["kind"]
        self.layers: list[int] = list(self.manifest["layers"])  # decoder-layer indices of the MoE layers
        # "encoder" / "decoder" (encoder-decoder models), "decoder pass 2" (a loop layer's second run); traces written
        # before layer kinds were recorded are all decoders
        kinds = self.manifest.get("layer_kinds") or ["decoder"] * len(self.layers)
        self.layer_kinds: dict[int, str] = dict(zip(self.layers, kinds))
        # the decoder layer each entry ran: itself, or for a loop layer's further passes that layer; None for a loop
        # trace written before `layer_of` was recorded (its passes cannot be told apart)
        layer_of = self.manifest.get("layer_of")
        passes = any(" pass " in k for k in kinds)
        self.layer_of: dict[int, int] | None = dict(zip(self.layers, layer_of)) if layer_of else \
            (None if passes else {l: l for l in self.layers})
        # decoder layers whose experts come from a token-id table (DeepSeek-V4), not the router's scores
        self.hash_routed: frozenset[int] = frozenset(self.manifest.get("hash_routed", ()))
        self.num_experts: int = self.manifest["num_experts"]
        self.top_k: int = self.manifest["top_k"]
        # selections stored per token (K, or a policy's widest); None: an aggregate trace imported without --top-k
        self.width: int | None = schema.ids_width(self.manifest) if self.top_k is not None else None
        # a policy trace's dropped slots hold this id (weight 0); None: every slot is a selected expert
        self.sentinel: int | None = (self.manifest.get("routing") or {}).get("sentinel")
        self.domain_names: list[str] = list(self.manifest.get("domain_names", []))
        self.completed: bool = bool(self.manifest.get("completed"))
        if self.kind == schema.KIND_COUNTS:
            self._files = [_open_parquet(folder / schema.COUNTS_FILE, schema.counts_schema())]
        else:  # footers, schemas and row counts checked now: fail early, name the file
            expected = self._schema(bool(self.manifest.get("logits")))
            self._files = [_open_parquet(folder / c["file"], expected, c["tokens"]) for c in self.manifest["chunks"]]

    def __repr__(self) -> str:
        return (f"Trace({str(self.folder)!r}, kind={self.kind}, tokens={self.num_tokens}, layers={self.layers}, "
                f"E={self.num_experts}, K={self.top_k})")

    @property
    def num_tokens(self) -> int:
        return int(self.manifest.get("tokens") or 0)  # None: an aggregate trace imported without --top-k

    # ---- token metadata, [T] each
    @cached_property
    def seq_id(self) -> np.ndarray:
        return self._column("seq_id").astype(np.int64, copy=False)

    @cached_property
    def position(self) -> np.ndarray:
        return self._column("position")

    @cached_property
    def token_id(self) -> np.ndarray:
        return self._column("token_id")

    @cached_property
    def domain(self) -> np.ndarray:
        """Codes into domain_names, [T] int32."""
        self._need_tokens("domain")
        parts = [self._domain_codes(f) for f in self._files]
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    # ---- routing, per MoE layer (decoder index)
    def ids(self, layer: int) -> np.ndarray:
        """[T, K] expert ids (uint8, or uint16 when E > 256), ordered by weight descending. A policy trace stores
        [T, width] with `sentinel` in the slots its policy dropped (the sentinel may repeat within a token)."""
        ids = self._fixed_lists(schema.ids_col(self._layer(layer)), self.width)
        real = ids if self.sentinel is None else np.where(ids == self.sentinel, 0, ids)
        if real.size and int(real.max()) >= self.num_experts:
            raise UserError(f"{self.folder}: layer {layer} routes to expert {int(real.max())}, but the manifest says "
                            f"{self.num_experts} experts: the trace is damaged; record it again")
        if ids.shape[1] > 1:
            ordered = np.sort(ids, axis=1)
            repeated = np.diff(ordered, axis=1) == 0
            if self.sentinel is not None:
                repeated &= ordered[:, 1:] != self.sentinel
            if repeated.any():
                raise UserError(f"{self.folder}: layer {layer} selects one expert twice for a token: the trace is "
                                f"damaged; record it again")
        return ids

    def weights(self, layer: int) -> np.ndarray:
        """[T, K] float32 routing weights as the model used them (NaN where the source had none: SGLang per_token)."""
        return self._fixed_lists(schema.weights_col(self._layer(layer)), self.width).astype(np.float32, copy=False)

    def logits(self, layer: int) -> np.ndarray:
        """[T, E] float16 router logits (traces recorded with --logits)."""
        if not self.manifest.get("logits"):
            raise UserError(f"{self.folder} has no router logits: record it with `moekit trace ... --logits`")
        return self._fixed_lists(schema.logits_col(self._layer(layer)), self.num_experts)

    def counts(self) -> np.ndarray:
        """[L, E] int64 selection counts per MoE layer and expert; the only routing data of an aggregate trace."""
        if self.kind == schema.KIND_COUNTS:
            table = self._read(self._files[0], ["layer", "expert", "count"])
            layer, expert = table["layer"].to_numpy(), table["expert"].to_numpy()
            rows = np.searchsorted(self.layers, layer)
            if not (np.isin(layer, self.layers).all() and ((expert >= 0) & (expert < self.num_experts)).all()):
                raise _damaged(self._files[0]._moekit_path, "layers or experts outside the manifest's")
            out = np.zeros((len(self.layers), self.num_experts), np.int64)
            out[rows, expert] = table["count"].to_numpy()
            return out
        return np.stack([np.bincount(self.ids(l).reshape(-1), minlength=self.num_experts)[:self.num_experts]
                         for l in self.layers])  # a policy trace's sentinel (id E) is no expert

    @cached_property
    def activation_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """([L, E] max |input|, [L, E] max |output|) of each expert's down projection over the run, or None."""
        if not self.manifest.get("activation_stats") or not self._files:
            return None
        ins, outs = zip(*(self._act_max(f) for f in self._files))
        return np.max(ins, axis=0), np.max(outs, axis=0)

    def verify(self) -> None:
        """Read every value of every chunk once: each page's CRC, every layer's expert ids, the domains and the
        activation statistics; one UserError naming the first damaged file (what `moekit trace-info` runs)."""
        for f in self._files:
            self._read(f, f.schema_arrow.names)
        if self.kind == schema.KIND_COUNTS:
            self.counts()
            return
        for l in self.layers:
            self.ids(l)
        self.domain, self.activation_stats  # noqa: B018 (cached reads, checked as they load)

    # ---- internals
    def _layer(self, layer: int) -> int:
        self._need_tokens("per-token routing")
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not a traced MoE layer; traced: {self.layers}")
        return layer

    def _need_tokens(self, what: str) -> None:
        if self.kind != schema.KIND_TOKENS:
            raise UserError(f"{self.folder} is an aggregate ({self.kind}) trace: it has no {what}, only counts()")

    def _column(self, name: str) -> np.ndarray:
        self._need_tokens(name)
        parts = [self._read(f, [name])[name].to_numpy() for f in self._files]
        return np.concatenate(parts) if parts else self._empty(name)

    def _fixed_lists(self, name: str, width: int) -> np.ndarray:
        parts = [_flat_values(self._read(f, [name])[name]).reshape(-1, width) for f in self._files]
        return np.concatenate(parts) if parts else self._empty(name).reshape(0, width)

    def _empty(self, name: str) -> np.ndarray:
        """A column of a trace without chunks: no rows, the schema's dtype (an empty trace reads like any other)."""
        field = self._schema(True).field(name).type
        return np.zeros(0, (field.value_type if pa.types.is_fixed_size_list(field) else field).to_pandas_dtype())

    def _schema(self, logits: bool) -> pa.Schema:
        """The columns the manifest promises: `width` selections per token, ids of the manifest's dtype."""
        return schema.token_schema(self.layers, self.width, self.num_experts, logits,
                                   id_dtype=np.dtype(self.manifest.get("ids_dtype") or schema.ids_dtype(self.num_experts)))

    def _domain_codes(self, f: pq.ParquetFile) -> np.ndarray:
        col = self._read(f, ["domain"])["domain"].combine_chunks()  # dictionary array: this chunk's own dictionary
        names = col.dictionary.to_pylist()
        if not set(names) <= set(self.domain_names):
            raise _damaged(f._moekit_path, f"domains {sorted(set(names) - set(self.domain_names))} not in the manifest")
        remap = np.array([self.domain_names.index(n) for n in names], np.int32)
        return remap[col.indices.to_numpy()] if len(remap) else np.zeros(len(col), np.int32)

    def _act_max(self, f: pq.ParquetFile) -> tuple[np.ndarray, np.ndarray]:
        shape, meta = (len(self.layers), self.num_experts), f.schema_arrow.metadata or {}
        raw = [meta.get(key, b"") for key in (schema.META_ACT_IN, schema.META_ACT_OUT)]
        if any(len(r) != 4 * shape[0] * shape[1] for r in raw):
            raise _damaged(f._moekit_path, "activation statistics missing or of the wrong size")
        return tuple(np.frombuffer(r, np.float32).reshape(shape) for r in raw)

    def _read(self, f: pq.ParquetFile, columns: list[str]) -> pa.Table:
        try:
            return f.read(columns=columns)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise _damaged(f._moekit_path, err) from None


def check_chunk(path: Path) -> bool:
    """True when a chunk file is present, of this schema version and every page passes its CRC (resume rewrites it
    otherwise)."""
    try:
        _open_parquet(path).read()
    except (UserError, pa.ArrowException, OSError, ValueError):
        return False
    return True


def _open_parquet(path: Path, expected: pa.Schema | None = None, rows: int | None = None) -> pq.ParquetFile:
    if not path.is_file():
        raise UserError(f"{path} is missing although the manifest lists it: rerun the same `moekit trace` with --resume "
                        f"to rewrite it (or re-record the trace)")
    try:
        f = pq.ParquetFile(path, page_checksum_verification=True)
        meta = f.schema_arrow.metadata or {}
    except (pa.ArrowException, OSError, ValueError) as err:  # ValueError: undecodable names in a damaged footer
        raise _damaged(path, err) from None
    version = meta.get(schema.META_VERSION, b"?").decode(errors="replace")
    if version != str(schema.SCHEMA_VERSION):
        raise UserError(f"{path} has trace schema version {version}, this moekit reads version "
                        f"{schema.SCHEMA_VERSION}: record the trace again with this moekit")
    if expected is not None and not f.schema_arrow.remove_metadata().equals(expected.remove_metadata()):
        raise _damaged(path, "its columns do not match the manifest's layers, top-k and experts")
    if rows is not None and f.metadata.num_rows != rows:
        raise _damaged(path, f"{f.metadata.num_rows} rows, the manifest lists {rows} tokens")
    f._moekit_path = path
    return f


def _damaged(path, err) -> UserError:
    why = err if isinstance(err, str) else describe(err)
    return UserError(f"{path} is truncated or corrupted ({why}): delete it and rerun the same `moekit trace` with "
                     f"--resume to rewrite it (or re-record the trace)")


def _flat_values(col: pa.ChunkedArray) -> np.ndarray:
    """A (fixed-size) list column -> its values as one flat numpy array, without a per-row Python loop."""
    col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False)
