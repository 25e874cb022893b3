"""Expert store: every routed expert of a checkpoint unfused into its own byte range on disk, one safetensors file per
MoE layer, read back one expert at a time with a single positioned read.

Layout (schema version 2, `manifest.json` next to the files, written last):
  layer_{index:03d}.safetensors  "{e:05d}.gate_up", "{e:05d}.down" (+ "{e:05d}.gate_up_bias", "{e:05d}.down_bias")
  resident.safetensors           every other parameter and buffer by in-memory name (see resident_tensors), so a run
                                 rebuilds the model from the store without reading the checkpoint's experts
Each tensor is the family's *native* per-expert slice (`experts.gate_up_proj[e]` etc.: concatenated or interleaved
gate/up, transposed where the family stores it transposed), not the canonical gate/up/down of `MoELayer.get_expert`:
computing with the native slice and the experts module's own gate function reproduces transformers' eager forward bit
for bit, while the canonical split drifts by ~1e-10 (float32, measured on qwen3_moe/mixtral/gpt_oss). `canonical()`
converts for readers. safetensors writes tensors sorted by name, so an expert's tensors are adjacent: one `os.preadv`
per expert, no mmap, so the reader controls the page cache: POSIX_FADV_RANDOM (no readahead), and with drop_cache
O_DIRECT reads (no page cache, no kernel copy) or, where the file system refuses O_DIRECT, POSIX_FADV_DONTNEED after
each read, so the OS page cache cannot hide disk reads in benchmarks. The files stay ordinary safetensors files
(`safe_open` reads them; tests check).
Without drop_cache the OS page cache is a free tier below the budget: an expert whose pages are resident costs a copy,
not a disk read. Each buffered read first asks for the bytes with RWF_NOWAIT (Linux >= 4.14: served only from the page
cache, never waiting on the disk) and reads the rest normally, which both keeps that promise and counts it
(`page_cache_bytes`: expert bytes the page cache served).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import os
import struct
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moekit import files
from moekit.errors import UserError, describe

SCHEMA_VERSION = 2  # 2: resident.safetensors (non-expert weights) next to the expert files
RESIDENT = "resident.safetensors"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8}  # U8: lowbit.py


def _native_names(layout) -> dict[str, str]:
    """store name -> fused parameter name of the experts module."""
    names = {"gate_up": "gate_up_proj" if layout.has_gate else "up_proj", "down": "down_proj"}
    if layout.has_bias:
        names["gate_up_bias"] = names["gate_up"] + "_bias"
        names["down_bias"] = "down_proj_bias"
    return names


def build_store(view, directory, *, progress=None) -> Path:
    """Write every routed expert of `view` (a moekit MoEView with real weights) and its resident (non-expert) weights
    to `directory`; returns it. Idempotent: an existing store whose manifest matches the model is kept.
    `moekit.runtime.checkpoint.build_store_from_checkpoint` writes the same store without holding the model in RAM."""
    fused = ((layer.index, {k: getattr(layer.experts, v).detach() for k, v in _native_names(layer.layout).items()})
             for layer in view.layers)
    return write_store(directory, _manifest(view), fused, resident_tensors(view), progress=progress)


def write_store(directory, manifest: dict, fused, resident: tuple[dict, dict], *, progress=None) -> Path:
    """fused: iterable of (layer index, {store name: fused tensor [E, ...]}), consumed one layer at a time (a caller
    may load each layer lazily); resident: (tensors, aliases) from `resident_tensors`."""
    directory = Path(directory)
    if (directory / "manifest.json").is_file():
        if read_manifest(directory) == manifest:
            return directory
        raise UserError(f"{directory} holds an expert store of another model; remove it or choose another --store")
    with files.disk_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)
    files.remove_stale(directory, "*")  # a killed build's temporary files
    for index, tensors in fused:
        num = next(iter(tensors.values())).shape[0]
        per_expert = {f"{e:05d}.{k}": t[e].contiguous() for e in range(num) for k, t in tensors.items()}
        _save_atomic(per_expert, directory / f"layer_{index:03d}.safetensors")
        del per_expert, tensors
        if progress is not None:
            progress()
    tensors, aliases = resident
    _save_atomic(tensors, directory / RESIDENT, {"aliases": json.dumps(aliases)})
    files.write_json(directory / "manifest.json", manifest)  # last: marks the store complete
    return directory


def _save_atomic(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write to a temporary name, then rename (moekit.files.atomic_file): a failed or killed build leaves no
    half-written file under `path`'s name."""
    with files.atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"moekit_store": str(SCHEMA_VERSION), **(metadata or {})})


