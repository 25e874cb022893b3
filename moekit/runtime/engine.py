"""Offloaded MoE execution through transformers' public experts interface (`ALL_EXPERTS_FUNCTIONS.register` +
`model.set_experts_implementation`): no edits to transformers, no patched methods.

Per call of a layer's experts module (hidden [T, H], top_k_index [T, K], top_k_weights [T, K]):
  group the T*K (token, slot) pairs by expert in eager's order -> the policy judges the step's experts at once -> the
  misses are read on I/O threads, a bounded window at a time -> the hits are computed while the misses load, then each
  miss as its read finishes, with the family's own gate function (native weight slices, see store.py) -> the weighted
  outputs summed with index_add_ in ascending expert order, exactly as transformers' eager loop, so logits match the
  in-memory model bit for bit in float32 whatever order the experts were computed in.
Prefetch (pre-gating: ExpertFlow arXiv 2410.17954, Pre-gated MoE arXiv 2308.12066): before computing layer l, layer
l+1's router is applied to layer l's input, and its predicted experts that are not resident are read on the I/O threads
while layer l computes. Prefetched experts wait outside the cache (at most the predicted set) and do not touch the
policy: hit/miss counters are the same with or without prefetch, which is what the simulator models.
Dimension legend: T tokens, E experts, K selected per token, H hidden, I expert intermediate.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import weakref
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import UserError
from moekit.ops.routing import route
from moekit.runtime import policies
from moekit.runtime.io import PREFETCH, IOPool
from moekit.runtime.store import ExpertStore

IMPLEMENTATION = "moekit_offload"
_REORDER_BYTES = 32 << 20  # steps whose outputs (T x K x H) fit this compute hits before misses (see forward)
_PREFETCH_CHUNK = 4 << 20  # a prefetch is read in chunks of this size, each a point where a demand read goes first
_RUNTIMES: weakref.WeakKeyDictionary[nn.Module, LayerRuntime] = weakref.WeakKeyDictionary()


def _experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights):
    """The registered experts implementation: dispatch to the layer's runtime."""
    runtime = _RUNTIMES.get(self)
    if runtime is None:
        raise RuntimeError(f"{IMPLEMENTATION}: this experts module was not offloaded by moekit.runtime.offload")
    return runtime.forward(hidden_states, top_k_index, top_k_weights)


