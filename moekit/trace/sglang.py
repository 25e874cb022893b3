"""Import SGLang expert-distribution recorder dumps into moekit traces.

SGLang (python/sglang/srt/eplb/expert_distribution.py) writes one `torch.save` dict per dump, named
`expert_distribution_recorder_{time}[_{rank}].pt`, under SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR:
- mode `per_token` (_DetailAccumulator): {"records": [one dict per forward pass: forward_pass_id, rank, gatherer_key,
  input_ids list[int], positions list[int], extend_seq_lens list[int] | None, forward_mode int,
  topk_ids_of_layer int32 [num_layers, num_tokens, 8] (physical expert ids, -1 padded past top-k and on dense layers),
  misc_objects, global_physical_count [num_layers, num_physical_experts]], "last_physical_to_logical_map":
  [num_layers, num_physical_experts]}. One file per rank.
- mode `stat` (_StatAccumulator): {"rank", "logical_count": int [buffered_steps, num_layers, num_logical_experts],
  "average_utilization_rate_over_window": float | None}, written by rank 0 after an all-reduce.
per_token becomes a token trace without weights (NaN: SGLang records ids only; ids keep SGLang's order). Sequences:
each extend/prefill segment (extend_seq_lens) is one sequence, each decode token its own (the dump has no request ids).
stat becomes an aggregate trace: counts per layer x expert only (Trace.counts(); frequency, load balance and MaxVio
work on it; anything per token does not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moekit.errors import UserError, at_least
from moekit.files import atomic_folder, check_out
from moekit.trace import schema, store
from moekit.trace.store import ChunkArrays

PAD = -1


def import_sglang(dump: Path, out: Path, *, domain: str = "sglang", top_k: int | None = None,
                  chunk_tokens: int = 65536) -> dict:
    """An SGLang dump (.pt, mode per_token or stat) -> a trace folder `out`; returns its manifest."""
    dump, out = Path(dump), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} is not empty: choose another --out")
    check_out(out, exist_ok=True)
    if top_k is not None:
        at_least("--top-k", top_k)
    if not domain.strip():  # readers group and report tokens by this label
        raise UserError("--domain is empty: give the imported tokens a label, e.g. --domain chat")
    data = _load(dump)
    if isinstance(data, dict) and "records" in data:
        convert = lambda folder: _import_per_token(data, dump, folder, domain, chunk_tokens)  # noqa: E731
    elif isinstance(data, dict) and "logical_count" in data:
        convert = lambda folder: _import_stat(data, dump, folder, top_k)  # noqa: E731
    else:
        raise UserError(f"{dump} is not an SGLang expert-distribution dump: expected a dict with `records` (mode "
                        f"per_token) or `logical_count` (mode stat)")
    if out.is_dir():
        out.rmdir()  # empty (checked above): atomic_folder puts the finished trace there
    with atomic_folder(out) as folder:  # a failure halfway (a full disk) leaves nothing at --out
        return convert(folder)


def _load(dump: Path):
    if not dump.is_file():
        raise UserError(f"no file at {dump}: give an expert_distribution_recorder_*.pt file SGLang wrote")
    try:
        return torch.load(dump, map_location="cpu", weights_only=True)  # tensors, lists and numbers only
    except Exception as err:  # torch raises many types for a bad file; all mean the same to the user
        raise UserError(f"cannot read {dump}: not a torch.save file of tensors, lists and numbers "
                        f"({type(err).__name__}); give an "
                        f"expert_distribution_recorder_*.pt file SGLang wrote") from None


def _malformed(dump: Path, what: str) -> UserError:
    return UserError(f"{dump} is not a well-formed SGLang dump ({what}); give a file SGLang's "
                     f"expert_distribution_recorder wrote")


def _int_tensor(x, dims: tuple[int, ...], dump: Path, what: str, low: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() not in dims or x.dtype.is_floating_point or x.dtype.is_complex \
            or x.dtype == torch.bool:
        raise _malformed(dump, f"{what} is not an integer tensor of {' or '.join(map(str, dims))} dimensions")
    if x.numel() and int(x.min()) < low:
        raise _malformed(dump, f"{what} holds {int(x.min())}, below {low}")
    return x


def _int_list(x, dump: Path, what: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if not isinstance(x, list) or not all(isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**31
                                          for v in x):
        raise _malformed(dump, f"{what} is not a list of int32 values")
    return x


def _check_per_token(data: dict, dump: Path) -> list[dict]:
    """The records sorted by forward pass, every field the import reads checked (types, shapes, ranges)."""
    records = data["records"]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise _malformed(dump, "records is not a list of dicts")
    if not records:
        raise UserError(f"{dump} holds no forward passes: record some traffic between start and dump")
    p2l = data.get("last_physical_to_logical_map")
    if p2l is not None:
        _int_tensor(p2l, (2,), dump, "last_physical_to_logical_map", 0)
    shape = None
    for r in records:
        if not isinstance(r.get("forward_pass_id"), int):
            raise _malformed(dump, "a record has no integer forward_pass_id")
        ids = _int_tensor(r.get("topk_ids_of_layer"), (3,), dump, "topk_ids_of_layer", PAD)
        if shape is not None and (ids.shape[0], ids.shape[2]) != shape:
            raise _malformed(dump, "records disagree on the number of layers or top-k columns")
        shape = (ids.shape[0], ids.shape[2])
        n = ids.shape[1]
        if len(_int_list(r.get("input_ids"), dump, "input_ids")) != n or \
                len(_int_list(r.get("positions"), dump, "positions")) != n:
            raise _malformed(dump, f"record {r['forward_pass_id']}: input_ids and positions do not have its {n} tokens")
        lens = r.get("extend_seq_lens")
        if lens is not None and any(v < 0 for v in _int_list(lens, dump, "extend_seq_lens")):
            raise _malformed(dump, "extend_seq_lens holds a negative length")
        if p2l is not None and (p2l.shape[0] != ids.shape[0] or (ids.numel() and int(ids.max()) >= p2l.shape[1])):
            raise _malformed(dump, "topk_ids_of_layer does not fit last_physical_to_logical_map")
    return sorted(records, key=lambda r: r["forward_pass_id"])


def _import_per_token(data: dict, dump: Path, out: Path, domain: str, chunk_tokens: int) -> dict:
    records = _check_per_token(data, dump)
    p2l = data.get("last_physical_to_logical_map")
    ids_all = [_to_logical(torch.as_tensor(r["topk_ids_of_layer"]).numpy(), p2l) for r in records]  # [Lall, t, 8]
    layers, top_k = _used_layers_and_k(ids_all)
    num_experts = _num_experts(p2l, ids_all)
    if num_experts > np.iinfo(np.uint16).max + 1:
        raise _malformed(dump, f"{num_experts} experts, more than a trace stores (65536)")
    manifest = _manifest(dump, "sglang_per_token", layers, top_k, num_experts, [domain])
    manifest["num_hidden_layers"] = int(ids_all[0].shape[0])  # SGLang records every layer, dense ones as -1
    pa_schema = schema.token_schema(layers, top_k, num_experts, logits=False)
    pending, seq0 = [], 0
    for r, ids in zip(records, ids_all):
        meta = _record_meta(r, seq0)
        seq0 = int(meta[0][-1]) + 1 if len(meta[0]) else seq0
        pending.append((meta, ids[layers][:, :, :top_k]))
        if sum(len(m[0]) for m, _ in pending) >= chunk_tokens:
            _flush(out, manifest, pending, pa_schema, layers, num_experts)
    if pending:
        _flush(out, manifest, pending, pa_schema, layers, num_experts)
    manifest["completed"] = True
    store.write_manifest(out, manifest)
    return manifest


def _to_logical(ids: np.ndarray, p2l) -> np.ndarray:
    """Physical expert ids (EPLB replicas) -> logical ids, per layer; -1 padding stays -1."""
    if p2l is None:
        return ids.astype(np.int64)
    table = torch.as_tensor(p2l).numpy().astype(np.int64)  # [Lall, P]
    layer = np.arange(ids.shape[0])[:, None, None]
    return np.where(ids >= 0, table[layer, np.clip(ids, 0, None)], PAD)


def _used_layers_and_k(ids_all: list[np.ndarray]) -> tuple[list[int], int]:
    used = np.zeros(ids_all[0].shape[0], bool)  # dense layers never select: all -1
    cols = np.zeros(ids_all[0].shape[2], bool)
    for ids in ids_all:
        used |= (ids >= 0).any(axis=(1, 2))
        cols |= (ids >= 0).any(axis=(0, 1))
    if not used.any():
        raise UserError("the SGLang dump records no expert selection in any layer")
    return np.flatnonzero(used).tolist(), int(cols.sum())


def _num_experts(p2l, ids_all) -> int:
    if p2l is not None:
        return int(torch.as_tensor(p2l).max()) + 1
    return int(max(ids.max() for ids in ids_all)) + 1


def _record_meta(r: dict, seq0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seq_id, position, token_id), [t] each, for one forward pass."""
    n = len(r["input_ids"])
    lens = r.get("extend_seq_lens") or [1] * n  # decode passes: one token per request
    if sum(lens) != n:
        raise UserError(f"SGLang record {r.get('forward_pass_id')}: extend_seq_lens sum to {sum(lens)}, "
                        f"but it has {n} tokens")
    seq = np.repeat(np.arange(seq0, seq0 + len(lens), dtype=np.int64), lens)
    return seq, np.asarray(r["positions"], np.int32), np.asarray(r["input_ids"], np.int32)


