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

    budget: str | int | None = "512MB"  # bytes of routed experts kept in memory; "all" (None): every expert
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
    routing: str | None = None  # routing policy spec for every request (moekit/routing; docs/routing.md)
    steer: Path | None = None  # steering file (moekit experts find)
    page_cache: bool = True  # buffered reads: experts in the OS page cache cost no disk read; False: O_DIRECT
    predictor: Path | None = None  # routing predictor file (predictor.py): forecasts for policy "predictive"

    def __post_init__(self):
        self.budget = None if self.budget is None or str(self.budget).lower() == "all" else parse_bytes(self.budget)
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
        if self.device is not None and _device_kind(self.device) not in ("cpu", "cuda"):
            raise UserError(f"--device {self.device!r}: use cpu or cuda (cuda:N for one GPU)")
        if self.device is not None and self.device != "cpu" and not torch.cuda.is_available():
            raise UserError(f"device {self.device!r} asked for, but torch sees no GPU here: leave it out (CPU)")
        if self.fiddler and self.resolved_device() != "cuda":
            raise UserError("--fiddler computes misses on the CPU instead of copying them to the GPU: it needs a GPU")
        self.parsed_routing()  # a bad spec or steering file: one line, before anything is read
        for name in ("store", "eam_trace", "predictor"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else Path(value))
        if self.eam_trace is not None and not self.eam_trace.exists():
            raise UserError(f"no trace at {self.eam_trace}: record one with `moekit trace MODEL --out DIR`")
        if self.predictor is not None and not self.predictor.is_file():
            raise UserError(f"no predictor at {self.predictor}: train one with `moekit predictor train TRACE --out P`")
        if self.policy == "predictive" and self.predictor is None:
            raise UserError("--policy predictive evicts by the routing predictor's forecasts: pass --predictor P "
                            "(`moekit predictor train TRACE --out P`; the demo model ships demo/predictor.safetensors)")
        if self.budget is None:
            for flag, used in (("--lowbit", self.lowbit is not None), ("--eam-trace", self.eam_trace is not None),
                               ("--fiddler", self.fiddler), ("--store", self.store is not None),
                               ("--predictor", self.predictor is not None)):
                if used:
                    raise UserError(f"{flag} is for offloaded experts; --budget all keeps every expert in memory")

    def parsed_routing(self):
        """The Routing of `routing` + `steer` (None: stock); a fresh one each call (per-request state)."""
        from moekit.routing import parse

        return parse(self.routing, self.steer)

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
                   tokenizer: bool = True, checked: Checked | None = None) -> OffloadedModel:
    """Open the checkpoint folder `model` for offloaded generation: build its expert store on first use (one layer at a
    time, never holding all experts in RAM), load the resident weights from the store, put the routed experts behind
    the budget; budget None ("all") loads the whole model in memory instead (no store, no cache: `_in_memory`).
    Returns the OffloadedModel with `.tokenizer` set (None when tokenizer=False). checked: what `check_offloaded`
    returned, when the caller ran the checks already (a server, before it binds its port)."""
    from moekit.runtime.checkpoint import build_store_from_checkpoint, load_from_store

    model, options = Path(model), options or RuntimeOptions()
    checked = checked or check_offloaded(model, options, tokenizer=tokenizer)  # a bad MODEL fails here, in one line
    skeleton, tok = checked.skeleton, checked.tokenizer if tokenizer else None
    if options.budget is None:
        return _in_memory(model, options, tok)
    store = checked.store
    if not checked.built:  # first run: unfuse the experts into the store, one layer at a time
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
    prefetch = options.prefetch if options.prefetch is not None else (device != "cpu" or checked.eams is not None)
    om = offload(view, store, options.budget, policy=options.policy, prefetch=prefetch, device=device,
                 drop_cache=not options.page_cache,
                 fiddler=options.fiddler, io_threads=options.io_threads, lowbit=options.lowbit,
                 lowbit_threshold=options.lowbit_threshold, eam=checked.eams, predictor=checked.predictor)
    om.tokenizer, om.options, om.store_dir = tok, options, store
    _attach_routing(om, options)
    return om


