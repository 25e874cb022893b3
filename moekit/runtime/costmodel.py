"""Fiddler's placement of missed experts (arXiv 2402.07033; also KTransformers): a missed expert either runs on the CPU
where its weights already are (only activations move), or its weights are copied to the GPU and it runs there. The CPU
and the copy engine + GPU work in parallel, so a step's latency is

    max( sum_{e on CPU} cpu_time(e),  sum_{e on GPU} (transfer_time + gpu_time(e)) )

and the placement minimises it (docs/conventions.md §Placement of missed experts: min over placements of
max(cpu_time, transfer_time + gpu_time)).
Exact by enumeration up to 12 misses; beyond that, the best split of the misses sorted by CPU cost (experts with the
fewest tokens go to the CPU first: their CPU time is small, their transfer cost fixed). Pure functions: tested on
CPU; only the engine's use of them needs a GPU.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Costs:
    cpu_s_per_token: float  # one expert, one token, on the CPU
    gpu_s_per_token: float  # one expert, one token, on the GPU (weights resident)
    transfer_s: float  # one expert's weights host -> GPU

    def cpu(self, tokens: int) -> float:
        return tokens * self.cpu_s_per_token

    def gpu(self, tokens: int) -> float:
        return self.transfer_s + tokens * self.gpu_s_per_token


def latency(tokens: list[int], on_cpu: list[bool], costs: Costs) -> float:
    cpu = sum(costs.cpu(t) for t, c in zip(tokens, on_cpu) if c)
    gpu = sum(costs.gpu(t) for t, c in zip(tokens, on_cpu) if not c)
    return max(cpu, gpu)


def place_misses(tokens: list[int], costs: Costs) -> list[bool]:
    """tokens[i] = tokens routed to missed expert i -> on_cpu[i] (True: compute on CPU, False: copy to GPU)."""
    m = len(tokens)
    if m == 0:
        return []
    if m <= 12:
        best = min(itertools.product((False, True), repeat=m), key=lambda p: (latency(tokens, list(p), costs), p))
        return list(best)
    order = sorted(range(m), key=lambda i: tokens[i])
    splits = []
    for n_cpu in range(m + 1):
        on_cpu = [False] * m
        for i in order[:n_cpu]:
            on_cpu[i] = True
        splits.append((latency(tokens, on_cpu, costs), n_cpu, on_cpu))
    return min(splits)[2]


def measure(layer_runtime, device) -> Costs:  # pragma: no cover - needs a GPU
    """Time one expert of `layer_runtime` on CPU and GPU and one host->GPU copy (median of 5)."""
    import time

    import torch

    w_cpu = layer_runtime.store.read(layer_runtime.layer.index, 0)
    h = next(iter(w_cpu.values())).shape[-1 if not layer_runtime.layer.layout.transposed else 0]
    x = torch.randn(1, h, dtype=next(iter(w_cpu.values())).dtype)
    m, k = layer_runtime.layer.experts, layer_runtime.kernel

    def timed(fn):
        out = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return sorted(out)[2]

    pinned = {n: v.pin_memory() for n, v in w_cpu.items()}
    w_gpu = {n: v.to(device) for n, v in pinned.items()}
    xg = x.to(device)
    return Costs(cpu_s_per_token=timed(lambda: k(m, x, w_cpu)), gpu_s_per_token=timed(lambda: k(m, xg, w_gpu)),
                 transfer_s=timed(lambda: {n: v.to(device, non_blocking=True) for n, v in pinned.items()}))