def _flush(out: Path, manifest: dict, pending: list, pa_schema, layers, num_experts) -> None:
    seq = np.concatenate([m[0] for m, _ in pending])
    ids = np.concatenate([i for _, i in pending], axis=1)  # [L, T, K]
    if (ids[:, :, :] < 0).any():
        raise UserError("an SGLang record has fewer expert ids than top-k for some token; cannot import it")
    if ids.shape[2] > 1 and (np.diff(np.sort(ids, axis=2), axis=2) == 0).any():
        raise UserError("an SGLang record selects one logical expert twice for a token (SGLang never does); "
                        "cannot import it")
    dt = schema.ids_dtype(num_experts)
    chunk = ChunkArrays(
        seq_id=seq, position=np.concatenate([m[1] for m, _ in pending]),
        token_id=np.concatenate([m[2] for m, _ in pending]), domain=np.zeros(len(seq), np.int32),
        domain_names=manifest["domain_names"],
        ids={l: ids[j].astype(dt) for j, l in enumerate(layers)},
        weights={l: np.full(ids[j].shape, schema.WEIGHT_NO_VALUE, np.float32) for j, l in enumerate(layers)},
    )
    i = len(manifest["chunks"])
    store.write_table_atomic(out / schema.chunk_name(i), store.chunk_table(chunk, pa_schema))
    manifest["chunks"].append({"file": schema.chunk_name(i), "first_seq_id": int(seq[0]),
                               "sequences": len(np.unique(seq)), "tokens": len(seq)})
    manifest["tokens"] += len(seq)
    manifest["sequences"] += len(np.unique(seq))
    store.write_manifest(out, manifest)
    pending.clear()


