"""Continuous batching at step granularity, on its own thread.

Each step is one forward of the model over the packed tokens of every active sequence (attention.py keeps them
apart): one token for each sequence that is decoding, then chunks of the prompts being prefilled, in admission order,
up to `max_step_tokens` (chunked prefill with decodes first, vLLM's policy: a long prompt delays running sequences by
one chunk at most, never by its whole length). Every MoE layer therefore sees all of the step's tokens at once, and an
expert read from the store serves every token routed to it: batching turns offloading from latency-bound into
throughput (under uniform routing B tokens touch E(1-(1-k/E)^B) distinct experts, so reads per token fall as B
grows; docs/serving.md).

Admission is first come, first served. A sequence is admitted when fewer than `max_batch` run and its reservation
(prompt + max_tokens tokens of KV) fits in `max_kv_tokens`, so KV memory is bounded by construction and nothing is ever
preempted. At most `max_queue` sequences wait; past that `submit` raises QueueFull (HTTP 503 + Retry-After).
Cancellation (`abort`) drops a request's sequences, queued or running, at the start of the next step, and only those.
The event loop never waits on this thread: `submit` and `abort` only take a lock, and results go to a per-request
sink (called on this thread; the server's sink hands them to the loop with call_soon_threadsafe).

Per-request options travel as `SequenceSpec` fields into `Sequence`; the step's `Segment`s (attention.py) say which
packed tokens belong to which sequence, which is where a per-request option applied inside the model would read it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moekit.errors import UserError
from moekit.runtime.sampling import Sampler, SamplingParams, TokenLogprobs, sample_step
from moekit.serve import attention
from moekit.serve.text import Detokenizer, StopStrings

log = logging.getLogger("moekit.serve")


class QueueFull(Exception):
    """More sequences are waiting than the server's --max-queue allows."""


@dataclass
class EngineConfig:
    max_batch: int = 16  # sequences running (in one step) at once
    max_queue: int = 64  # sequences waiting for admission
    max_kv_tokens: int = 65536  # KV tokens reserved (prompt + max_tokens) by the running sequences, summed
    max_step_tokens: int = 512  # tokens in one forward: the decodes, then prompt chunks

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_kv_tokens", "max_step_tokens"):
            if getattr(self, name) < 1:  # (a queue of 0 would refuse every request: each one waits a moment)
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_step_tokens < self.max_batch:
            raise UserError(f"--max-step-tokens ({self.max_step_tokens}) must be >= --max-batch ({self.max_batch}):"
                            f" every running sequence decodes one token per step")


