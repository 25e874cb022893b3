"""Every kind of bad input a user can hand moekit, as small factories shared by the table-driven CLI test
(tests/cli/test_bad_input.py) and the fuzz tests (tests/test_fuzz.py): each takes a good file or folder (copied first)
and damages it one way. Names are the ids the tests and docs/reliability.md use."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from tests.trace.parquet_pages import data_pages

WEIGHTS = "model.safetensors"


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_weights(folder: Path, fn) -> None:
    tensors = load_file(folder / WEIGHTS)
    fn(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def flip_header_byte(file: Path) -> None:
    """One byte inside the safetensors JSON header, where a flip always breaks the JSON or a shape/offset."""
    data = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].decode()
    at = 8 + header.index('"data_offsets":[') + len('"data_offsets":[')  # the first offset's first digit
    data[at] = ord("x")
    file.write_bytes(bytes(data))


def shard(folder: Path, parts: int = 2) -> None:
    """Split model.safetensors into an index and `parts` shards, as save_pretrained(max_shard_size=...) does."""
    tensors = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    keys = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        name = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::parts]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _index_edit(folder: Path, fn) -> None:
    shard(folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    fn(data["weight_map"])
    index.write_text(json.dumps(data))


def _foreign_weights(folder: Path) -> None:
    """Weights of another architecture (a tiny Mixtral) under this folder's Qwen3-MoE config."""
    import transformers

    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
                                        num_local_experts=8, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS, metadata={"format": "pt"})


def _dense(folder: Path) -> None:
    import transformers

    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=128)
    for f in folder.iterdir():
        if f.name in ("config.json", WEIGHTS):
            f.unlink()
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


# name -> (damage(folder), text the error line must hold). The folder is a copy of a good tiny Qwen3-MoE checkpoint
# (16 experts, top-4, 3 layers, hidden 32, with a tokenizer).
CHECKPOINTS = {
    "missing folder": (lambda f: shutil.rmtree(f), "no model at"),
    "a file, not a folder": (lambda f: (shutil.rmtree(f), f.write_text("x")), "is a file"),
    "no config.json": (lambda f: (f / "config.json").unlink(), "has no config.json"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{nope"), "config.json"),
    "config.json binary": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe\x00\x01" * 8), "config.json"),
    "config.json a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "no model_type"),
    "config.json no model_type": (lambda f: edit_json(f / "config.json", model_type=None), "no model_type"),
    "unknown model_type": (lambda f: edit_json(f / "config.json", model_type="nonesuch_moe"), "config.json"),
    "dense model": (_dense, "dense model"),
    "config value of the wrong type": (lambda f: edit_json(f / "config.json", num_hidden_layers="three"),
                                       "config.json"),
    "config hidden_size != weights": (lambda f: edit_json(f / "config.json", hidden_size=64), "by config.json"),
    "config expert count != weights": (lambda f: edit_json(f / "config.json", num_local_experts=8),
                                       "by config.json"),
    "config more layers than weights": (lambda f: edit_json(f / "config.json", num_hidden_layers=4), "lack"),
    "config with a billion layers": (lambda f: edit_json(f / "config.json", num_hidden_layers=10**9),
                                     "1000000000 layers"),
    "config with no MoE layer": (lambda f: edit_json(f / "config.json", mlp_only_layers=[0, 1, 2]), "lack"),
    "no weights": (lambda f: (f / WEIGHTS).unlink(), "has no weights"),
    "PyTorch .bin weights only": (lambda f: ((f / WEIGHTS).unlink(), (f / "pytorch_model.bin").write_bytes(b"x")),
                                  ".bin"),
    "weights truncated": (lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:-100]),
                          "model.safetensors is truncated or damaged"),
    "weights cut in the header": (lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:40]),
                                  "model.safetensors is truncated or damaged"),
    "weights empty": (lambda f: (f / WEIGHTS).write_bytes(b""), "model.safetensors is truncated or damaged"),
    "weights header byte flipped": (lambda f: flip_header_byte(f / WEIGHTS),
                                    "model.safetensors is truncated or damaged"),
    "weights not safetensors": (lambda f: (f / WEIGHTS).write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4),
                                "model.safetensors is truncated or damaged"),
    "a tensor missing": (lambda f: edit_weights(f, lambda t: t.pop("model.layers.0.self_attn.q_proj.weight")),
                         "lack model.layers.0.self_attn.q_proj.weight"),
    "an expert missing": (lambda f: edit_weights(f, lambda t: t.pop("model.layers.1.mlp.experts.3.down_proj.weight")),
                          "model.layers.1.mlp.experts.down_proj"),
    "an expert of another shape": (lambda f: edit_weights(
        f, lambda t: t.__setitem__("model.layers.1.mlp.experts.3.down_proj.weight", torch.zeros(32, 8))),
        "cannot be assembled into model.layers.1.mlp.experts.down_proj"),
    "weights of another architecture": (_foreign_weights, "different models"),
    "shard missing": (lambda f: (shard(f), (f / "model-00002-of-00002.safetensors").unlink()),
                      "model-00002-of-00002.safetensors"),
    "shard truncated": (lambda f: (shard(f), (f / "model-00001-of-00002.safetensors").write_bytes(b"\x08" + b"\0" * 9)),
                        "model-00001-of-00002.safetensors is truncated or damaged"),
    "index names a tensor its shard lacks": (lambda f: _index_edit(f, lambda m: m.__setitem__("extra.weight",
                                                                                             next(iter(m.values())))),
                                             "extra.weight"),
    "index names a path outside": (lambda f: _index_edit(f, lambda m: m.__setitem__(next(iter(m)), "../x.safetensors")),
                                   "../x.safetensors"),
    "index not JSON": (lambda f: (shard(f), (f / "model.safetensors.index.json").write_text("{")),
                       "model.safetensors.index.json"),
}