@dataclass
class Checked:
    """What `check_offloaded` found: the checkpoint's meta-device view, its tokenizer, the store folder (and whether
    it is built), the activation-matrix collection of --eam-trace, the routing predictor of --predictor."""

    skeleton: object
    tokenizer: object | None
    store: Path | None
    built: bool
    eams: object | None = None
    predictor: object | None = None


def _device_kind(device: str) -> str | None:
    try:
        return torch.device(device).type
    except (RuntimeError, ValueError):  # "tpu", "gpu", "cuda:x": not a device torch knows
        return None


def check_offloaded(model, options: RuntimeOptions, *, tokenizer: bool = True) -> Checked:
    """Every check `open_offloaded` makes before it reads a weight or builds anything, in one line each: the store
    folder, the checkpoint (validate.open_checkpoint: config, headers, shapes, MoE layers, tokenizer; a config-only
    folder once its store is built), a causal LM, the budget against the experts' size, the --eam-trace against the
    model, the --predictor against the model, the routing policy against its layers and experts."""
    from moekit.models.validate import check_routing, open_checkpoint

    model, store, built = Path(model), None, False
    if options.budget is not None:
        store = options.store or default_store_dir(model)
        if store.exists() and not store.is_dir():
            raise UserError(f"--store {store} is a file: give a folder for the expert store")
        built = (store / "manifest.json").is_file()  # then the checkpoint's weights are not read again (nor needed)
    checkpoint = open_checkpoint(model, tokenizer=tokenizer, weights=not built)
    skeleton = checkpoint.view
    skeleton.require("run / serve", causal=True)
    if options.budget is not None:
        check_budget(skeleton, options.budget, skeleton.bytes_per_expert())  # before a store is built, not after
    eams = None
    if options.eam_trace is not None:
        from moekit.runtime.eam import collection_from_trace

        eams = collection_from_trace(options.eam_trace)
        try:
            check_eam(eams, skeleton)
        except UserError as err:  # name the file the user gave
            raise UserError(f"--eam-trace {options.eam_trace}: {err}") from None
    predictor = None
    if options.predictor is not None:
        from moekit.runtime.predictor import load

        predictor = load(options.predictor)  # its messages name the file already
        try:
            predictor.check(skeleton)
        except UserError as err:  # name the file the user gave
            raise UserError(f"--predictor {options.predictor}: {err}") from None
    check_routing(options.parsed_routing(), skeleton)
    return Checked(skeleton, checkpoint.tokenizer, store, built, eams, predictor)


def _attach_routing(om: OffloadedModel, options: RuntimeOptions) -> None:
    """Router hooks on the offloaded model: `om.routing_hooks` (moekit.routing.RoutingHooks; a server sets per-request
    row spans on it each step, see docs/routing.md) routing every row by `om.routing_policy` unless told otherwise."""
    from moekit.routing import attach
    from moekit.routing.calibrate import prepare

    om.routing_policy = prepare(options.parsed_routing(), om.view, om.tokenizer)
    om.routing_hooks = attach(om.view)
    om.routing_hooks.set_all(om.routing_policy)


def _in_memory(model: Path, options: RuntimeOptions, tok) -> OffloadedModel:
    """--budget all: the checkpoint loaded whole (transformers' from_pretrained, no store), its experts computed by
    transformers' grouped_mm kernel where it dispatches (one grouped GEMM per layer for all of a step's experts: 1.6x
    the eager loop's speed at 32 sequences in a step, equal for one; docs/serving.md), else by the eager loop."""
    import moekit.models

    view = moekit.models.load(model)
    try:
        view.model.set_experts_implementation("grouped_mm")
    except (ValueError, ImportError):  # no grouped kernel for this device / torch: eager, as loaded
        pass
    device = options.resolved_device()
    torch.set_num_threads(options.threads or max(1, (os.cpu_count() or 1) - 1))
    if device != "cpu":  # pragma: no cover - GPU
        view.model.to(device)
    experts = sum(p.numel() * p.element_size() for layer in view.layers for p in layer.expert_params())
    om = OffloadedModel(view, [], experts, view.num_experts, None)
    om.tokenizer, om.options, om.store_dir = tok, options, None
    _attach_routing(om, options)
    return om