@dataclass
class SequenceSpec:
    """One choice of a request, as the API layer asks for it (validated there)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()
    index: int = 0  # the choice index in the response
    choice: int = 0  # which of the request's n samples (seed + choice)
    routing: object = None  # this choice's own moekit.routing.Routing (per-request state), None: stock routing


@dataclass
class Event:
    """What one step produced for one choice: text that became final, the tokens behind it (stop tokens excluded),
    their log-probabilities when asked, and the finish reason once it is done (stop, length, error)."""

    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Sequence:
    def __init__(self, request: Request, spec: SequenceSpec, tokenizer, eos_ids: frozenset[int], max_len: int):
        self.request, self.spec = request, spec
        self.prompt = spec.prompt
        self.cached = 0  # tokens whose KV is cached
        self.generated: list[int] = []
        self.reserved = min(len(spec.prompt) + spec.max_tokens, max_len)
        self.kv = None  # attention.SequenceKV (batched), or the model's own cache object
        self.sampler = Sampler(spec.params, spec.choice)
        self.detok = Detokenizer(tokenizer, spec.prompt)
        self.stops = StopStrings(spec.stop)
        self.end_ids = spec.stop_ids | eos_ids
        self.finish: str | None = None
        self.admitted = self.first_token = self.last_token = None

    @property
    def pending(self) -> list[int]:
        """Tokens to put through the model next (prompt chunk, or the last generated token)."""
        return self.prompt[self.cached:] if self.cached < len(self.prompt) else self.generated[-1:]


class Request:
    def __init__(self, request_id: str, sink: Callable[[list[Event]], None]):
        self.id, self.sink = request_id, sink
        self.arrival = time.monotonic()
        self.sequences: list[Sequence] = []


class Engine:
    """The scheduler and step loop. `step()` runs one step on the caller's thread (tests); `start()` runs steps on a
    thread of its own until `stop()`."""

    def __init__(self, model, tokenizer, config: EngineConfig, *, max_len: int, eos_ids=(), hooks=None,
                 routing_hooks=None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.routing_hooks = routing_hooks  # moekit.routing.RoutingHooks: each sequence's rows get its own routing
        self.max_len = max_len
        self.eos_ids = frozenset(eos_ids)
        self.hooks = hooks  # metrics: on_admit, on_token, on_finish, on_step (see metrics.py); None: none
        self.device = next(p for p in model.parameters() if p.device.type != "meta").device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved = 0  # KV tokens reserved by the running sequences
        self._inbox: list[Request] = []
        self._aborts: set[str] = set()
        self._queued = 0  # sequences submitted and not admitted yet (inbox + waiting), for the queue bound
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._events: dict[Request, list[Event]] = {}
        self.steps = 0
        self.batched = attention.install(model)  # False: sequences go through the model one at a time
        if not self.batched:
            log.warning("%s has layers whose state is not attention KV (linear attention, Mamba, ...): sequences are "
                        "scheduled together but computed one at a time", type(model).__name__)

    # called from other threads ---------------------------------------------------------------------------------------
    def submit(self, request_id: str, specs: list[SequenceSpec], sink: Callable[[list[Event]], None]) -> None:
        """Queue a request's sequences (all or none); QueueFull past --max-queue."""
        for s in specs:
            need = len(s.prompt) + s.max_tokens
            if need > self.config.max_kv_tokens or need > self.max_len:
                raise ValueError(f"prompt + max_tokens = {need} tokens exceeds the server's limit of "
                                 f"{min(self.config.max_kv_tokens, self.max_len)}")
        req = Request(request_id, sink)
        req.sequences = [Sequence(req, s, self.tokenizer, self.eos_ids, self.max_len) for s in specs]
        with self._cv:
            if self._queued + len(specs) > self.config.max_queue:
                raise QueueFull(f"{self._queued} sequences are waiting (--max-queue {self.config.max_queue})")
            self._queued += len(specs)
            self._inbox.append(req)
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        """Drop the request's sequences, queued or running, at the next step (a no-op once it has finished)."""
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    def load(self) -> dict:
        with self._cv:
            return {"running": len(self.running), "waiting": self._queued, "kv_reserved": self.reserved,
                    "kv_tokens": sum(s.cached for s in self.running)}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="moekit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # the engine thread -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not (self._stopping or self._inbox or self._aborts or self.waiting or self.running):
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # a failed step fails its sequences, not the server
                log.exception("engine step failed")
                for seq in list(self.running):
                    self._finish(seq, "error", [])
                self._flush_events()

    def step(self) -> bool:
        """Take new requests and aborts, admit, run one forward, sample, emit. False when there was nothing to do."""
        self._take_inbox()
        self._admit()
        plan = self._plan()
        if not plan:
            return False
        t0 = time.monotonic()
        logits = self._forward(plan)
        samplers = [seq.sampler for seq, _, emits in plan if emits]
        tokens, logprobs = sample_step(logits, samplers) if samplers else ([], [])
        now = time.monotonic()
        it = iter(zip(tokens, logprobs))
        for seq, n, emits in plan:
            seq.cached += n
            if emits:
                self._on_token(seq, *next(it), now)
        self.steps += 1
        if self.hooks is not None:
            self.hooks.on_step(sum(n for _, n, _ in plan), len(samplers), now - t0, self)
        self._flush_events()
        return True

    def _take_inbox(self) -> None:
        with self._cv:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for req in inbox:
            self.waiting.extend(req.sequences)
        if aborts:
            gone = [s for s in self.waiting if s.request.id in aborts]
            self.waiting = deque(s for s in self.waiting if s.request.id not in aborts)
            with self._cv:
                self._queued -= len(gone)
            for seq in gone + [s for s in self.running if s.request.id in aborts]:
                self._release(seq, "abort")

    def _admit(self) -> None:
        cfg = self.config
        while self.waiting and len(self.running) < cfg.max_batch \
                and self.reserved + self.waiting[0].reserved <= cfg.max_kv_tokens:
            seq = self.waiting.popleft()
            with self._cv:
                self._queued -= 1
            seq.kv = attention.SequenceKV(seq.reserved) if self.batched else None
            seq.admitted = time.monotonic()
            self.reserved += seq.reserved
            self.running.append(seq)
            if self.hooks is not None:
                self.hooks.on_admit(seq)

    def _plan(self) -> list[tuple[Sequence, int, bool]]:
        """(sequence, tokens it puts through this step, whether the step ends with a token sampled for it)."""
        decoding = [(s, 1, True) for s in self.running if s.cached >= len(s.prompt)]
        budget = self.config.max_step_tokens - len(decoding)
        chunks = []
        for s in self.running:
            if s.cached < len(s.prompt) and budget > 0:
                n = min(len(s.prompt) - s.cached, budget)
                budget -= n
                chunks.append((s, n, s.cached + n == len(s.prompt)))
        return decoding + chunks

    def _forward(self, plan) -> torch.Tensor:
        """One forward of the packed step (batched), or one per sequence with its own transformers cache."""
        if not self.batched:
            return self._forward_each(plan)
        ids, pos, segments, keep = [], [], [], []
        for seq, n, emits in plan:
            segments.append(attention.Segment(seq.kv, len(ids), n, seq.cached))
            ids += seq.pending[:n]
            pos += range(seq.cached, seq.cached + n)
            if emits:
                keep.append(len(ids) - 1)
        with attention.step_context(segments), self._routed(plan), torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids], device=self.device),
                             position_ids=torch.tensor([pos], device=self.device), use_cache=False,
                             logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device))
        return out.logits[0]  # [rows sampled, V]

    def _routed(self, plan):
        """Route each sequence's rows of the packed step by its own routing (one policy per request in one batch)."""
        from moekit.routing import packed_spans

        if self.routing_hooks is None or all(seq.spec.routing is None for seq, _, _ in plan):
            return self._stock()
        return self.routing_hooks.use(packed_spans([seq.spec.routing for seq, _, _ in plan], [n for _, n, _ in plan]))

    def _stock(self):
        return self.routing_hooks.use([]) if self.routing_hooks is not None else contextlib.nullcontext()

    def _forward_each(self, plan) -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for seq, n, emits in plan:
                with self.routing_hooks.use(seq.spec.routing) if self.routing_hooks is not None else self._stock():
                    out = self.model(input_ids=torch.tensor([seq.pending[:n]], device=self.device), cache=seq.kv,
                                     use_cache=True, logits_to_keep=1)
                cache = getattr(out, "cache", None)  # the model's own cache (hybrid layers included), made on the first call
                seq.kv = cache if cache is not None else out.past_key_values
                if emits:
                    rows.append(out.logits[0, -1])
        return torch.stack(rows) if rows else torch.empty(0)

    def _on_token(self, seq: Sequence, token: int, lp: TokenLogprobs | None, now: float) -> None:
        seq.generated.append(token)
        if self.hooks is not None:
            self.hooks.on_token(seq, now)
        seq.first_token = seq.first_token or now
        seq.last_token = now
        if token in seq.end_ids:  # EOS or a stop id: not part of the text; what was held back is final now
            self._finish(seq, "stop", [], self._rest(seq))
            return
        text = seq.stops.push(seq.detok.push(token))
        lps = [lp] if lp is not None else []
        if seq.stops.stopped:
            self._finish(seq, "stop", [token], text, lps)
        elif len(seq.generated) >= seq.spec.max_tokens or len(seq.prompt) + len(seq.generated) >= self.max_len:
            rest = self._rest(seq)  # the held-back text may hold a complete stop string (behind a longer pending one)
            self._finish(seq, "stop" if seq.stops.stopped else "length", [token], text + rest, lps)
        else:
            self._emit(seq, Event(seq.spec.index, text, [token], lps))

    @staticmethod
    def _rest(seq: Sequence) -> str:
        """The text held back (incomplete characters, a possible stop-string start), at the end of a sequence."""
        text = seq.stops.push(seq.detok.flush())
        return text if seq.stops.stopped else text + seq.stops.flush()

    def _finish(self, seq, reason: str, tokens, text: str = "", lps=()) -> None:
        self._emit(seq, Event(seq.spec.index, text, list(tokens), list(lps), reason, len(seq.prompt),
                              len(seq.generated)))
        self._release(seq, reason)

    def _release(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.reserved -= seq.reserved
        seq.finish, seq.kv = reason, None
        if self.hooks is not None:
            self.hooks.on_finish(seq, reason)

    def _emit(self, seq: Sequence, event: Event) -> None:
        self._events.setdefault(seq.request, []).append(event)

    def _flush_events(self) -> None:
        events, self._events = self._events, {}
        for req, evs in events.items():
            try:
                req.sink(evs)
            except Exception:  # a broken sink (client gone) must not stop the others
                log.exception("delivering results of %s failed", req.id)