# what needs a tokenizer fails on these too
TOKENIZERS = {
    "no tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "no tokenizer"),
    "tokenizer.json damaged": (lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "model": 5}'),
                               "tokenizer"),
    "tokenizer.json empty": (lambda f: (f / "tokenizer.json").write_text(""), "tokenizer"),
}


# ---------------------------------------------------------------------------------------------------------- traces


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _manifest(folder: Path, **changes) -> None:
    edit_json(folder / "manifest.json", **changes)


def _rewrite_chunk(folder: Path, fn, name: str = "chunk-00000.parquet") -> None:
    """Rewrite a chunk with valid page CRCs but altered content (what a foreign or buggy writer would produce)."""
    from moekit.trace import schema

    table = pq.read_table(folder / name)
    table = fn(table)
    pq.write_table(table, folder / name, **schema.PARQUET_OPTIONS)


def _set_column(table: pa.Table, name: str, values: np.ndarray) -> pa.Table:
    col = table.column(name).combine_chunks()
    width = col.type.list_size
    arr = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1).astype(col.type.value_type.to_pandas_dtype())),
                                            width)
    return table.set_column(table.schema.get_field_index(name), table.schema.field(name), arr)


def _ids_out_of_range(table: pa.Table) -> pa.Table:
    ids = np.array(table.column("ids_L0").combine_chunks().flatten())
    ids[0] = 200  # the traced model has 16 experts
    return _set_column(table, "ids_L0", ids)


def _ids_twice(table: pa.Table) -> pa.Table:
    ids = np.array(table.column("ids_L0").combine_chunks().flatten()).reshape(table.num_rows, -1)
    ids[0, 1] = ids[0, 0]
    return _set_column(table, "ids_L0", ids)


