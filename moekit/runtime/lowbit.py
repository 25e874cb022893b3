"""Low-bit expert copies for mixed-precision loading (HOBBIT, Tang et al., arXiv 2411.01433): on a cache miss a less
important expert (small gating weight) is read as a low-bit copy, fewer bytes than at full precision. This file is the
store side: `build_lowbit` writes the copies next to an expert store, `LowBitStore.read` returns them dequantised in
the names, shapes and dtype of `ExpertStore.read`, so the engine feeds them to the same kernel.

Quantiser: compress/quantize.py's group-wise asymmetric RTN (`quantize_matrix`: uint8 codes, float16 scale, uint8
integer zero point per group), not a second one. Orientation: groups run along the input (reduction) dimension of each
matrix as the kernel uses it, as in compress/quantize.py, which quantises the canonical [out, in] matrices along dim 1.
The store holds native slices: F.linear families store gate_up [2I, H] and down [H, I] ([out, in]: groups along dim 1);
transposed families (GPT-OSS, x @ W) store gate_up [H, 2I] and down [I, H] ([in, out]): these are quantised as
w.T ([out, in]), i.e. groups along dim 0 of the stored slice, and transposed back after dequantisation. The fused
gate_up rows are the canonical gate and up rows (concatenated or interleaved), each row quantised on its own, so the
dequantised copy equals compress.quantize's `dequantize_expert` of the canonical expert, bit for bit (tests check).

Layout (`{store}/lowbit{bits}/`, lowbit schema version 1, `manifest.json` next to the files):
  layer_{index:03d}.safetensors, per expert e and matrix m in (gate_up, down):
    "{e:05d}.{m}.codes"  uint8 [ceil(R * C * bits / 8)]  codes of the [R, C] = [out, in] matrix, pack_codes bit stream
    "{e:05d}.{m}.scale"  uint8 [R, 2 * N]                 float16 scales [R, N] as raw bytes (N = C / group_size)
    "{e:05d}.{m}.zero"   uint8 [R, N]                     integer zero points
    "{e:05d}.{m}_bias"   uint8 [bytes]                    the bias in the store's dtype as raw bytes (tiny: kept exact)
Every tensor is uint8 because safetensors orders tensors by dtype before name: one dtype keeps an expert's tensors
adjacent, so a read is one positioned read, by ExpertStore's own reader (O_DIRECT / FADV_DONTNEED with drop_cache).
The manifest records the real dtypes and shapes, the width, group size and a copy of the source store's manifest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.compress.quantize import (
    BITS,
    QuantizedMatrix,
    check_group_size,
    dequantize_matrix,
    pack_codes,
    quantize_matrix,
    unpack_codes,
)
from moekit import files
from moekit.errors import UserError
from moekit.runtime import store as _store
from moekit.runtime.store import ExpertStore

LOWBIT_SCHEMA_VERSION = 1
MATRICES = ("gate_up", "down")

def lowbit_dir(store_dir, bits: int) -> Path:
    return Path(store_dir) / f"lowbit{bits}"


def build_lowbit(store_dir, bits: int = 4, group_size: int | None = None, *, progress=None) -> Path:
    """Write `bits`-bit copies of every expert of the store in `store_dir` to `store_dir/lowbit{bits}/`; returns it.
    group_size None: 64, or the largest power of two below it dividing every matrix's input dimension.

    Idempotent: existing copies with the same width, group size and source store are kept. Every file is written to a
    temporary name and renamed, and the manifest comes last: a killed build leaves no half-written layer file, and a
    directory without a manifest is rebuilt from scratch.
    """
    source = ExpertStore(store_dir)
    try:
        if "lowbit_schema_version" in source.manifest:
            raise UserError(f"{store_dir} holds low-bit copies; pass the full-precision store they belong to")
        group_size = group_size or _default_group_size(source.manifest)
        specs = _specs(source.manifest, bits, group_size)
        directory = lowbit_dir(store_dir, bits)
        manifest = _manifest(source.manifest, bits, group_size, specs)
        if (directory / "manifest.json").is_file():
            if _store.read_manifest(directory) == manifest:
                return directory
            raise UserError(f"{directory} holds low-bit copies of another store or group size; remove it first")
        directory.mkdir(parents=True, exist_ok=True)
        files.remove_stale(directory, "*")  # a killed build's temporary files
        for li in source.manifest["layers"]:
            tensors = {}
            for e in range(source.manifest["num_experts"]):
                for name, t in _encode(source.read(li, e), specs, bits, group_size).items():
                    tensors[f"{e:05d}.{name}"] = t
            _store._save_atomic(tensors, directory / f"layer_{li:03d}.safetensors",  # atomic: temp file + rename
                                {"moekit_lowbit": str(LOWBIT_SCHEMA_VERSION)})
            if progress is not None:
                progress()
    finally:
        source.close()
    files.write_json(directory / "manifest.json", manifest)
    return directory


def _default_group_size(source: dict) -> int:
    """64, or the largest smaller power of two dividing every matrix's input dimension (tiny models)."""
    t = source["layout"]["transposed"]
    inputs = [shape[0] if t else shape[1] for name, shape in source["shapes"].items() if name in MATRICES]
    return next((g for g in (64, 32, 16, 8) if all(c % g == 0 for c in inputs)), 64)