def _register_once() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _experts_forward)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text) -> int:
    """'512MB' -> 512_000_000, '1.5GiB' -> 1610612736, 4096 -> 4096."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise UserError(f"cannot read the size {text!r}: write e.g. 512MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


@dataclass
class LayerStats:
    layer: int
    steps: int = 0
    demand_bytes: int = 0  # read on the caller's thread (misses not covered by a prefetch)
    prefetch_bytes: int = 0  # read by the prefetch thread (used or wasted); only that thread writes it
    prefetch_reads: int = 0  # prefetches issued (cancelled ones included)
    prefetch_used: int = 0  # misses served by a finished or in-flight prefetch
    lowbit_reads: int = 0  # misses served by a low-bit copy (HOBBIT), not cached
    lowbit_bytes: int = 0
    predicted: int = 0  # |predicted set| summed over steps
    actual: int = 0  # |selected set| summed over steps
    correct: int = 0  # |predicted & selected|
    wait_s: float = 0.0  # blocked on reads (demand reads + waiting for prefetches)
    total_s: float = 0.0  # whole experts call
    routing: list = field(default_factory=list)  # ids [T, K] per step when recording
    routing_weights: list = field(default_factory=list)  # weights [T, K] float32 per step when recording

    def as_dict(self, policy) -> dict:
        c = policy.counters()
        looked = c["hits"] + c["misses"]
        return {
            "layer": self.layer, **c, "hit_rate": c["hits"] / looked if looked else float("nan"),
            "bytes_read": self.demand_bytes + self.prefetch_bytes + self.lowbit_bytes,
            "prefetch_reads": self.prefetch_reads, "prefetch_used": self.prefetch_used,
            "lowbit_reads": self.lowbit_reads,
            "prefetch_precision": self.correct / self.predicted if self.predicted else float("nan"),
            "prefetch_recall": self.correct / self.actual if self.actual else float("nan"),
            "compute_s": self.total_s - self.wait_s, "wait_s": self.wait_s,
        }


class LayerRuntime:
    """One MoE layer's expert cache, store access, prefetch and counters."""

    def __init__(self, layer, policy, store: ExpertStore, pool, device, record: bool, prefetch: bool,
                 window: int):
        self.layer, self.policy, self.store, self.pool = layer, policy, store, pool
        self.prefetch_enabled = prefetch
        self.window = window  # demand reads in flight at once (queue depth; also bounds the memory over budget)
        self.lock = threading.Lock()  # byte counters written by I/O threads
        self.device = device
        self.cache: dict[int, dict[str, torch.Tensor]] = {}
        self.pending: dict = {}  # expert -> Future of a prefetch read
        self.predicted: set[int] | None = None
        self.next: LayerRuntime | None = None  # the next MoE layer, target of this layer's prefetch
        self.stats = LayerStats(layer.index)
        self.record = record
        self.kernel = _kernel(layer.layout)  # chosen once per layer
        self.policy_wants_weights = type(policy).begin_step is not policies.CachePolicy.begin_step
        self.costs = None  # Fiddler cost model (GPU only): misses may be computed on the CPU instead of copied
        self.lowbit = None  # HOBBIT: a LowBitStore for misses whose routing weight is below lowbit_threshold
        self.lowbit_threshold = 0.0
        self.eam = None  # MoE-Infinity: an ActivationMatrixPredictor shared by the layers, replacing pre-gating
        self.position = 0  # index among the MoE layers (the EAM's row)

    # hot path ------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        T = ids.shape[0]
        flat = ids.T.reshape(-1)  # [K*T], slot-major: eager walks torch.where(expert_mask[e]) over [K, T]
        order = torch.argsort(flat, stable=True)  # [K*T] grouped by expert, eager's order inside a group
        counts = torch.bincount(flat, minlength=self.layer.num_experts).tolist()  # [E], the one host sync
        # ids >= E are dropped slots (a routing policy's variable K, moekit/routing): no read, no cache access
        experts = [e for e, c in enumerate(counts[:self.layer.num_experts]) if c]
        groups, start = {}, 0
        for e in experts:
            sel = order[start:start + counts[e]]
            start += counts[e]
            groups[e] = (sel % T, sel // T)  # token [c], slot [c]
        # the host copy of the routing, made once for whoever reads it (recording, a weight-aware policy, the EAM)
        ids_np = ids.cpu().numpy() if self.record or self.policy_wants_weights or self.eam is not None else None
        if self.eam is not None:
            if self.position == 0 and T > 1:  # a prefill: a new request (a one-token prompt continues the last one)
                self.eam.reset()
            self.eam.observe(self.position, ids_np[ids_np < self.layer.num_experts])
        for e in [e for e in self.pending if counts[e] == 0]:  # mispredicted: free the I/O queue for demand reads
            self.pending.pop(e).cancel()  # (one already being read finishes and is dropped)
        resident = self._begin_step(ids_np, weights, experts)
        on_cpu = self._fiddler(experts, counts, resident) if self.costs is not None else ()
        misses = [e for e in experts if e not in resident and e not in on_cpu]
        low = self._unimportant(misses, groups, weights) if self.lowbit is not None else set()
        # all of the step's misses are known now: read them on the I/O threads, `window` at a time, in id order, so
        # reads overlap each other (queue depth) and the computation of the hits, which goes first
        for e in misses:
            if e in self.pending:  # predicted right: its remaining chunks are now a demand read
                self.pool.promote(self.pending[e])
        todo = deque(e for e in misses if e not in self.pending)
        reads: dict = {}
        self._submit(todo, reads, low)
        if self.next is not None and self.prefetch_enabled:  # after this layer's reads: speculation queues behind
            self.next.prefetch(x)
        out = torch.zeros_like(x)  # [T, H]
        ys, summed = {}, 0  # expert -> weighted output [c, H] not summed yet; experts[:summed] are in `out`

        def compute(e, w, host=False):  # host: Fiddler, the weights stay on the CPU and the activations move
            nonlocal summed
            tok, slot = groups[e]
            y = self.kernel(self.layer.experts, x[tok].cpu() if host else x[tok], w)  # [c, H]
            ys[e] = y.to(x.device) * weights[tok, slot, None]
            while summed < len(experts) and experts[summed] in ys:  # sum in eager's order (ascending expert id) so
                done = experts[summed]  # float sums stay bit-identical whatever order the experts were computed in
                out.index_add_(0, groups[done][0], ys.pop(done).to(out.dtype))
                summed += 1

        # decode-sized steps compute the hits first, while the misses load, then each miss as its read finishes;
        # large steps (prefill) go in id order, so at most one expert's output waits to be summed (eager's memory)
        small = T * ids.shape[1] * x.shape[-1] * x.element_size() <= _REORDER_BYTES
        arrivals = self._arrivals(misses, reads, todo, low, ordered=not small)
        for e in experts if small else ():
            if e in resident:
                compute(e, resident[e])
        for e in experts:
            if e in on_cpu:
                compute(e, self._read(e), host=True)
                self.policy.discard(e)
                self.cache.pop(e, None)
            elif not small:
                compute(e, resident[e]) if e in resident else compute(*next(arrivals))
        for e, w in arrivals:  # small steps: the misses as they arrive (large ones have consumed them all)
            compute(e, w)
        assert summed == len(experts)
        self._end_step()
        self.stats.total_s += time.perf_counter() - t0
        return out

    def _begin_step(self, ids_np, weights, experts) -> dict:
        """Policy decisions for the whole step (ids_np: the step's ids [T, K] on the host, None when nobody needs
        them); returns the hit experts' weights (held before any eviction)."""
        self.stats.steps += 1
        w_np = weights.float().cpu().numpy() if self.record or self.policy_wants_weights else None
        if self.record:
            self.stats.routing.append(ids_np.copy())
            self.stats.routing_weights.append(w_np.copy())
        if ids_np is not None and self.policy_wants_weights and (ids_np >= self.layer.num_experts).any():
            w_np = np.where(ids_np < self.layer.num_experts, w_np, 0.0)  # dropped slots: the token's first expert,
            ids_np = np.where(ids_np < self.layer.num_experts, ids_np, ids_np[:, :1])  # weight 0 (no new entry)
        self.policy.begin_step(ids_np, w_np if self.policy_wants_weights else None)
        if self.predicted is not None:
            self.stats.predicted += len(self.predicted)
            self.stats.actual += len(experts)
            self.stats.correct += len(self.predicted.intersection(experts))
        resident = {e: self.cache[e] for e in experts if e in self.cache}
        hits, evicted = self.policy.access(experts)
        assert sum(hits) == len(resident), "cache dict and policy disagree"
        for v in evicted:
            self.cache.pop(v, None)  # may be a miss of this very step, admitted then evicted (prefill > capacity)
        return resident

    def _end_step(self) -> None:
        self.predicted = None
        for fut in self.pending.values():  # mispredicted: cancel if not started, else let it finish and drop it
            fut.cancel()
        self.pending.clear()

    def _submit(self, todo: deque, reads: dict, low: set[int]) -> None:
        while todo and len(reads) < self.window:
            e = todo.popleft()
            reads[e] = self.pool.submit(self._load_lowbit, e) if e in low else \
                self.pool.submit(self._counted_load, e, "demand_bytes")

    def _unimportant(self, misses: list[int], groups: dict, weights: torch.Tensor) -> set[int]:
        """HOBBIT's token-level rule: a miss whose routing weight (its largest over the step's tokens) is below the
        threshold is read as its low-bit copy and computed with it; it is not cached (the policy forgets it), so a
        later step that needs it at full weight reads the full copy. A prefetch already in flight is used instead."""
        low = set()
        for e in misses:
            tok, slot = groups[e]
            if e not in self.pending and weights[tok, slot].max().item() < self.lowbit_threshold:
                low.add(e)
                self.policy.discard(e)
        return low

    def _load_lowbit(self, e: int) -> dict[str, torch.Tensor]:  # runs on an I/O thread
        w = self._to_device(self.lowbit.read(self.layer.index, e))
        with self.lock:
            self.stats.lowbit_reads += 1
            self.stats.lowbit_bytes += self.lowbit.expert_bytes
        return w

    def _arrivals(self, misses: list[int], reads: dict, todo: deque, low: set[int], ordered: bool):
        """Yield (expert, weights) for the step's misses as their reads (demand or prefetch) finish (ordered: in
        `misses` order), keeping `window` demand reads in flight; misses the policy admitted enter the cache."""
        remaining = list(misses)
        while remaining:
            futures = {}
            for e in remaining[:1] if ordered else remaining:
                fut = self.pending.get(e) or reads.get(e)
                if fut is not None:
                    futures[fut] = e
            t0 = time.perf_counter()
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            self.stats.wait_s += time.perf_counter() - t0
            for fut in sorted(done, key=futures.get):
                e = futures[fut]
                if self.pending.get(e) is fut:
                    del self.pending[e]
                    self.stats.prefetch_used += 1
                else:
                    del reads[e]
                remaining.remove(e)
                self._submit(todo, reads, low)
                w = fut.result()
                if e in self.policy.resident:
                    self.cache[e] = w
                yield e, w

    def _fiddler(self, experts, counts, resident) -> set[int]:
        from moekit.runtime.costmodel import place_misses

        misses = [e for e in experts if e not in resident and e not in self.pending]
        return {e for e, cpu in zip(misses, place_misses([counts[e] for e in misses], self.costs)) if cpu}

    def _read(self, e: int) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        w = self.store.read(self.layer.index, e)
        with self.lock:
            self.stats.demand_bytes += self.store.expert_bytes
        self.stats.wait_s += time.perf_counter() - t0
        return w

    def _counted_load(self, e: int, counter: str) -> dict[str, torch.Tensor]:  # runs on an I/O thread
        return self._counted(self.store.read(self.layer.index, e), counter)

    def _counted(self, w: dict[str, torch.Tensor], counter: str) -> dict[str, torch.Tensor]:
        with self.lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + self.store.expert_bytes)
        return self._to_device(w)

    def _to_device(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type != "cpu":  # GPU tier: pinned host buffer -> device copy
            w = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in w.items()}
        return w

    # prefetch (called by the previous MoE layer, before it computes) ----------------------------------------------
    def prefetch(self, x: torch.Tensor) -> None:
        """Predict this layer's experts before it runs and read the non-resident ones in the background.
        Pre-gating: this layer's router on the previous layer's input x [T, H]. With an activation-matrix predictor
        (MoE-Infinity, eam.py): the stored request whose EAM best matches this request's so far names them."""
        if self.eam is not None:
            self.predicted = self.eam.predict(self.position)
        elif not self.layer.prefetchable:  # hash-routed / stateful (Zaya) routers, latent experts: x does not tell
            return
        else:
            _, pred = route(self.layer.router_logits(x), self.layer.rule, self.layer.correction_bias)  # [T, K]
            self.predicted = set(torch.unique(pred).tolist())
        for e in self.predicted:
            if e not in self.policy.resident and e not in self.pending:
                self.pending[e] = self.pool.submit_steps(  # in chunks: demand reads overtake it between two
                    self.store.reader(self.layer.index, e, _PREFETCH_CHUNK),
                    lambda w: self._counted(w, "prefetch_bytes"), priority=PREFETCH)
                self.stats.prefetch_reads += 1


