"""Writing trace files safely: every file lands atomically (moekit.files: temp file, fsync, os.replace), so a killed
run leaves only complete chunks plus temp files that the next run discards.
Dimension legend: T tokens, K selected, E experts, L layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moekit import files
from moekit.trace import schema

TMP_SUFFIX = ".tmp"


@dataclass
class ChunkArrays:
    """One chunk of token rows in sequence order."""

    seq_id: np.ndarray  # [T] int64
    position: np.ndarray  # [T] int32
    token_id: np.ndarray  # [T] int32
    domain: np.ndarray  # [T] int32 codes into domain_names
    domain_names: list[str]
    ids: dict[int, np.ndarray]  # decoder layer -> [T, K] uint8/uint16, by weight descending
    weights: dict[int, np.ndarray]  # decoder layer -> [T, K] float32
    logits: dict[int, np.ndarray] = field(default_factory=dict)  # decoder layer -> [T, E] float16
    act_max: tuple[np.ndarray, np.ndarray] | None = None  # ([L, E] max |in|, [L, E] max |out|) of the down projection


def write_manifest(folder: Path, manifest: dict) -> None:
    files.write_json(folder / schema.MANIFEST, manifest)


def write_table_atomic(path: Path, table: pa.Table) -> None:
    with files.atomic_file(path) as tmp:
        pq.write_table(table, tmp, **schema.PARQUET_OPTIONS)


def chunk_table(c: ChunkArrays, pa_schema: pa.Schema) -> pa.Table:
    """ChunkArrays -> an Arrow table of `pa_schema` (see moekit/trace/schema.py), activation maxima in its metadata."""
    cols = {
        "seq_id": pa.array(c.seq_id, pa.int64()),
        "position": pa.array(c.position, pa.int32()),
        "token_id": pa.array(c.token_id, pa.int32()),
        "domain": pa.DictionaryArray.from_arrays(pa.array(c.domain, pa.int32()), pa.array(c.domain_names, pa.string())),
    }
    for l, ids in c.ids.items():
        cols[schema.ids_col(l)] = _fixed_lists(ids)
        cols[schema.weights_col(l)] = _fixed_lists(c.weights[l])
        if l in c.logits:
            cols[schema.logits_col(l)] = _fixed_lists(c.logits[l])
    table = pa.table([cols[f.name] for f in pa_schema], schema=pa_schema)
    if c.act_max is not None:
        meta = dict(pa_schema.metadata)
        meta[schema.META_ACT_IN] = np.ascontiguousarray(c.act_max[0], np.float32).tobytes()
        meta[schema.META_ACT_OUT] = np.ascontiguousarray(c.act_max[1], np.float32).tobytes()
        table = table.replace_schema_metadata(meta)
    return table


def temp_files(folder: Path) -> list[Path]:
    """The partial files a killed run leaves: never listed in the manifest, never read."""
    return sorted({*folder.glob("*" + TMP_SUFFIX), *folder.glob(".*.tmp-*")})


def discard_temp_files(folder: Path) -> list[Path]:
    """Remove partial files a killed run left behind."""
    stale = temp_files(folder)
    for p in stale:
        p.unlink()
    return stale


def _fixed_lists(a: np.ndarray) -> pa.FixedSizeListArray:
    rows, width = a.shape  # [T, K] or [T, E]
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).reshape(-1)), width)

