"""Expert ablation: zero chosen experts and measure the held-out perplexity change.

The Super Experts check (arXiv 2507.23279): zeroing the super experts found from a trace's activation statistics
should hurt far more than zeroing the same number of random experts. Reported as measured, whatever it shows.
"""

from __future__ import annotations

import numpy as np
import torch

from moekit.analysis.super_experts import super_experts
from moekit.errors import UserError
from moekit.models.view import MoEView

CHOICES = ("super", "random", "top")


def zero_experts(view: MoEView, experts: list[tuple[int, int]]) -> None:
    """Zero the weights (and biases) of (trace layer, expert) pairs: the expert then outputs 0 for every token. A loop
    layer's further passes (trace indices past the last layer, view.trace_layers()) share its weights."""
    layers = {index: layer for index, layer, *_ in view.trace_layers()}
    for layer_index, e in experts:
        layer = layers[layer_index] if layer_index in layers else view.layer(layer_index)  # KeyError names the layers
        layer.set_expert(e, {k: torch.zeros_like(v) for k, v in layer.expert_views(e).items()})


def check_fits(trace, view: MoEView) -> None:
    """The trace must come from this model: its MoE layers (with a loop layer's further passes) and expert count."""
    layers = [index for index, *_ in view.trace_layers()]
    if trace.num_experts != view.num_experts or not set(trace.layers) <= set(layers):
        raise UserError(f"{trace.folder} was recorded with another model (MoE layers {trace.layers}, "
                        f"{trace.num_experts} experts; this one has {layers}, {view.num_experts}): record the trace "
                        f"with this model")


def choose_experts(trace, how: str, count: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
    """(decoder layer, expert) pairs to ablate: the paper's super experts, the `count` experts with the largest
    max |down_proj output| in the first 75% of layers ("top"), or `count` random experts from those same layers."""
    if how not in CHOICES:
        raise UserError(f"--experts {how}: choose one of {', '.join(CHOICES)}")
    stats = trace.activation_stats
    if stats is None:
        raise UserError(f"{trace.folder} has no activation statistics: record it with `moekit trace ... "
                        f"--activation-stats`")
    output_max = stats[1]  # [L, E]
    kept_layers = max(1, int(0.75 * output_max.shape[0]))
    if how == "super":
        rows = [(trace.layers[r.layer], r.expert) for r in super_experts(output_max)]
        if not rows:
            raise UserError("no expert passes the super-expert rule on this trace; compare the largest outliers "
                            "with `--experts top --count N` instead")
        return rows
    if not count or count < 1:
        raise UserError(f"--experts {how} needs --count N (N >= 1)")
    kept = output_max[:kept_layers]  # [L', E]
    if how == "top":
        flat = np.argsort(-kept, axis=None, kind="stable")[:count]
    else:
        flat = np.random.default_rng(seed).choice(kept.size, size=min(count, kept.size), replace=False)
    return [(trace.layers[i // kept.shape[1]], int(i % kept.shape[1])) for i in flat]
