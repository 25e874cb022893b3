"""The one entry point that opens a checkpoint for offloaded generation: `moekit run`, `moekit serve` and the Python
API all go through `open_offloaded`, so the store build, the resident load, the tokenizer and the checks happen in one
place and in one order (cheap checks first, then the config skeleton once, then the store, then the weights).

    om = moekit.runtime.open_offloaded("demo/model", RuntimeOptions(budget="6MiB", policy="lfru"))
    om.model.generate(om.tokenizer("def f(", return_tensors="pt").input_ids, max_new_tokens=16)
    om.close()
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.compress.quantize import BITS as LOWBIT_WIDTHS
from moekit.errors import UserError
from moekit.runtime import policies
from moekit.runtime.engine import OffloadedModel, check_budget, check_eam, offload, parse_bytes

# progress(description, total) -> a context manager yielding tick(n=1); the CLI passes its progress bar
Progress = Callable[[str, int], contextlib.AbstractContextManager]


@dataclass
class RuntimeOptions:
    """How a checkpoint is run offloaded. Checked on construction, before anything is read from disk."""

    budget: str | int = "512MB"  # bytes of routed experts kept in memory
    policy: str = "lru"  # expert cache policy (policies.available())
    prefetch: bool | None = None  # None: on with a GPU or an activation-matrix trace, off on the CPU (docs/runtime.md)
    store: Path | None = None  # expert store folder; None: default_store_dir(model), built on first use
    device: str | None = None  # tier the experts are cached in; None: "cuda" when available, else "cpu"
    fiddler: bool = False  # GPU only: compute misses on the CPU when the cost model says it is faster
    io_threads: int = 4
    threads: int | None = None  # torch compute threads; None: cores - 1 (the reads need a core)
    lowbit: int | None = None  # HOBBIT: low-weight misses read as BITS-bit copies
    lowbit_threshold: float = 0.1
    eam_trace: Path | None = None  # MoE-Infinity: prefetch by activation-matrix matching against this trace

    def __post_init__(self):
        self.budget = parse_bytes(self.budget)
        policies.policy_class(self.policy)  # unknown names: one line listing the known ones
        if self.policy == "belady":
            raise UserError("belady is an offline oracle (it needs the future): use it with `moekit simulate`, "
                            "not `run` or `serve`")
        if self.io_threads < 1:
            raise UserError(f"--io-threads must be >= 1, got {self.io_threads}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")
        if self.lowbit is not None and self.lowbit not in LOWBIT_WIDTHS:
            raise UserError(f"--lowbit bits must be one of {', '.join(map(str, LOWBIT_WIDTHS))}, got {self.lowbit}")
        if self.lowbit_threshold < 0:
            raise UserError(f"--lowbit-threshold must be >= 0, got {self.lowbit_threshold}")
        if self.device is not None and self.device != "cpu" and not torch.cuda.is_available():
            raise UserError(f"device {self.device!r} asked for, but torch sees no GPU here: leave it out (CPU)")
        if self.fiddler and self.resolved_device() != "cuda":
            raise UserError("--fiddler computes misses on the CPU instead of copying them to the GPU: it needs a GPU")
        for name in ("store", "eam_trace"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else Path(value))
        if self.eam_trace is not None and not self.eam_trace.exists():
            raise UserError(f"no trace at {self.eam_trace}: record one with `moekit trace MODEL --out DIR`")

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


def default_store_dir(model: Path) -> Path:
    """Where the expert store of a checkpoint is built once: $MOEKIT_CACHE (default ~/.cache/moekit)/stores/NAME-HASH,
    the hash covering the store schema, the checkpoint's absolute path and its weight files' sizes and mtimes (a
    retrained model or a new store format gets a fresh store)."""
    from moekit.runtime.store import SCHEMA_VERSION

    root = Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit")) / "stores"
    h = hashlib.sha256(f"{SCHEMA_VERSION}:{model.resolve()}".encode())
    for f in sorted(model.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return root / f"{model.resolve().name}-{h.hexdigest()[:12]}"


def _no_progress(description: str, total: int):
    return contextlib.nullcontext(lambda n=1: None)


def open_offloaded(model, options: RuntimeOptions | None = None, *, progress: Progress = _no_progress,
                   tokenizer: bool = True) -> OffloadedModel:
    """Open the checkpoint folder `model` for offloaded generation: build its expert store on first use (one layer at a
    time, never holding all experts in RAM), load the resident weights from the store, put the routed experts behind
    the budget. Returns the OffloadedModel with `.tokenizer` set (None when tokenizer=False)."""
    from moekit.models.validate import open_checkpoint
    from moekit.runtime.checkpoint import build_store_from_checkpoint, load_from_store

    model, options = Path(model), options or RuntimeOptions()
    store = options.store or default_store_dir(model)
    if store.exists() and not store.is_dir():
        raise UserError(f"--store {store} is a file: give a folder for the expert store")
    built = (store / "manifest.json").is_file()  # then the checkpoint's weights are not read again (nor needed)
    checked = open_checkpoint(model, tokenizer=tokenizer, weights=not built)  # a bad MODEL fails here, in one line
    skeleton, tok = checked.view, checked.tokenizer
    check_budget(skeleton, options.budget, skeleton.bytes_per_expert())  # before a store is built, not after
    eams = None
    if options.eam_trace is not None:
        from moekit.runtime.eam import collection_from_trace

        eams = collection_from_trace(options.eam_trace)
        check_eam(eams, skeleton)
    if not built:  # first run: unfuse the experts into the store, one layer at a time
        with progress(f"building the expert store {store}", len(skeleton.layers)) as tick:
            build_store_from_checkpoint(model, store, progress=tick, skeleton=skeleton)
    if options.lowbit is not None:
        from moekit.runtime.lowbit import build_lowbit, lowbit_dir

        if not (lowbit_dir(store, options.lowbit) / "manifest.json").is_file():
            with progress(f"building {options.lowbit}-bit copies of the experts", len(skeleton.layers)) as tick:
                build_lowbit(store, options.lowbit, progress=tick)
    view = load_from_store(model, store, skeleton=skeleton)  # resident weights only: the experts stay in the store
    device = options.resolved_device()
    torch.set_num_threads(options.threads or max(1, (os.cpu_count() or 1) - 1))
    prefetch = options.prefetch if options.prefetch is not None else (device != "cpu" or eams is not None)
    om = offload(view, store, options.budget, policy=options.policy, prefetch=prefetch, device=device,
                 fiddler=options.fiddler, io_threads=options.io_threads, lowbit=options.lowbit,
                 lowbit_threshold=options.lowbit_threshold, eam=eams)
    om.tokenizer, om.options, om.store_dir = tok, options, store
    return om