def _flip_payload(folder: Path) -> None:
    chunk = folder / "chunk-00000.parquet"
    data = bytearray(chunk.read_bytes())
    page = next(p for p in data_pages(chunk) if p.column.startswith("ids_L"))
    data[page.payload + page.size // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def _drop_metadata_key(table: pa.Table, key: bytes) -> pa.Table:
    return table.replace_schema_metadata({k: v for k, v in table.schema.metadata.items() if k != key})


def _rename_domain(table: pa.Table) -> pa.Table:
    col = table.column("domain").combine_chunks()
    renamed = pa.DictionaryArray.from_arrays(col.indices, pa.array(["elsewhere"] * len(col.dictionary)))
    return table.set_column(table.schema.get_field_index("domain"), table.schema.field("domain"), renamed)


# name -> (damage(folder), text the error line must hold, the part damaged: "meta" (manifest, footers, schemas: every
# reader opens them), "ids" (the routing), "domain", "stats" (activation statistics)). The folder is a copy of a good
# trace (several chunks, activation statistics) of the tiny checkpoint above.
TRACES = {
    "no trace folder": (lambda f: shutil.rmtree(f), "no trace at", "meta"),
    "no manifest": (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing", "meta"),
    "manifest not JSON": (lambda f: (f / "manifest.json").write_text('{"schema_version": 1,'), "manifest.json", "meta"),
    "manifest binary": (lambda f: (f / "manifest.json").write_bytes(b"\x89PNG\r\n\x1a\n" * 4), "manifest.json",
                        "meta"),
    "manifest a list": (lambda f: (f / "manifest.json").write_text("[]"), "schema version", "meta"),
    "manifest of another version": (lambda f: _manifest(f, schema_version=7), "schema version 7", "meta"),
    "manifest layers not a list": (lambda f: _manifest(f, layers="0,1,2"), "layers", "meta"),
    "manifest without kind": (lambda f: _manifest(f, kind=None), "kind", "meta"),
    "manifest experts 0": (lambda f: _manifest(f, num_experts=0), "num_experts", "meta"),
    "manifest top-k above experts": (lambda f: _manifest(f, top_k=99), "top_k", "meta"),
    "manifest chunk path outside": (lambda f: _manifest(f, chunks=[{"file": "../../etc/passwd", "tokens": 1,
                                                                    "sequences": 1}]), "chunks", "meta"),
    "manifest tokens negative": (lambda f: _manifest(f, tokens=-3), "tokens", "meta"),
    "chunk missing": (lambda f: (f / "chunk-00001.parquet").unlink(), "chunk-00001.parquet is missing", "meta"),
    "chunk truncated": (lambda f: _truncate(f / "chunk-00001.parquet", -40),
                        "chunk-00001.parquet is truncated or corrupted", "meta"),
    "chunk empty": (lambda f: (f / "chunk-00001.parquet").write_bytes(b""), "chunk-00001.parquet", "meta"),
    "chunk a foreign Parquet file": (lambda f: pq.write_table(pa.table({"x": [1, 2]}), f / "chunk-00000.parquet"),
                                     "chunk-00000.parquet", "meta"),
    "chunk of another schema version": (lambda f: _rewrite_chunk(f, lambda t: t.replace_schema_metadata(
        {**t.schema.metadata, b"moekit.trace.schema_version": b"9"})), "schema version 9", "meta"),
    "chunk with other columns": (lambda f: _rewrite_chunk(f, lambda t: t.drop_columns(["weights_L0"])),
                                 "columns do not match", "meta"),
    "chunk rows != manifest": (lambda f: _rewrite_chunk(f, lambda t: t.slice(0, 10)), "rows", "meta"),
    "chunk page CRC mismatch": (_flip_payload, "chunk-00000.parquet is truncated or corrupted", "ids"),
    "chunk expert id out of range": (lambda f: _rewrite_chunk(f, _ids_out_of_range), "routes to expert 200", "ids"),
    "chunk expert chosen twice": (lambda f: _rewrite_chunk(f, _ids_twice), "twice", "ids"),
    "chunk domain not in manifest": (lambda f: _rewrite_chunk(f, _rename_domain), "domains", "domain"),
    "chunk activation stats missing": (lambda f: _rewrite_chunk(f, lambda t: _drop_metadata_key(
        t, b"moekit.trace.act_max_out")), "activation statistics", "stats"),
}


# ---------------------------------------------------------------------------------------------------------- SGLang


def sglang_per_token(path: Path, **record_changes) -> Path:
    """A small valid per_token dump (SGLang's _DetailAccumulator format), with optional changes to its one record."""
    n, layers, k = 5, 3, 2
    ids = torch.full((layers, n, 8), -1, dtype=torch.int32)
    ids[1:, :, :k] = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]], dtype=torch.int32)
    record = dict(forward_pass_id=0, rank=0, gatherer_key="primary", input_ids=list(range(n)), positions=list(range(n)),
                  extend_seq_lens=[n], forward_mode=1, topk_ids_of_layer=ids, misc_objects=[],
                  global_physical_count=torch.zeros(layers, 4, dtype=torch.int32))
    record.update(record_changes)
    torch.save({"records": [record], "last_physical_to_logical_map": torch.arange(4).repeat(layers, 1)}, path)
    return path