def _kernel(layout):
    """The family's eager per-expert computation on native slices (transformers' modeling_*.py experts loops):
    F.linear for [out, in] storage; x @ W + b for transposed storage (GPT-OSS). Gate: the module's own _apply_gate."""

    def gate(m, y):
        return m._apply_gate(y) if layout.has_gate else m.act_fn(y)

    def post(m, y):
        return m.post_expert_norm(y) if getattr(m, "has_post_expert_norm", False) else y

    if layout.transposed:
        def transposed(m, x, w):
            h = x @ w["gate_up"]  # [c, 2I]
            h = h + w["gate_up_bias"] if "gate_up_bias" in w else h
            h = gate(m, h) @ w["down"]  # [c, H]
            return post(m, h + w["down_bias"] if "down_bias" in w else h)

        return transposed

    def linear(m, x, w):
        h = F.linear(x, w["gate_up"], w.get("gate_up_bias"))  # [c, 2I]
        return post(m, F.linear(gate(m, h), w["down"], w.get("down_bias")))  # [c, H]

    return linear


class OffloadedModel:
    """A transformers MoE model whose routed experts live in an ExpertStore behind per-layer caches."""

    def __init__(self, view, layers: list[LayerRuntime], budget: int, capacity: int, pool):
        self.view, self.model, self.layers = view, view.model, layers
        self.budget, self.capacity, self._pool = budget, capacity, pool
        self.tokenizer = self.options = self.store_dir = None  # set by session.open_offloaded

    def stats(self) -> list[dict]:
        return [rt.stats.as_dict(rt.policy) for rt in self.layers]

    def totals(self) -> dict:
        rows = self.stats()
        tot = {k: sum(r[k] for r in rows) for k in ("hits", "misses", "evictions", "bytes_read", "prefetch_reads",
                                                        "prefetch_used", "lowbit_reads", "compute_s", "wait_s")}
        pred = sum(rt.stats.predicted for rt in self.layers)
        act = sum(rt.stats.actual for rt in self.layers)
        ok = sum(rt.stats.correct for rt in self.layers)
        looked = tot["hits"] + tot["misses"]
        tot["page_cache_bytes"] = self.layers[0].store.page_cache_bytes if self.layers else 0  # of bytes_read
        tot.update(hit_rate=tot["hits"] / looked if looked else float("nan"),
                   prefetch_precision=ok / pred if pred else float("nan"),
                   prefetch_recall=ok / act if act else float("nan"))
        return tot

    def routing(self) -> list[np.ndarray]:
        """Recorded routing per MoE layer, [T, K] each (record=True)."""
        return [np.concatenate(rt.stats.routing) if rt.stats.routing else np.zeros((0, 0), np.int64)
                for rt in self.layers]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for rt in self.layers:
            rt.cache.clear()
            rt.store.close()
            if rt.lowbit is not None:
                rt.lowbit.close()


