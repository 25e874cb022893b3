"""/metrics: vLLM's request metrics under vLLM's names and labels (`model_name`, `engine`), so existing dashboards and
`vllm bench` read them, plus the expert cache, labelled by MoE layer at most (never by expert: unbounded series).

vLLM names (vllm/v1/metrics/loggers.py): gauges vllm:num_requests_running, vllm:num_requests_waiting,
vllm:kv_cache_usage_perc; counters vllm:prompt_tokens, vllm:generation_tokens, vllm:request_success{finished_reason};
histograms vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds, vllm:time_per_output_token_seconds
(the older name of the same per-token gap), vllm:request_time_per_output_token_seconds (per request),
vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds, vllm:request_prefill_time_seconds,
vllm:request_decode_time_seconds, vllm:request_prompt_tokens, vllm:request_generation_tokens,
vllm:iteration_tokens_total. One difference: vLLM counts requests, moekit counts sequences (a request with n=4 is four),
which is what occupies the batch. finished_reason is stop, length, abort (client gone) or error.
Expert cache (read from the runtime's own per-layer counters at scrape time, so nothing is counted twice):
moekit:expert_cache_{hits,misses,evictions}_total, moekit:expert_bytes_read_total, moekit:expert_io_wait_seconds_total,
moekit:expert_prefetch_reads_total (all {layer}), moekit:expert_page_cache_bytes_total (what the OS page cache served
of those bytes, no disk read), gauges moekit:expert_cache_capacity (experts per layer) and
moekit:expert_cache_budget_bytes, and the histogram moekit:experts_per_step{layer}: distinct experts a step used.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets (loggers.py)
_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
         160.0, 640.0, 2560.0]
_TPOT = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_REQUEST = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
            960.0, 1920.0, 7680.0]
_ITERATION = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
LABELS = ("model_name", "engine")


def _1_2_5(limit: int) -> list[int]:
    """vLLM's build_1_2_5_buckets: 1, 2, 5, 10, 20, 50, ... up to limit."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(m * scale)
        scale *= 10


class ServerMetrics:
    """The engine's hooks (on_admit, on_token, on_finish, on_step) fill these; `registry` is what /metrics renders."""

    def __init__(self, model_name: str, max_model_len: int):
        disable_created_metrics()  # no *_created series: the server's only registry, dashboards do not read them
        self.registry = CollectorRegistry()
        self.labels = (model_name, "0")
        self.engine = None  # set once loaded: the gauges read its load
        self.offloaded = None  # the OffloadedModel: the expert counters are read from it

        def hist(name, doc, buckets, extra=()):
            h = Histogram(name, doc, [*LABELS, *extra], buckets=buckets, registry=self.registry)
            return h if extra else h.labels(*self.labels)

        def counter(name, doc, extra=()):
            c = Counter(name, doc, [*LABELS, *extra], registry=self.registry)
            return c if extra else c.labels(*self.labels)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.success = counter("vllm:request_success", "Count of finished sequences by reason.", ("finished_reason",))
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", _TTFT)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _TPOT)
        self.tpot_old = hist("vllm:time_per_output_token_seconds",
                             "Histogram of time per output token in seconds (the inter-token gap).", _TPOT)
        self.tpot = hist("vllm:request_time_per_output_token_seconds",
                         "Histogram of time per output token of each request (its decode time / (tokens - 1)).", _TPOT)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", _REQUEST)
        self.queue = hist("vllm:request_queue_time_seconds", "Histogram of time spent waiting for admission.", _REQUEST)
        self.prefill = hist("vllm:request_prefill_time_seconds", "Histogram of time spent in prefill.", _REQUEST)
        self.decode = hist("vllm:request_decode_time_seconds", "Histogram of time spent in decode.", _REQUEST)
        self.req_prompt = hist("vllm:request_prompt_tokens", "Number of prefill tokens per request.",
                               _1_2_5(max_model_len))
        self.req_gen = hist("vllm:request_generation_tokens", "Number of generated tokens per request.",
                            _1_2_5(max_model_len))
        self.iteration = hist("vllm:iteration_tokens_total", "Histogram of number of tokens per engine step.",
                              _ITERATION)
        self.rejected = Counter("moekit:requests_rejected", "Requests refused with 503 because the queue was full.",
                                LABELS, registry=self.registry).labels(*self.labels)
        self.experts_step = None  # per-layer histogram, made once the model is known (its expert count)
        self._seen: list[int] = []
        self.registry.register(_Collector(self))

    def attach(self, engine, offloaded) -> None:
        self.engine, self.offloaded = engine, offloaded
        layers = getattr(offloaded, "layers", [])
        if layers:
            num = layers[0].layer.num_experts
            buckets = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < num} | {num})
            self.experts_step = Histogram("moekit:experts_per_step", "Distinct experts one step used, per MoE layer.",
                                          [*LABELS, "layer"], buckets=buckets, registry=self.registry)
            self._seen = [self._looked(rt) for rt in layers]

    @staticmethod
    def _looked(rt) -> int:
        return rt.policy.hits + rt.policy.misses  # one look-up per distinct expert per step

    # engine hooks (engine thread) -------------------------------------------------------------------------------
    def on_admit(self, seq) -> None:
        self.queue.observe(seq.admitted - seq.request.arrival)

    def on_token(self, seq, now: float) -> None:
        self.generation_tokens.inc()
        if seq.first_token is None:
            self.ttft.observe(now - seq.request.arrival)
            self.prompt_tokens.inc(len(seq.prompt))
        else:
            self.itl.observe(now - seq.last_token)
            self.tpot_old.observe(now - seq.last_token)

    def on_finish(self, seq, reason: str) -> None:
        now = time.monotonic()
        self.success.labels(*self.labels, reason).inc()
        self.e2e.observe(now - seq.request.arrival)
        if seq.first_token is not None:
            self.prefill.observe(seq.first_token - seq.admitted)
            self.decode.observe(seq.last_token - seq.first_token)
            if len(seq.generated) > 1:
                self.tpot.observe((seq.last_token - seq.first_token) / (len(seq.generated) - 1))
        self.req_prompt.observe(len(seq.prompt))
        self.req_gen.observe(len(seq.generated))

    def on_step(self, tokens: int, sampled: int, seconds: float, engine) -> None:
        self.iteration.observe(tokens)
        if self.experts_step is None:
            return
        for i, rt in enumerate(self.offloaded.layers):
            looked = self._looked(rt)
            self.experts_step.labels(*self.labels, str(rt.layer.index)).observe(looked - self._seen[i])
            self._seen[i] = looked