def _save(obj):
    return lambda p: torch.save(obj, p)


# name -> (write(path), text the error line must hold)
SGLANG = {
    "not a file": (lambda p: None, "no file at"),
    "not a torch file": (lambda p: p.write_bytes(b"not a torch file at all"), "cannot read"),
    "empty file": (lambda p: p.write_bytes(b""), "cannot read"),
    "a list": (_save([1, 2, 3]), "not an SGLang expert-distribution dump"),
    "a dict of something else": (_save({"weights": torch.zeros(3)}), "not an SGLang expert-distribution dump"),
    "no forward passes": (_save({"records": []}), "no forward passes"),
    "records not a list": (_save({"records": 5}), "records"),
    "record without ids": (lambda p: sglang_per_token(p, topk_ids_of_layer=None), "topk_ids_of_layer"),
    "ids of 2 dimensions": (lambda p: sglang_per_token(p, topk_ids_of_layer=torch.zeros(5, 8, dtype=torch.int32)),
                            "topk_ids_of_layer"),
    "ids as floats": (lambda p: sglang_per_token(p, topk_ids_of_layer=torch.zeros(3, 5, 8)), "topk_ids_of_layer"),
    "ids below -1": (lambda p: sglang_per_token(p, topk_ids_of_layer=torch.full((3, 5, 8), -7, dtype=torch.int32)),
                     "topk_ids_of_layer"),
    "input_ids of another length": (lambda p: sglang_per_token(p, input_ids=[1, 2]), "input_ids"),
    "input_ids not numbers": (lambda p: sglang_per_token(p, input_ids=["a"] * 5), "input_ids"),
    "extend_seq_lens not summing up": (lambda p: sglang_per_token(p, extend_seq_lens=[2, 2]), "extend_seq_lens"),
    "no forward_pass_id": (lambda p: sglang_per_token(p, forward_pass_id="first"), "forward_pass_id"),
    "ids outside the physical map": (lambda p: sglang_per_token(
        p, topk_ids_of_layer=torch.full((3, 5, 8), 9, dtype=torch.int32)), "last_physical_to_logical_map"),
    "an expert twice in a token": (lambda p: sglang_per_token(
        p, topk_ids_of_layer=torch.cat([torch.full((3, 5, 2), 1, dtype=torch.int32),
                                        torch.full((3, 5, 6), -1, dtype=torch.int32)], 2)), "twice"),
    "stat counts all zero": (_save({"rank": 0, "logical_count": torch.zeros(2, 3, 4, dtype=torch.int64)}),
                             "no expert selection"),
    "stat counts of 4 dimensions": (_save({"rank": 0, "logical_count": torch.ones(2, 2, 3, 4, dtype=torch.int64)}),
                                    "logical_count"),
    "stat counts negative": (_save({"rank": 0, "logical_count": -torch.ones(2, 3, 4, dtype=torch.int64)}),
                             "logical_count"),
}


# ---------------------------------------------------------------------------------------------------------- hardware

