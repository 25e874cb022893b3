"""Reading traces: `open(folder)` -> Trace, with lazy per-layer numpy arrays (the contract of moekit/analysis/).

Arrays span every completed chunk in sequence order. Dimension legend: T tokens, K selected, E experts, L MoE layers.
Damaged or foreign files raise UserError naming the file and the fix (the CLI prints one line and exits 2).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moekit.errors import UserError
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
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupted ({err}); record the trace again into a new --out") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != schema.SCHEMA_VERSION:
        raise UserError(f"{path} has trace schema version {version!r}, this moekit reads version "
                        f"{schema.SCHEMA_VERSION}: record the trace again with this moekit")
    return manifest


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
        self.width: int = schema.ids_width(self.manifest)  # selections stored per token (K, or a policy's widest)
        # a policy trace's dropped slots hold this id (weight 0); None: every slot is a selected expert
        self.sentinel: int | None = (self.manifest.get("routing") or {}).get("sentinel")
        self.domain_names: list[str] = list(self.manifest.get("domain_names", []))
        self.completed: bool = bool(self.manifest.get("completed"))
        files = [c["file"] for c in self.manifest.get("chunks", [])]
        if self.kind == schema.KIND_COUNTS:
            files = [schema.COUNTS_FILE]
        self._files = [_open_parquet(folder / f) for f in files]  # footers checked now: fail early, name the file

    def __repr__(self) -> str:
        return (f"Trace({str(self.folder)!r}, kind={self.kind}, tokens={self.num_tokens}, layers={self.layers}, "
                f"E={self.num_experts}, K={self.top_k})")

    @property
    def num_tokens(self) -> int:
        return int(self.manifest.get("tokens", 0))

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
        [T, width] with `sentinel` in the slots its policy dropped."""
        return self._fixed_lists(schema.ids_col(self._layer(layer)), self.width)

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
            out = np.zeros((len(self.layers), self.num_experts), np.int64)
            rows = np.searchsorted(self.layers, table["layer"].to_numpy())
            out[rows, table["expert"].to_numpy()] = table["count"].to_numpy()
            return out
        return np.stack([np.bincount(self.ids(l).reshape(-1), minlength=self.num_experts)[:self.num_experts]
                         for l in self.layers])  # a policy trace's sentinel (id E) is no expert

    @cached_property
    def activation_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """([L, E] max |input|, [L, E] max |output|) of each expert's down projection over the run, or None."""
        if not self.manifest.get("activation_stats") or not self._files:
            return None
        shape = (len(self.layers), self.num_experts)
        ins = [np.frombuffer(f.schema_arrow.metadata[schema.META_ACT_IN], np.float32).reshape(shape) for f in self._files]
        outs = [np.frombuffer(f.schema_arrow.metadata[schema.META_ACT_OUT], np.float32).reshape(shape)
                for f in self._files]
        return np.max(ins, axis=0), np.max(outs, axis=0)

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
        return np.concatenate(parts) if parts else np.zeros(0)

    def _fixed_lists(self, name: str, width: int) -> np.ndarray:
        parts = [_flat_values(self._read(f, [name])[name]).reshape(-1, width) for f in self._files]
        return np.concatenate(parts) if parts else np.zeros((0, width))

    def _domain_codes(self, f: pq.ParquetFile) -> np.ndarray:
        col = self._read(f, ["domain"])["domain"].combine_chunks()  # dictionary array: this chunk's own dictionary
        remap = np.array([self.domain_names.index(n) for n in col.dictionary.to_pylist()], np.int32)
        return remap[col.indices.to_numpy()] if len(remap) else np.zeros(len(col), np.int32)

    def _read(self, f: pq.ParquetFile, columns: list[str]) -> pa.Table:
        try:
            return f.read(columns=columns)
        except (pa.ArrowException, OSError) as err:
            raise _damaged(f._moekit_path, err) from None


def check_chunk(path: Path) -> bool:
    """True when a chunk file is present, readable and of this schema version (resume rewrites it otherwise)."""
    try:
        _open_parquet(path)
    except UserError:
        return False
    return True


def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise UserError(f"{path} is missing although the manifest lists it: rerun the same `moekit trace` with --resume "
                        f"to rewrite it (or re-record the trace)")
    try:
        f = pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as err:
        raise _damaged(path, err) from None
    meta = f.schema_arrow.metadata or {}
    version = meta.get(schema.META_VERSION, b"?").decode()
    if version != str(schema.SCHEMA_VERSION):
        raise UserError(f"{path} has trace schema version {version}, this moekit reads version "
                        f"{schema.SCHEMA_VERSION}: record the trace again with this moekit")
    f._moekit_path = path
    return f


def _damaged(path, err) -> UserError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UserError(f"{path} is truncated or corrupted ({first}): delete it and rerun the same `moekit trace` with "
                     f"--resume to rewrite it (or re-record the trace)")


def _flat_values(col: pa.ChunkedArray) -> np.ndarray:
    """A (fixed-size) list column -> its values as one flat numpy array, without a per-row Python loop."""
    col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False)
