"""The on-disk trace format, version 1. Everything a reader needs to know about the files lives here.

A trace is a folder:
  manifest.json             what was traced, how, and which chunks are complete (written atomically, last)
  chunk-00000.parquet ...   one row per token, in sequence order (each chunk written atomically)
  counts.parquet            aggregate traces only (SGLang `stat` dumps): one row per (layer, expert)

Token rows: seq_id int64, position int32, token_id int32, domain string (dictionary-encoded), then per MoE layer with
decoder index l: ids_L{l} fixed_size_list<uint8 | uint16>[K] and weights_L{l} fixed_size_list<float32>[K], ordered by
weight descending, and with --logits logits_L{l} fixed_size_list<float16>[E]. Ids are uint8 when E <= 256.
Weights stay float32 so a trace reproduces the router bit for bit (tests/trace/test_capture.py). A weight of 0 marks a
selection no expert computed: dropped over an expert's capacity (Switch, NLLB-MoE) or a skip expert (Zaya, whose
router reports it as expert 0).

The manifest's `layer_kinds` (one per entry of `layers`, added compatibly within version 1: older traces have none and
read as all "decoder") says which stack a layer is in: "encoder" or "decoder" for encoder-decoder models, and
"decoder pass 2", ... for the further runs of a loop layer (Inkling2-Loop), traced under indices after the last layer;
`layer_of` (also added compatibly) the decoder layer each entry ran, and `hash_routed` the decoder layers whose
experts come from a token-id table (DeepSeek-V4's first layers) rather than the router's scores.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
KIND_TOKENS = "tokens"  # one row per token: ids and weights per layer
KIND_COUNTS = "counts"  # aggregate: selection counts per layer x expert only (SGLang `stat` mode)
MANIFEST = "manifest.json"
COUNTS_FILE = "counts.parquet"
META_VERSION = b"moekit.trace.schema_version"
META_KIND = b"moekit.trace.kind"
META_ACT_IN = b"moekit.trace.act_max_in"  # per-chunk [L, E] float32 bytes (max |input| of the down projection)
META_ACT_OUT = b"moekit.trace.act_max_out"  # per-chunk [L, E] float32 bytes (max |output| of the down projection)
PARQUET_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=["domain"],
                       write_page_checksum=True)  # CRC per page: a flipped bit is an error, not a wrong expert id
WEIGHT_NO_VALUE = np.float32("nan")  # imported traces that carry no weights (SGLang per_token)


def chunk_name(i: int) -> str:
    return f"chunk-{i:05d}.parquet"


def ids_dtype(num_experts: int) -> np.dtype:
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype(np.uint16)


def ids_col(layer: int) -> str:
    return f"ids_L{layer}"


def weights_col(layer: int) -> str:
    return f"weights_L{layer}"


def logits_col(layer: int) -> str:
    return f"logits_L{layer}"


def ids_width(manifest: dict) -> int:
    """Selections stored per token: the model's top-k, or under a routing policy its widest K (manifest "routing";
    narrower tokens are padded with the sentinel id, weight 0)."""
    return int((manifest.get("routing") or {}).get("max_k", manifest["top_k"]))


def token_schema(layers: list[int], top_k: int, num_experts: int, logits: bool, id_dtype=None) -> pa.Schema:
    ids_type = pa.from_numpy_dtype(id_dtype if id_dtype is not None else ids_dtype(num_experts))
    fields = [
        pa.field("seq_id", pa.int64()),
        pa.field("position", pa.int32()),
        pa.field("token_id", pa.int32()),
        pa.field("domain", pa.dictionary(pa.int32(), pa.string())),
    ]
    for l in layers:
        fields.append(pa.field(ids_col(l), pa.list_(ids_type, top_k)))
        fields.append(pa.field(weights_col(l), pa.list_(pa.float32(), top_k)))
        if logits:
            fields.append(pa.field(logits_col(l), pa.list_(pa.float16(), num_experts)))
    return pa.schema(fields, metadata={META_VERSION: str(SCHEMA_VERSION).encode(), META_KIND: KIND_TOKENS.encode()})


def counts_schema() -> pa.Schema:
    fields = [pa.field("layer", pa.int32()), pa.field("expert", pa.int32()), pa.field("count", pa.int64())]
    return pa.schema(fields, metadata={META_VERSION: str(SCHEMA_VERSION).encode(), META_KIND: KIND_COUNTS.encode()})