class _Collector:
    """Gauges of the engine's load and the runtime's expert counters, read when /metrics is scraped."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics

    def collect(self):
        m = self.m
        labels = list(LABELS)
        running = GaugeMetricFamily("vllm:num_requests_running", "Sequences in the running batch.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Sequences waiting for admission.", labels=labels)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV tokens held / --max-kv-tokens (1 means full).",
                               labels=labels)
        if m.engine is not None:
            load = m.engine.load()
            running.add_metric(m.labels, load["running"])
            waiting.add_metric(m.labels, load["waiting"])
            kv.add_metric(m.labels, load["kv_tokens"] / m.engine.config.max_kv_tokens)
        yield from (running, waiting, kv)
        layers = getattr(m.offloaded, "layers", None)
        if not layers:
            return
        per_layer = [*labels, "layer"]
        fams = {key: CounterMetricFamily(f"moekit:{name}", doc, labels=per_layer) for key, (name, doc) in {
            "hits": ("expert_cache_hits", "Expert look-ups served from the cache."),
            "misses": ("expert_cache_misses", "Expert look-ups that read the store."),
            "evictions": ("expert_cache_evictions", "Experts evicted from the cache."),
            "bytes_read": ("expert_bytes_read", "Expert bytes read from the store."),
            "wait_s": ("expert_io_wait_seconds", "Seconds the layer waited for reads."),
            "prefetch_reads": ("expert_prefetch_reads", "Prefetches issued."),
        }.items()}
        for row in m.offloaded.stats():
            for key, fam in fams.items():
                fam.add_metric([*m.labels, str(row["layer"])], row[key])
        yield from fams.values()
        cached = CounterMetricFamily("moekit:expert_page_cache_bytes", "Expert bytes read that the OS page cache "
                                     "served (no disk read): the free tier beyond --budget.", labels=labels)
        cached.add_metric(m.labels, m.offloaded.totals()["page_cache_bytes"])
        yield cached
        cap = GaugeMetricFamily("moekit:expert_cache_capacity", "Experts each MoE layer's cache holds.", labels=labels)
        cap.add_metric(m.labels, m.offloaded.capacity)
        budget = GaugeMetricFamily("moekit:expert_cache_budget_bytes", "The --budget in bytes.", labels=labels)
        budget.add_metric(m.labels, m.offloaded.budget)
        yield from (cap, budget)