def read_logical_count(dump: Path) -> np.ndarray:
    """The `logical_count` of an SGLang `stat` dump, summed over its buffered steps: [num_hidden_layers, E] int64 (dense
    layers are rows of zeros). SGLang's own `init_by_eplb` accepts [L, E] or [X, L, E] and sums over X the same way."""
    data = _load(Path(dump))
    if not isinstance(data, dict) or "logical_count" not in data:
        raise UserError(f"{dump} is not an SGLang `stat` dump (no `logical_count`): record with "
                        f"--expert-distribution-recorder-mode stat, or import a per_token dump with "
                        f"`moekit trace-import-sglang`")
    return _logical_count(data, Path(dump))


def _logical_count(data: dict, dump: Path) -> np.ndarray:
    counts = _int_tensor(data["logical_count"], (2, 3), dump, "logical_count [steps, layers, experts]", 0)
    counts = counts.to(torch.int64)
    counts = counts.sum(dim=0) if counts.dim() == 3 else counts  # [steps, Lall, E] -> [Lall, E]
    return counts.numpy()


def _import_stat(data: dict, dump: Path, out: Path, top_k: int | None) -> dict:
    import pyarrow as pa

    counts = _logical_count(data, dump)
    layers = np.flatnonzero(counts.sum(axis=1) > 0).tolist()  # dense layers count nothing
    if not layers:
        raise UserError(f"{dump} counts no expert selection in any layer: record some traffic between start and dump")
    if top_k is not None and top_k > counts.shape[1]:
        raise UserError(f"--top-k {top_k} is more than the dump's {counts.shape[1]} experts: give the model's top-k")
    L, E = len(layers), counts.shape[1]
    table = pa.table({"layer": pa.array(np.repeat(layers, E), pa.int32()),
                      "expert": pa.array(np.tile(np.arange(E), L), pa.int32()),
                      "count": pa.array(counts[layers].reshape(-1), pa.int64())}, schema=schema.counts_schema())
    store.write_table_atomic(out / schema.COUNTS_FILE, table)
    manifest = _manifest(dump, "sglang_stat", layers, top_k, E, [])
    manifest.update(kind=schema.KIND_COUNTS, completed=True, num_hidden_layers=counts.shape[0],
                    tokens=int(counts[layers[0]].sum() // top_k) if top_k and layers else None)
    store.write_manifest(out, manifest)
    return manifest


def _manifest(dump: Path, kind: str, layers, top_k, num_experts, domains) -> dict:
    import moekit

    return {"schema_version": schema.SCHEMA_VERSION, "kind": schema.KIND_TOKENS,
            "moekit_version": getattr(moekit, "__version__", "unknown"), "model": f"sglang dump {dump}",
            "model_type": None, "config_hash": None, "data": [{"spec": str(dump), "path": str(dump), "kind": kind}],
            "options": {}, "seq_len": None, "layers": layers, "top_k": top_k, "num_experts": num_experts,
            "ids_dtype": schema.ids_dtype(num_experts).name, "logits": False, "activation_stats": False,
            "domain_names": list(domains), "tokens": 0, "sequences": 0, "chunks": [], "completed": False}