HARDWARE = {
    "not a mapping": ("- 1\n- 2\n", "not a mapping"),
    "a scalar": ("fast\n", "not a mapping"),
    "empty": ("", "not a mapping"),
    "YAML syntax error": ("slow_gbs: [1, 2\n", "cannot read hardware profile"),
    "binary": (b"\x00\xff\xfe\x89PNG" * 10, "cannot read hardware profile"),
    "a key missing": ("slow_tier: nvme\nslow_gbs: 7\nfast_tier: ram\nfast_gbs: 80\n", "missing compute_tflops"),
    "an unknown key": ("slow_tier: a\nslow_gbs: 7\nfast_tier: b\nfast_gbs: 80\ncompute_tflops: 1\nturbo: 9\n",
                       "unknown keys turbo"),
    "bandwidth zero": ("slow_tier: a\nslow_gbs: 0\nfast_tier: b\nfast_gbs: 80\ncompute_tflops: 1\n", "slow_gbs"),
    "bandwidth negative": ("slow_tier: a\nslow_gbs: -7\nfast_tier: b\nfast_gbs: 80\ncompute_tflops: 1\n", "slow_gbs"),
    "bandwidth text": ("slow_tier: a\nslow_gbs: fast\nfast_tier: b\nfast_gbs: 80\ncompute_tflops: 1\n", "slow_gbs"),
    "bandwidth NaN": ("slow_tier: a\nslow_gbs: .nan\nfast_tier: b\nfast_gbs: 80\ncompute_tflops: 1\n", "slow_gbs"),
    "bandwidth infinite": ("slow_tier: a\nslow_gbs: .inf\nfast_tier: b\nfast_gbs: 80\ncompute_tflops: 1\n",
                           "slow_gbs"),
    "compute true": ("slow_tier: a\nslow_gbs: 7\nfast_tier: b\nfast_gbs: 80\ncompute_tflops: true\n",
                     "compute_tflops"),
    "tier a list": ("slow_tier: [a]\nslow_gbs: 7\nfast_tier: b\nfast_gbs: 80\ncompute_tflops: 1\n", "slow_tier"),
}


# ---------------------------------------------------------------------------------------------------------- stores


# name -> (damage(store folder), text the error line must hold); the folder is a complete store of the checkpoint
STORES = {
    "manifest not JSON": (lambda s: (s / "manifest.json").write_text("{"), "is damaged"),
    "manifest a list": (lambda s: (s / "manifest.json").write_text("[]"), "is damaged"),
    "manifest of another schema": (lambda s: edit_json(s / "manifest.json", schema_version=1), "store schema 1"),
    "manifest layers not a list": (lambda s: edit_json(s / "manifest.json", layers="all"), "is damaged"),
    "manifest of another model": (lambda s: edit_json(s / "manifest.json", num_experts=8), "another model"),
    "layer file missing": (lambda s: (s / "layer_001.safetensors").unlink(), "layer_001.safetensors"),
    "layer file truncated": (lambda s: _truncate(s / "layer_001.safetensors", 5000), "layer_001.safetensors"),
    "layer file header damaged": (lambda s: flip_header_byte(s / "layer_002.safetensors"), "layer_002.safetensors"),
    "resident weights missing": (lambda s: (s / "resident.safetensors").unlink(), "resident.safetensors"),
}


# ---------------------------------------------------------------------------------------------------------- routing


def steering(*entries: dict, **doc) -> bytes:
    """A steering file (what `moekit experts find` writes) with these entries and top-level fields replaced."""
    return json.dumps({"schema": "moekit.steering", "version": 1, "meta": {}, "experts": list(entries),
                       **doc}).encode()


def _entry(**changes) -> dict:
    return {"layer": 0, "expert": 1, "action": "mask", "strength": 0.0, **changes}


