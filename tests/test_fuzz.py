"""Fuzzing every reader of user files with hypothesis: whatever the bytes or values, the only exception that escapes is
UserError (the CLI prints it as one line), and a file that is read is read through to the end.

Readers: the trace manifest and chunks (moekit.trace.open + Trace.verify), SGLang dumps (import_sglang), the expert
store (manifest and layer files: ExpertStore + every expert read), hardware profiles (load_profile) and checkpoint
validation (open_checkpoint: config.json, safetensors headers, the sharded index). Bounded for the normal suite:
FUZZ_EXAMPLES examples each (MOEKIT_FUZZ_EXAMPLES=2000 for a long run), no deadline."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moekit.trace
from moekit.errors import UserError
from moekit.models.validate import open_checkpoint
from moekit.runtime.checkpoint import build_store_from_checkpoint
from moekit.runtime.hardware import load_profile
from moekit.runtime.store import ExpertStore
from moekit.trace import TraceOptions
from moekit.trace.sglang import import_sglang
from tests.bad_inputs import shard, sglang_per_token
from tests.trace.helpers import save_checkpoint, write_corpus

FUZZ_EXAMPLES = int(os.environ.get("MOEKIT_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
DELETE = object()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)


def edits(keys: list[str]):
    """Up to 3 changes to a JSON object: a key (existing or new) set to any JSON value, or deleted."""
    return st.lists(st.tuples(st.sampled_from([*keys, "extra"]), json_values | st.just(DELETE)), min_size=1, max_size=3)


def apply_edits(file: Path, changes) -> None:
    """Rewrite the JSON object in `file` with the changes `edits` drew."""
    obj = json.loads(file.read_text())
    for key, value in changes:
        if value is DELETE:
            obj.pop(key, None)
        else:
            obj[key] = value
    file.write_text(json.dumps(obj))


def byte_damage(size: int):
    """Up to 8 bytes overwritten (anywhere), and the file perhaps cut short."""
    return st.tuples(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), max_size=8),
                     st.none() | st.integers(0, size))


def damage_bytes(data: bytes, damage) -> bytes:
    writes, cut = damage
    out = bytearray(data)
    for at, value in writes:
        out[at] = value
    return bytes(out[:cut] if cut is not None else out)


def damage_header(data, file: Path) -> None:
    """Up to 8 bytes overwritten within a safetensors file's header (8-byte length + JSON; the tensor data has no
    checksum, so damage there is undetectable by design) or anywhere in a JSON file, and the file perhaps cut short."""
    raw = file.read_bytes()
    header = min(len(raw), 8 + int.from_bytes(raw[:8], "little")) if file.suffix == ".safetensors" else len(raw)
    writes = data.draw(st.lists(st.tuples(st.integers(0, max(header - 1, 0)), st.integers(0, 255)), max_size=8))
    file.write_bytes(damage_bytes(raw, (writes, data.draw(st.none() | st.integers(0, len(raw))))))


def only_user_errors(fn) -> None:
    try:
        fn()
    except UserError:
        pass


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    ckpt = save_checkpoint(root / "ckpt")
    txt, _ = write_corpus(root / "data")
    moekit.trace.record(str(ckpt), [str(txt)], root / "trace", options=TraceOptions(seq_len=32, chunk_tokens=64,
                                                                                    activation_stats=True))
    build_store_from_checkpoint(ckpt, root / "store")
    sharded = shutil.copytree(ckpt, root / "sharded")
    shard(sharded)
    sglang_per_token(root / "dump.pt")
    return root


def _copy(src: Path) -> tuple[tempfile.TemporaryDirectory, Path]:
    tmp = tempfile.TemporaryDirectory()
    dst = Path(tmp.name) / src.name
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    return tmp, dst


def _read_trace(folder: Path) -> None:
    trace = moekit.trace.open(folder)
    trace.verify()
    trace.counts()
    if trace.kind == "tokens":
        trace.seq_id, trace.position, trace.token_id  # noqa: B018


# ---------------------------------------------------------------------------------------------------- traces

MANIFEST_KEYS = ["schema_version", "kind", "layers", "num_experts", "top_k", "chunks", "tokens", "sequences",
                 "domain_names", "completed", "logits", "activation_stats", "model"]


@FUZZ
@given(changes=edits(MANIFEST_KEYS))
def test_fuzz_trace_manifest_values(good, changes):
    tmp, trace = _copy(good / "trace")
    with tmp:
        apply_edits(trace / "manifest.json", changes)
        only_user_errors(lambda: _read_trace(trace))


@FUZZ
@given(data=st.data())
def test_fuzz_trace_manifest_and_chunk_bytes(good, data):
    tmp, trace = _copy(good / "trace")
    with tmp:
        name = data.draw(st.sampled_from(["manifest.json", "chunk-00000.parquet", "chunk-00001.parquet"]))
        raw = (trace / name).read_bytes()
        (trace / name).write_bytes(damage_bytes(raw, data.draw(byte_damage(len(raw)))))
        only_user_errors(lambda: _read_trace(trace))


# ---------------------------------------------------------------------------------------------------- SGLang dumps

small_ints = st.integers(-3, 12)
tensors = st.builds(
    lambda shape, dtype, fill: torch.tensor(fill[:1] * int(torch.tensor(shape).prod()) if fill else [0] * int(
        torch.tensor(shape).prod()), dtype=dtype).reshape(shape),
    st.lists(st.integers(0, 5), min_size=0, max_size=4), st.sampled_from([torch.int32, torch.int64, torch.float32,
                                                                           torch.bool]),
    st.lists(small_ints, max_size=1))
int_lists = st.lists(small_ints, max_size=6)
field_values = st.one_of(st.none(), small_ints, st.text(max_size=4), int_lists, tensors)
records = st.fixed_dictionaries({
    "forward_pass_id": st.one_of(st.integers(0, 5), st.text(max_size=2), st.none()),
    "input_ids": st.one_of(int_lists, field_values),
    "positions": st.one_of(int_lists, field_values),
    "extend_seq_lens": st.one_of(st.none(), int_lists, field_values),
    "topk_ids_of_layer": st.one_of(tensors, field_values),
})
dumps = st.one_of(
    st.fixed_dictionaries({"records": st.lists(records, max_size=3),
                           "last_physical_to_logical_map": st.one_of(st.none(), tensors)}),
    st.fixed_dictionaries({"logical_count": st.one_of(tensors, field_values)}),
    json_values,
)


@FUZZ
@given(dump=dumps, top_k=st.none() | st.integers(-1, 4))
def test_fuzz_sglang_dump_structure(dump, top_k):
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(dump, Path(tmp) / "dump.pt")
        only_user_errors(lambda: import_sglang(Path(tmp) / "dump.pt", Path(tmp) / "t", top_k=top_k))
        if (Path(tmp) / "t").exists():
            _read_trace(Path(tmp) / "t")  # what it imports reads back


@FUZZ
@given(data=st.data())
def test_fuzz_sglang_dump_bytes(good, data):
    raw = (good / "dump.pt").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dump.pt").write_bytes(damage_bytes(raw, data.draw(byte_damage(len(raw)))))
        only_user_errors(lambda: import_sglang(Path(tmp) / "dump.pt", Path(tmp) / "t"))


# ---------------------------------------------------------------------------------------------------- expert store


def _read_store(folder: Path) -> None:
    store = ExpertStore(folder)
    try:
        for layer in store.manifest["layers"]:
            for e in range(store.manifest["num_experts"]):
                store.read(layer, e)
    finally:
        store.close()


@FUZZ
@given(data=st.data())
def test_fuzz_expert_store(good, data):
    tmp, store = _copy(good / "store")
    with tmp:
        if data.draw(st.booleans()):
            apply_edits(store / "manifest.json", data.draw(edits(["schema_version", "layers", "num_experts",
                                                                   "model_type"])))
        else:
            damage_header(data, store / data.draw(st.sampled_from(["manifest.json", "layer_000.safetensors",
                                                                    "layer_002.safetensors"])))
        only_user_errors(lambda: _read_store(store))


# ---------------------------------------------------------------------------------------------------- hardware

HARDWARE_KEYS = ["name", "slow_tier", "slow_gbs", "fast_tier", "fast_gbs", "compute_tflops", "source"]
yaml_values = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.lists(
    st.integers(), max_size=3)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.dictionaries(st.sampled_from([*HARDWARE_KEYS, "turbo"]), yaml_values).map(yaml.safe_dump)),
       raw=st.booleans())
def test_fuzz_hardware_profile(text, raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hw.yaml"
        path.write_bytes(text.encode("latin-1", errors="replace") if raw else text.encode("utf-8", errors="replace"))
        only_user_errors(lambda: load_profile(str(path)))


# ---------------------------------------------------------------------------------------------------- checkpoints

CONFIG_KEYS = ["model_type", "hidden_size", "num_hidden_layers", "num_local_experts", "num_experts_per_tok",
               "moe_intermediate_size", "vocab_size", "num_attention_heads", "head_dim", "architectures",
               "tie_word_embeddings", "dtype"]


@FUZZ
@given(changes=edits(CONFIG_KEYS))
def test_fuzz_checkpoint_config(good, changes):
    tmp, ckpt = _copy(good / "ckpt")
    with tmp:
        apply_edits(ckpt / "config.json", changes)
        only_user_errors(lambda: open_checkpoint(ckpt))


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_files(good, data):
    tmp, ckpt = _copy(good / data.draw(st.sampled_from(["ckpt", "sharded"])))
    with tmp:
        names = sorted(p.name for p in ckpt.iterdir() if p.suffix in (".json", ".safetensors"))
        damage_header(data, ckpt / data.draw(st.sampled_from(names)))
        only_user_errors(lambda: open_checkpoint(ckpt, tokenizer=True))
