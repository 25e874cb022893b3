"""Low-bit expert copies (HOBBIT, arXiv 2411.01433): the dequantised read is exactly compress.quantize's RTN of the stored
expert, along the input dimension in both layouts; bytes, error bounds, idempotence, atomic builds, bad input."""

from __future__ import annotations

import os

import pytest
import torch

import moekit.models
import moekit.runtime as rt
import moekit.runtime.store as store_mod
from moekit.compress.quantize import dequantize_expert, dequantize_matrix, quantize_expert, quantize_matrix
from moekit.errors import UserError
from moekit.runtime.lowbit import LowBitStore, build_lowbit
from moekit.runtime.store import canonical
from tests.conftest import tiny_model

FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]  # [out, in] slices; [out, in] with I != H; transposed with biases
G = 16  # divides the tiny models' H = 32 and I = 16 / 48
MAX_REL_ERROR = {8: 0.01, 4: 0.15}  # measured worst over all experts: 0.0045 at 8 bits, 0.074 at 4 bits


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    """(view, store dir) with 8- and 4-bit copies built."""
    view = moekit.models.load(tiny_model(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    rt.build_store(view, directory)
    for bits in MAX_REL_ERROR:
        build_lowbit(directory, bits, G)
    return view, directory


def _experts(store):
    return [(li, e) for li in store.manifest["layers"] for e in range(store.manifest["num_experts"])]


def _reference(w: torch.Tensor, bits: int, transposed: bool) -> torch.Tensor:
    """RTN along the input dimension: dim 1 of an [out, in] slice, dim 0 of a transposed [in, out] slice."""
    if transposed:
        return dequantize_matrix(quantize_matrix(w.T, bits, G), w.dtype).T
    return dequantize_matrix(quantize_matrix(w, bits, G), w.dtype)


@pytest.mark.parametrize("bits", sorted(MAX_REL_ERROR))
def test_read_is_rtn_of_the_stored_expert(built, bits):
    view, directory = built
    full, low = rt.ExpertStore(directory), LowBitStore(directory, bits)
    transposed = view.layers[0].layout.transposed
    worst = 0.0
    for li, e in _experts(full):
        w, got = full.read(li, e), low.read(li, e)
        assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in w.items()}
        for name, t in w.items():
            if name.endswith("bias"):
                assert torch.equal(got[name], t), f"layer {li} expert {e} {name}: biases are kept exact"
                continue
            ref = _reference(t, bits, transposed)
            diff = (got[name] - ref).abs().max()
            assert torch.equal(got[name], ref), f"layer {li} expert {e} {name}: max diff {diff:.3g} vs direct RTN"
            worst = max(worst, ((got[name] - t).norm() / t.norm()).item())
    assert 0 < worst < MAX_REL_ERROR[bits], f"{bits}-bit worst relative error {worst:.4f}"
    full.close()
    low.close()


def test_groups_run_along_the_input_dimension(built):
    """Canonical gate/up/down of the copy == compress.quantize on the canonical [out, in] expert, bit for bit."""
    view, directory = built
    low = LowBitStore(directory, 4)
    for layer in view.layers:
        for e in (0, layer.num_experts - 1):
            w = layer.get_expert(e)
            expect = dequantize_expert(w, quantize_expert(w, 4, G))
            got = canonical(low.read(layer.index, e), layer.layout)
            assert set(got) == set(expect)
            for k in expect:
                assert torch.equal(got[k], expect[k]), f"layer {layer.index} expert {e} {k}"
    low.close()


@pytest.mark.parametrize("bits", sorted(MAX_REL_ERROR))
def test_bytes_per_expert(built, bits):
    _, directory = built
    full, low = rt.ExpertStore(directory), LowBitStore(directory, bits)
    w = full.read(full.manifest["layers"][0], 0)
    matrix = sum(t.numel() for k, t in w.items() if not k.endswith("bias"))
    bias = sum(t.numel() * t.element_size() for k, t in w.items() if k.endswith("bias"))
    # codes at `bits` per weight + per group a float16 scale and a uint8 zero point; biases as they are
    assert low.expert_bytes == matrix * bits // 8 + matrix // G * 3 + bias
    assert low.expert_bytes < full.expert_bytes * (bits / 32 + 3 / (4 * G)) + bias + 1  # float32 experts
    full.close()
    low.close()


@pytest.mark.parametrize("drop_cache", [False, True])
def test_one_positioned_read_per_expert(built, drop_cache, monkeypatch):
    _, directory = built
    low, plain = LowBitStore(directory, 4, drop_cache=drop_cache), LowBitStore(directory, 4)
    calls = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: calls.append(a[2]) or preadv(*a))
    expect = plain.read(1, 3)
    calls.clear()
    got = low.read(1, 3)
    assert len(calls) == 1 and low.bytes_read == low.expert_bytes
    assert all(torch.equal(got[k], expect[k]) for k in expect)
    low.close()
    plain.close()


def test_build_is_idempotent(built):
    _, directory = built
    files = sorted((directory / "lowbit4").iterdir())
    before = {f.name: f.stat().st_mtime_ns for f in files}
    assert build_lowbit(directory, 4, G) == directory / "lowbit4"
    assert {f.name: f.stat().st_mtime_ns for f in sorted((directory / "lowbit4").iterdir())} == before
    with pytest.raises(UserError, match="another store or group size"):
        build_lowbit(directory, 4, 8)  # divides every input dimension


def test_bad_input_is_a_user_error(built):
    _, directory = built
    with pytest.raises(UserError, match="bits in"):
        build_lowbit(directory, 5, G)
    with pytest.raises(UserError, match="does not divide"):
        build_lowbit(directory, 2, 24)  # a multiple of 8 that divides neither H = 32 nor I
    with pytest.raises(UserError, match="multiple of 8"):
        build_lowbit(directory, 2, 12)
    assert not (directory / "lowbit5").exists() and not (directory / "lowbit2").exists()
    with pytest.raises(UserError, match="build_lowbit"):
        LowBitStore(directory, 2)
    with pytest.raises(UserError, match="holds low-bit copies"):
        build_lowbit(directory / "lowbit4", 4, G)


def test_killed_build_leaves_no_partial_layer_file(tmp_path, monkeypatch):
    view = moekit.models.load(tiny_model("qwen3_moe"))
    rt.build_store(view, tmp_path)
    real_save = store_mod.save_file
    written = []

    def dies_on_second_layer(tensors, path, metadata=None):
        if written:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # the process dies mid-write
            raise KeyboardInterrupt
        written.append(path)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(store_mod, "save_file", dies_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        build_lowbit(tmp_path, 4, G)
    out = tmp_path / "lowbit4"
    assert sorted(f.name for f in out.iterdir()) == [f"layer_{view.layers[0].index:03d}.safetensors"]
    with pytest.raises(UserError, match="no manifest"):
        LowBitStore(tmp_path, 4)

    monkeypatch.setattr(store_mod, "save_file", real_save)
    build_lowbit(tmp_path, 4, G)  # no manifest: rebuilt from scratch
    full, low = rt.ExpertStore(tmp_path), LowBitStore(tmp_path, 4)
    for li, e in _experts(full):
        assert torch.equal(low.read(li, e)["down"], _reference(full.read(li, e)["down"], 4, False))
    full.close()
    low.close()