# name -> (the file's bytes, or None for no file; text the error line must hold). The last four are well-formed files
# that do not fit the tiny model (3 MoE layers 0-2, 16 experts, top-4): refused against its meta-device view.
STEERING = {
    "no such file": (None, "no such file"),
    "not JSON": (b'{"schema": ', "not JSON"),
    "binary": (bytes(range(256)), "not JSON"),
    "a list": (b"[]", "schema"),
    "another schema": (steering(schema="moekit.trace"), "schema"),
    "another version": (steering(version=9), "version is 9"),
    "experts not a list": (steering(experts={"0": 1}), "experts must be a list"),
    "an entry not an object": (steering(5), "experts[0] must be an object"),
    "layer negative": (steering(_entry(layer=-1)), "experts[0].layer"),
    "expert not a number": (steering(_entry(expert="three")), "experts[0].expert"),
    "action unknown": (steering(_entry(action="boost")), "experts[0].action"),
    "strength text": (steering(_entry(action="steer", strength="strong")), "experts[0].strength"),
    "strength NaN": (b'{"schema": "moekit.steering", "version": 1, "experts": [{"layer": 0, "expert": 1, '
                     b'"action": "scale", "strength": NaN}]}', "experts[0].strength"),
    "a layer that is not an MoE layer": (steering(_entry(layer=7)), "not MoE layers"),
    "an expert beyond the model's": (steering(_entry(expert=99)), "has experts 0..15"),
    "more forced experts than top-k": (steering(*(_entry(expert=e, action="force") for e in range(5))),
                                       "force at most 4"),
}

# --routing SPEC -> text the error line must hold; the last ones parse but do not fit the tiny model
ROUTING_SPECS = {
    "hottest=1": "unknown routing policy 'hottest'",
    "topk": "needs a value",
    "topk=many": "write it like topk=2",
    "topk=0": "K must be >= 1",
    "top-p=0": "P must be > 0",
    "skip=-1": "beta must be >= 0",
    "steer=abc@0:1": "strength must be a number",
    "topk=2+": "unknown routing policy ''",
    "top-p=0.5+skip=0.3": "both choose",
    "replay=NOWHERE": "no trace there",
    "c3po=NOWHERE": "no reference file",
    "topk=99": "can select at most 16 experts",
    "rank=99": "ranks only 16 experts",
    "mask=7:1": "not MoE layers",
    "mask=0:99": "has experts 0..15",
    "force=0:1,0:2,0:3,0:4,0:5": "force at most 4",
}


# ---------------------------------------------------------------------------------------------------------- placement


def _plan_json(folder: Path, **changes) -> None:
    edit_json(folder / "plan.json", **changes)


def _topology(folder: Path, **changes) -> None:
    meta = json.loads((folder / "plan.json").read_text())
    _plan_json(folder, topology={**meta["topology"], **changes})


def _sglang_rows(folder: Path, fn) -> None:
    path = folder / "sglang.json"
    rows = json.loads(path.read_text())["physical_to_logical_map"]
    fn(rows)
    path.write_text(json.dumps({"physical_to_logical_map": rows}))


def _swap_eplb_slots(folder: Path) -> None:
    """eplb.safetensors consistent in itself, but placing two experts of layer 0 apart from sglang.json."""
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np

    t = load_np(folder / "eplb.safetensors")
    p2l = t["phy2log"].copy()
    a, b = 0, int(np.flatnonzero(p2l[0] != p2l[0, 0])[0])
    p2l[0, [a, b]] = p2l[0, [b, a]]
    l2p = t["log2phy"].copy()
    for e in (p2l[0, a], p2l[0, b]):
        slots = np.flatnonzero(p2l[0] == e)
        l2p[0, e, :] = -1
        l2p[0, e, :len(slots)] = slots
    save_np({"phy2log": p2l, "log2phy": l2p, "logcnt": t["logcnt"]}, folder / "eplb.safetensors")