def _specs(source: dict, bits: int, group_size: int) -> dict[str, dict]:
    """Store name -> how it is encoded: matrices with their [R, C] = [out, in] shape; biases kept as raw bytes."""
    if bits not in BITS:
        raise UserError(f"low-bit copies need bits in {', '.join(map(str, BITS))}, got {bits}")
    transposed = source["layout"]["transposed"]
    check_group_size(group_size)
    dtype = source["dtype"].removeprefix("torch.")
    specs = {}
    for name, shape in source["shapes"].items():
        if name not in MATRICES:
            specs[name] = {"kind": "bias", "shape": shape, "dtype": dtype}
            continue
        rows, cols = (shape[1], shape[0]) if transposed else (shape[0], shape[1])  # [out, in]
        if cols % group_size:
            raise UserError(f"group size {group_size} does not divide the input dimension {cols} of {name} "
                            f"(native shape {shape}); choose a divisor of {cols} that is a multiple of 8")
        specs[name] = {"kind": "matrix", "shape": shape, "dtype": dtype, "transposed": transposed,
                       "rows": rows, "cols": cols, "groups": cols // group_size}
    return specs


def _manifest(source: dict, bits: int, group_size: int, specs: dict) -> dict:
    return {
        "schema_version": _store.SCHEMA_VERSION,  # the file layout ExpertStore reads (adjacent per-expert ranges)
        "lowbit_schema_version": LOWBIT_SCHEMA_VERSION,  # the encoding below
        "format": "group-wise asymmetric RTN (moekit.compress.quantize), groups along the input dimension",
        "bits": bits,
        "group_size": group_size,
        "layers": source["layers"],
        "num_experts": source["num_experts"],
        "tensors": specs,
        "source": source,
    }


def _encode(w: dict[str, torch.Tensor], specs: dict, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """One expert's native tensors -> its uint8 tensors (names relative to the expert)."""
    out = {}
    for name, t in w.items():
        spec = specs[name]
        if spec["kind"] == "bias":
            out[name] = t.contiguous().view(torch.uint8).clone()
            continue
        q = quantize_matrix((t.T if spec["transposed"] else t).contiguous(), bits, group_size)  # [out, in]
        out[f"{name}.codes"] = pack_codes(q.codes, bits)
        out[f"{name}.scale"] = q.scale.contiguous().view(torch.uint8)  # [R, 2N]
        out[f"{name}.zero"] = q.zero.contiguous()
    return out


class LowBitStore(ExpertStore):
    """Reads the `bits`-bit copies of a store: `read(layer, e, dtype)` -> the dequantised native tensors, same names,
    shapes and (by default) dtype as `ExpertStore.read`. `expert_bytes` and `bytes_read` count the low-bit bytes.
    One positioned read per expert through ExpertStore's reader (drop_cache: O_DIRECT or FADV_DONTNEED)."""

    def __init__(self, store_dir, bits: int, *, drop_cache: bool = False):
        directory = lowbit_dir(store_dir, bits)
        path = directory / "manifest.json"
        if not path.is_file():
            raise UserError(f"{directory} holds no low-bit copies (no manifest.json); build them with build_lowbit")
        manifest = _store.read_manifest(directory)
        if manifest.get("lowbit_schema_version") != LOWBIT_SCHEMA_VERSION:
            raise UserError(f"{directory}: low-bit schema {manifest.get('lowbit_schema_version')}, this moekit reads "
                            f"{LOWBIT_SCHEMA_VERSION}; rebuild with build_lowbit")
        super().__init__(directory, drop_cache=drop_cache)
        self.bits, self.group_size = manifest["bits"], manifest["group_size"]
        self._specs = manifest["tensors"]
        self.dtype = getattr(torch, next(iter(self._specs.values()))["dtype"])

    def read(self, layer: int, e: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        raw = super().read(layer, e)
        dtype = dtype or self.dtype
        out = {}
        for name, spec in self._specs.items():
            if spec["kind"] == "bias":  # clone: the slice may sit at an offset the wider dtype cannot view
                out[name] = raw[name].clone().view(getattr(torch, spec["dtype"])).view(spec["shape"]).to(dtype)
            else:
                out[name] = self._dequantize(raw, name, spec, dtype)
        return out

    def _dequantize(self, raw: dict, name: str, spec: dict, dtype: torch.dtype) -> torch.Tensor:
        r, c = spec["rows"], spec["cols"]
        codes = unpack_codes(raw[f"{name}.codes"], self.bits, r * c).view(r, c)
        scale = raw[f"{name}.scale"].clone().view(torch.float16)  # [R, N]
        w = dequantize_matrix(QuantizedMatrix(codes, scale, raw[f"{name}.zero"], self.bits, (r, c)), dtype)  # [R, C]
        return w.T.contiguous() if spec["transposed"] else w