def min_budget(view, expert_bytes: int) -> int:
    """The smallest budget: top-k experts resident in every MoE layer."""
    return len(view.layers) * view.top_k * expert_bytes


def check_budget(view, budget: int, expert_bytes: int) -> int:
    """Experts per MoE layer the budget holds (at most E); one line naming the minimum when it holds fewer than top-k.
    Needs only shapes: open_offloaded calls it on the meta skeleton, before any store is built."""
    capacity = min(budget // (len(view.layers) * expert_bytes), view.num_experts)
    if capacity < view.top_k:
        need = min_budget(view, expert_bytes)
        raise UserError(f"budget {format_bytes(budget)} holds {capacity} experts per MoE layer; each of the "
                        f"{len(view.layers)} MoE layers needs its top-{view.top_k}: "
                        f"minimum budget {format_bytes(need)} "
                        f"({need} bytes = {len(view.layers)} x {view.top_k} x {expert_bytes})")
    return capacity


def check_eam(eam, view) -> None:
    """An EAM collection [N, L, E] must come from a trace of this model (its MoE layers and experts)."""
    if tuple(eam.shape[1:]) != (len(view.layers), view.num_experts):
        raise UserError(f"the EAM collection is for {eam.shape[1]} MoE layers x {eam.shape[2]} experts; this "
                        f"model has {len(view.layers)} x {view.num_experts}: record the trace with this model")


def offload(view, store_dir, budget, *, policy: str = "lru", prefetch: bool = True, drop_cache: bool = False,
            device: str = "cpu", record: bool = False, fiddler: bool = False, io_threads: int = 4,
            lowbit: int | None = None, lowbit_threshold: float = 0.1, eam=None) -> OffloadedModel:
    """Serve `view`'s routed experts from the store in `store_dir` (see store.build_store) under a byte budget split
    evenly over the MoE layers; frees the model's fused expert parameters. Returns the OffloadedModel.

    device: where resident experts and the non-expert weights live ("cpu", or "cuda": the GPU tier), chosen once.
    io_threads: threads reading experts (a step's misses and the prefetches are read concurrently: SSDs and virtual
    disks deliver their bandwidth only with several reads in flight).
    fiddler (GPU only): compute a missed expert on the CPU when the measured cost model says it is faster than copying
    it (costmodel.py); its hit/miss counters then no longer match the simulator's, which models copies only.
    lowbit (HOBBIT, arXiv 2411.01433; off by default because it changes the output): a miss whose routing weight is
    below lowbit_threshold is read from the store's `lowbit` -bit copies (lowbit.build_lowbit) and not cached.
    eam: an EAM collection [N, L, E] (eam.collection_from_trace) makes prefetch predict by activation-matrix matching
    (MoE-Infinity) instead of pre-gating; its top-k per layer is the model's top-k."""
    for layer in view.layers:
        if not hasattr(layer.experts, "is_transposed") or layer.rule.weight_on_input:
            raise UserError(f"{view.model_type}: its experts do not go through transformers' experts interface "
                            f"(weights applied on the input); offloading is not supported for this family")
    store = ExpertStore(store_dir, drop_cache=drop_cache)
    if store.manifest["layers"] != [m.index for m in view.layers]:
        raise UserError(f"{store_dir} was built from another model (MoE layers {store.manifest['layers']})")
    budget = parse_bytes(budget)
    capacity = check_budget(view, budget, store.expert_bytes)
    dev = torch.device(device)
    if io_threads < 1:
        raise UserError(f"io_threads must be >= 1, got {io_threads}")
    pool = IOPool(io_threads)
    layers = [LayerRuntime(m, policies.make(policy, capacity), store, pool, dev, record, prefetch, window=io_threads)
              for m in view.layers]
    for rt, nxt in itertools.pairwise(layers):
        rt.next = nxt
    if eam is not None:
        from moekit.runtime.eam import ActivationMatrixPredictor

        check_eam(eam, view)
        predictor = ActivationMatrixPredictor(eam, view.top_k)
        for pos, rt in enumerate(layers):
            rt.eam, rt.position = predictor, pos
    if lowbit is not None:
        from moekit.runtime.lowbit import LowBitStore

        low_store = LowBitStore(store_dir, lowbit, drop_cache=drop_cache)
        for rt in layers:
            rt.lowbit, rt.lowbit_threshold = low_store, lowbit_threshold
    _register_once()
    for rt in layers:
        _free_fused(rt.layer.experts)
        _RUNTIMES[rt.layer.experts] = rt
    if dev.type != "cpu":  # pragma: no cover - GPU tier
        _move_resident(view.model, dev)
    if fiddler:
        if dev.type != "cuda":
            raise UserError("--fiddler computes misses on the CPU instead of copying them to the GPU: it needs a GPU")
        from moekit.runtime.costmodel import measure  # pragma: no cover

        for rt in layers:  # pragma: no cover
            rt.costs = measure(rt, dev)
    view.model.set_experts_implementation(IMPLEMENTATION)
    return OffloadedModel(view, layers, budget, capacity, pool)


def _move_resident(model: nn.Module, device) -> None:  # pragma: no cover - GPU tier
    """Move every non-expert parameter and buffer to `device` (the freed expert parameters stay on meta)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.device.type != "meta":
                module._parameters[name] = nn.Parameter(p.data.to(device), requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None and b.device.type != "meta":
                module._buffers[name] = b.to(device)


def _free_fused(experts: nn.Module) -> None:
    """Replace the fused expert parameters by meta tensors of the same shape: shapes stay readable (the MoE view uses
    them), the memory is released."""
    for name, p in list(experts.named_parameters(recurse=False)):
        setattr(experts, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))