# name -> (damage(plan folder), text the error line must hold). The folder is a `moekit place --gpus 2` plan of the
# tiny model's trace (3 MoE layers, 16 experts).
PLANS = {
    "no plan": (lambda f: shutil.rmtree(f), "no placement plan at"),
    "plan.json not JSON": (lambda f: (f / "plan.json").write_text('{"topology": '), "cannot read"),
    "plan.json binary": (lambda f: (f / "plan.json").write_bytes(b"\x80\x81" * 64), "cannot read"),
    "plan.json a list": (lambda f: (f / "plan.json").write_text("[]"), "not an object"),
    "topology missing": (lambda f: _plan_json(f, topology=None), "topology is not an object"),
    "topology gpus 0": (lambda f: _topology(f, gpus=0), "topology.gpus"),
    "topology slots not experts + redundant": (lambda f: _topology(f, physical_experts=99), "physical_experts"),
    "layers not a list": (lambda f: _plan_json(f, layers="0-2"), "layers"),
    "layers beyond num_hidden_layers": (lambda f: _plan_json(f, num_hidden_layers=2), "num_hidden_layers"),
    "method not text": (lambda f: _plan_json(f, method=None), "method"),
    "sglang.json missing": (lambda f: (f / "sglang.json").unlink(), "sglang.json"),
    "sglang.json not JSON": (lambda f: (f / "sglang.json").write_text("[[0, 1"), "sglang.json"),
    "sglang.json another key": (lambda f: (f / "sglang.json").write_text('{"map": []}'), "single key"),
    "sglang.json a row short": (lambda f: _sglang_rows(f, lambda r: r[1].pop()), "different lengths"),
    "sglang.json an expert out of range": (lambda f: _sglang_rows(f, lambda r: r[1].__setitem__(0, 99)),
                                           "outside [0, 16)"),
    "sglang.json an expert without a slot": (lambda f: _sglang_rows(f, lambda r: r[2].__setitem__(0, r[2][1])),
                                             "have no slot"),
    "eplb.safetensors missing": (lambda f: (f / "eplb.safetensors").unlink(), "eplb.safetensors"),
    "eplb.safetensors truncated": (lambda f: _truncate(f / "eplb.safetensors", 60), "eplb.safetensors"),
    "eplb.safetensors another placement": (_swap_eplb_slots, "place the experts differently"),
}

# an SGLang physical_to_logical_map file given to place-eval (with --gpus 2): its bytes -> text the error line must hold
SGLANG_MAPS = {
    "not JSON": (b"{", "is not an SGLang map"),
    "another key": (b'{"map": [[0, 1]]}', "is not an SGLang map"),
    "rows of different lengths": (b'{"physical_to_logical_map": [[0, 1], [0]]}', "rectangular"),
    "no rows": (b'{"physical_to_logical_map": []}', "rectangular"),
    "floats": (b'{"physical_to_logical_map": [[0.5, 1.0]]}', "rectangular"),
    "negative ids": (b'{"physical_to_logical_map": [[-1, 0]]}', "logical expert ids"),
    "ids beyond the slots": (b'{"physical_to_logical_map": [[0, 1000000000000]]}', "logical expert ids"),
    "an expert missing in a row": (b'{"physical_to_logical_map": [[0, 1, 2, 3], [0, 0, 2, 3]]}', "have no slot"),
    "another model's": (json.dumps({"physical_to_logical_map": [list(range(8))] * 3}).encode(),
                        "the map has 3 rows of 8 experts"),
}


# ---------------------------------------------------------------------------------------------------------- other kinds


def _moe_config(folder: Path, **changes) -> None:
    """Edit the config that holds the MoE keys: a multimodal wrapper's text_config, else config.json itself. A key
    given as "a|b" edits whichever of the two the config has (hidden_size in causal LMs, d_model in T5-style ones)."""
    data = json.loads((folder / "config.json").read_text())
    target = data["text_config"] if isinstance(data.get("text_config"), dict) else data
    for key, value in changes.items():
        name = next((k for k in key.split("|") if k in target), key.split("|")[0])
        target[name] = value(target.get(name)) if callable(value) else value
    (folder / "config.json").write_text(json.dumps(data))