def fused_expert_tensors(view) -> set[tuple[int, str]]:
    """(id(experts module), parameter name) of every routed expert tensor the store holds: what is not resident."""
    return {(id(layer.experts), n) for layer in view.layers for n in _native_names(layer.layout).values()}


def resident_tensors(view, fetch=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and buffer (non-persistent ones included: rotary tables) except the routed experts' fused
    weights, by in-memory name (after transformers' checkpoint conversions, so loading needs none), each storage once:
    returns (tensors, aliases {tied name: stored name}). fetch(module_name, tensor_name) supplies tensors that sit on
    the meta device (offloaded by accelerate while building from a checkpoint)."""
    model = view.model
    skip = fused_expert_tensors(view)
    tensors, aliases, seen = {}, {}, {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for n, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None or (id(module), n) in skip:
                continue
            name = f"{module_name}.{n}" if module_name else n
            if t.device.type == "meta":
                t = fetch(module_name, n) if fetch is not None else t
                if t.device.type == "meta":
                    raise RuntimeError(f"{name} has no data (meta device)")
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else name
            if key in seen:
                aliases[name] = seen[key]
            elif name not in tensors:
                seen[key] = name
                tensors[name] = t.detach().contiguous()
    return tensors, aliases


def _manifest(view) -> dict:
    layer = view.layers[0]
    lay = layer.layout
    return {
        "schema_version": SCHEMA_VERSION,
        "model_type": view.model_type,
        "layers": [m.index for m in view.layers],
        "num_experts": view.num_experts,
        "dtype": str(layer.expert_params()[0].dtype),
        "layout": {"transposed": lay.transposed, "interleaved": lay.interleaved, "has_bias": lay.has_bias,
                   "has_gate": lay.has_gate},
        "shapes": {k: list(getattr(layer.experts, v).shape[1:]) for k, v in _native_names(lay).items()},
    }


@dataclass(frozen=True)
class _Entry:  # one expert's byte range in a layer file
    offset: int
    nbytes: int
    parts: tuple  # ((name, dtype, shape, start, end), ...) relative to offset


_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length aligned to the logical block size (<= 4 KiB)


class ExpertStore:
    """Reads experts from a store directory: `read(layer_index, e) -> {name: tensor}` (fresh tensors, owned by caller).

    drop_cache=True makes every miss a real device read: the files are read with O_DIRECT (DMA into the buffer, no page
    cache, no kernel copy) where the file system supports it, else with buffered reads followed by POSIX_FADV_DONTNEED.
    """

    def __init__(self, directory, *, drop_cache: bool = False):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.drop_cache = drop_cache and hasattr(os, "posix_fadvise")
        self.direct = self.drop_cache and hasattr(os, "O_DIRECT")
        self._fds: dict[int, int] = {}
        self._direct_fds: dict[int, int] = {}
        self._index: dict[int, list[_Entry]] = {}
        for li in self.manifest["layers"]:
            file = self.directory / f"layer_{li:03d}.safetensors"
            self._index[li] = _read_index(file, self.manifest["num_experts"])  # validated before it is read from
            self._fds[li] = os.open(file, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):  # experts are read in random order: kernel readahead only wastes bandwidth
                os.posix_fadvise(self._fds[li], 0, 0, os.POSIX_FADV_RANDOM)
            if self.direct:
                try:
                    self._direct_fds[li] = os.open(file, os.O_RDONLY | os.O_DIRECT)
                except OSError:  # tmpfs and some others refuse O_DIRECT: buffered reads + DONTNEED instead
                    self.direct = False
        if not self.direct:
            for fd in self._direct_fds.values():
                os.close(fd)
            self._direct_fds.clear()
        self.expert_bytes = self._index[self.manifest["layers"][0]][0].nbytes
        self.bytes_read = 0  # only the caller's thread count is exact; the engine keeps its own per-layer counts
        self.nowait = not self.direct and hasattr(os, "RWF_NOWAIT")  # probe the page cache before a blocking read
        self.page_cache_bytes = 0  # bytes RWF_NOWAIT reads returned: served by the page cache, no disk read
        self._lock = threading.Lock()

    def read(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        return self.reader(layer, e).run()

    def reader(self, layer: int, e: int, chunk: int | None = None) -> ExpertRead:
        """The read of one expert as a job of `chunk`-byte steps (None: one positioned read)."""
        return ExpertRead(self, layer, self._index[layer][e], chunk)

    def drop_page_cache(self) -> None:
        """Evict every store page from the OS page cache (benchmarks start cold)."""
        for fd in self._fds.values():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._direct_fds.values()]:
            os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()

    def __del__(self):
        with contextlib.suppress(OSError, AttributeError, TypeError):  # interpreter shutdown: os may be gone
            self.close()


class ExpertRead:
    """One expert's bytes, read in steps: `step()` reads the next chunk and says whether the read is complete, then
    `result()` gives the tensors. Chunked reads let the I/O pool serve a demand read between two chunks of a prefetch
    (io.py); `run()` does all steps. With O_DIRECT the range is widened to 4 KiB boundaries into an aligned buffer."""

    def __init__(self, store: ExpertStore, layer: int, entry: _Entry, chunk: int | None):
        self.store, self.layer, self.entry = store, layer, entry
        if store.direct:
            self.fd = store._direct_fds[layer]
            self.start = entry.offset - entry.offset % _ALIGN
            self.length = -(-(entry.offset + entry.nbytes - self.start) // _ALIGN) * _ALIGN
        else:
            self.fd, self.start, self.length = store._fds[layer], entry.offset, entry.nbytes
        self.buf = _buffer(self.length)  # page-aligned, as O_DIRECT needs
        self.chunk = self.length if chunk is None else max(_ALIGN, chunk - chunk % _ALIGN)
        self.pos = 0

    def step(self) -> bool:
        n = min(self.chunk, self.length - self.pos)
        view, offset = memoryview(self.buf[self.pos:self.pos + n].numpy()), self.start + self.pos
        got = self._from_page_cache(view, offset) if self.store.nowait else 0
        if got < n:
            got += os.preadv(self.fd, [view[got:]], offset + got)
        needed = min(n, self.entry.offset + self.entry.nbytes - self.start - self.pos)  # O_DIRECT: short past EOF
        if got < needed:
            raise OSError(f"short read in layer {self.layer}: {got} of {needed} bytes")
        self.pos += n
        if self.pos < self.length:
            return False
        if self.store.drop_cache and not self.store.direct:
            os.posix_fadvise(self.fd, self.entry.offset, self.entry.nbytes, os.POSIX_FADV_DONTNEED)
        self.store.bytes_read += self.entry.nbytes
        return True

    def _from_page_cache(self, view: memoryview, offset: int) -> int:
        """Bytes of `view` the page cache holds (a prefix), read without waiting for the disk."""
        try:
            got = os.preadv(self.fd, [view], offset, os.RWF_NOWAIT)
        except BlockingIOError:  # the first page is not resident
            return 0
        except OSError:  # a file system without RWF_NOWAIT: plain reads from now on
            self.store.nowait = False
            return 0
        with self.store._lock:
            self.store.page_cache_bytes += got
        return got

    def result(self) -> dict[str, torch.Tensor]:
        data = self.buf[self.entry.offset - self.start:]
        return {name: data[a:b].view(dtype).view(shape) for name, dtype, shape, a, b in self.entry.parts}

    def run(self) -> dict[str, torch.Tensor]:
        while not self.step():
            pass
        return self.result()


class _Buffers:
    """Read buffers, each a private anonymous mapping of its own, recycled once no tensor views it any more.

    A malloc'd buffer of an expert's size stays in glibc's heap after it is freed (fragmented, never returned), so a
    run grew with every expert it ever read instead of with its cache: measured, a run under a 48 MiB budget peaked
    110 MiB above its twin (tests/runtime/test_memory.py holds it to the budget now). A mapping is returned to the OS
    when it is closed, and a new one costs page faults and zeroing (measured: 10x a heap buffer's read time for
    1.5 MiB), so freed mappings are reused for the next read of the same size. Each read looks at no more than
    `window` mappings of its size (oldest first, in a ring), keeps `idle` free ones among them and closes the rest:
    the cost per read stays flat however large the cache, and the mappings never outnumber the most buffers alive at
    once (the cache and the reads in flight)."""

    def __init__(self, window: int = 64, idle: int = 8):
        self.window, self.idle, self.lock, self.rings = window, idle, threading.Lock(), {}

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        with self.lock:  # the tensor is made under the lock: no other reader can take the same mapping meanwhile
            ring, found, spare = self.rings.setdefault(nbytes, deque()), None, 0
            for _ in range(min(len(ring), self.window)):
                mm = ring.popleft()
                if sys.getrefcount(mm) > 2:  # more than `mm` and getrefcount's argument: a tensor still views it
                    ring.append(mm)
                elif found is None:
                    found = mm
                elif spare < self.idle:
                    spare += 1
                    ring.append(mm)
                else:
                    mm.close()
            mm = found or mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            ring.append(mm)
            return torch.frombuffer(mm, dtype=torch.uint8)


_buffer = _Buffers().take


def read_manifest(directory: Path) -> dict:
    """The store's manifest, checked for what readers rely on (schema, layers, expert count)."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{directory} is not an expert store (no manifest.json); build one with build_store")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise damaged(directory, f"manifest.json: {err}") from None
    if not isinstance(manifest, dict):
        raise damaged(directory, "manifest.json is not an object")
    if type(manifest.get("schema_version")) is not int or manifest["schema_version"] != SCHEMA_VERSION:
        raise UserError(f"{directory}: store schema {manifest.get('schema_version')!r}, this moekit reads "
                        f"{SCHEMA_VERSION}; delete it (rm -r {directory}) to rebuild the store")
    layers, num = manifest.get("layers"), manifest.get("num_experts")
    if not isinstance(layers, list) or not layers or not all(type(i) is int and i >= 0 for i in layers) \
            or layers != sorted(set(layers)):
        raise damaged(directory, "manifest.json: layers is not an ascending list of layer indices")
    if type(num) is not int or num < 1:
        raise damaged(directory, f"manifest.json: num_experts {num!r} is not a positive count")
    return manifest


def damaged(directory, what: str) -> UserError:
    return UserError(f"the expert store {directory} is damaged ({what}): delete it (rm -r {directory}) and run again "
                     f"to rebuild it")


def _read_index(file: Path, num_experts: int) -> list[_Entry]:
    """Parse the safetensors header (8-byte little-endian length + JSON) into per-expert contiguous byte ranges, after
    the safetensors library has validated it (header, offsets covering the file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise damaged(file.parent, f"{file.name}: {describe(err)}") from None
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    base, experts = 8 + n, {}
    for key, meta in header.items():
        e, _, name = key.partition(".")
        if not e.isdigit() or meta["dtype"] not in _DTYPES:
            raise damaged(file.parent, f"{file.name}: tensor {key!r} ({meta['dtype']}) is not an expert's")
        a, b = meta["data_offsets"]
        experts.setdefault(int(e), []).append((name, _DTYPES[meta["dtype"]], tuple(meta["shape"]), a, b))
    if sorted(experts) != list(range(num_experts)):
        raise damaged(file.parent, f"{file.name} holds experts {sorted(experts)[:4]}..., the manifest says "
                                   f"{num_experts}")
    entries = []
    for e in range(len(experts)):
        parts = sorted(experts[e], key=lambda p: p[3])
        start, end = parts[0][3], parts[-1][4]
        if not all(p[3] == q[4] for q, p in itertools.pairwise(parts)):
            raise damaged(file.parent, f"{file.name}: expert {e}'s tensors are not adjacent")
        rel = tuple((name, dt, shape, a - start, b - start) for name, dt, shape, a, b in parts)
        entries.append(_Entry(offset=base + start, nbytes=end - start, parts=rel))
    return entries


def canonical(weights: dict[str, torch.Tensor], layout) -> dict[str, torch.Tensor]:
    """Native per-expert slices from the store -> canonical gate/up [I, H], down [H, I] (+ biases), as get_expert."""
    gu = weights["gate_up"].T if layout.transposed else weights["gate_up"]  # [2I, H] or [I, H]
    out = {}
    if layout.has_gate:
        out["gate"], out["up"] = (gu[0::2], gu[1::2]) if layout.interleaved else gu.chunk(2, dim=0)
    else:
        out["up"] = gu
    out["down"] = weights["down"].T if layout.transposed else weights["down"]
    if layout.has_bias:
        b = weights["gate_up_bias"]
        if layout.has_gate:
            out["gate_bias"], out["up_bias"] = (b[0::2], b[1::2]) if layout.interleaved else b.chunk(2)
        else:
            out["up_bias"] = b
        out["down_bias"] = weights["down_bias"]
    return {k: v.contiguous() for k, v in out.items()}