def _drop_expert_tensor(folder: Path) -> None:
    edit_weights(folder, lambda t: t.pop(next(k for k in sorted(t) if ".experts." in k or "expert_" in k)))


# damages that apply to every kind of checkpoint (a multimodal wrapper, an encoder-decoder model, hash-routed and loop
# layers): name ->
# (damage(folder), text the error line must hold)
KIND_CHECKPOINTS = {
    "weights truncated": CHECKPOINTS["weights truncated"],
    "weights header byte flipped": CHECKPOINTS["weights header byte flipped"],
    "no weights": CHECKPOINTS["no weights"],
    "unknown model_type": CHECKPOINTS["unknown model_type"],
    "hidden size != weights": (lambda f: _moe_config(f, **{"hidden_size|d_model": lambda v: 2 * v}),
                               "by config.json"),
    "expert count != weights": (lambda f: _moe_config(f, **{"num_experts|num_local_experts|n_routed_experts":
                                                               lambda v: v // 2}),
                                "by config.json"),
    "an expert tensor missing": (_drop_expert_tensor, "experts"),
    "no tokenizer": TOKENIZERS["no tokenizer"],
    "generation_config.json not JSON": (lambda f: (f / "generation_config.json").write_text("{"),
                                        "generation_config.json"),
}


def _npz(path: Path, **changes) -> None:
    """A C3PO reference file (moekit.routing.c3po.Reference.save's format) for the tiny model, arrays replaced."""
    arrays = {"embeddings": np.zeros((2, 384), np.float32), "omegas": np.full((2, 3, 16), 1 / 16, np.float32),
              "meta": np.array(json.dumps({"version": 1, "layers": [0, 1, 2]})), **changes}
    with open(path, "wb") as f:
        np.savez(f, **{k: v for k, v in arrays.items() if v is not None})


def _npz_meta(path: Path, meta) -> None:
    _npz(path, meta=np.array(json.dumps(meta)))


# name -> (write(path), text the error line must hold): the reference file of --routing c3po=FILE
REFERENCES = {
    "text": (lambda p: p.write_text("hello"), "not an .npz archive"),
    "empty": (lambda p: p.write_bytes(b""), "not a C3PO reference file"),
    "truncated": (lambda p: (_npz(p), _truncate(p, 300)), "not a C3PO reference file"),
    "a .npy array": (lambda p: np.save(p.open("wb"), np.zeros(3)), "single .npy array"),
    "no meta": (lambda p: _npz(p, meta=None), "meta"),
    "meta not JSON": (lambda p: _npz(p, meta=np.array("{")), "not a C3PO reference file"),
    "meta a list": (lambda p: _npz_meta(p, [1]), "meta.layers"),
    "layers not a list": (lambda p: _npz_meta(p, {"version": 1, "layers": 5}), "meta.layers"),
    "another version": (lambda p: _npz_meta(p, {"version": 9, "layers": [0, 1, 2]}), "reference version 9"),
    "omegas a scalar": (lambda p: _npz(p, omegas=np.float32(1)), "omegas must be floats"),
    "omegas text": (lambda p: _npz(p, omegas=np.array([["a"]])), "omegas must be floats"),
    "omegas of objects": (lambda p: _npz(p, omegas=np.array([None, 1], dtype=object)), "allow_pickle"),
    "omegas NaN": (lambda p: _npz(p, omegas=np.full((2, 3, 16), np.nan, np.float32)), "non-finite"),
    "embeddings of another width": (lambda p: _npz(p, embeddings=np.zeros((2, 5), np.float32)), "[N, 384]"),
    "embeddings and omegas of other counts": (lambda p: _npz(p, embeddings=np.zeros((3, 384), np.float32)),
                                              "omegas must be floats [N=3"),
    "another model's": (lambda p: _npz(p, omegas=np.full((2, 2, 8), 1 / 8, np.float32),
                                       meta=np.array(json.dumps({"version": 1, "layers": [0, 1]}))), "another model"),
}
