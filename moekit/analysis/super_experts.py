"""Super Experts: the few experts whose down-projection output has extreme outliers ("Unveiling Super Experts in
Mixture-of-Experts Large Language Models", arXiv 2507.23279, github ZunhaiSu/Super-Experts-Profilling)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SuperExpert:
    layer: int
    expert: int
    value: float  # max |down_proj output| seen on calibration data


def super_experts(output_max, layer_fraction: float = 0.75, percentile: float = 99.5,
                  relative: float = 0.1) -> list[SuperExpert]:
    """Super experts from per-layer, per-expert max |output| of the down projection, output_max [L, E].

    arXiv 2507.23279 as docs/conventions.md §Routing statistics states it: keep the first 75% of layers (floor(0.75 *
    L), at least one); a super expert has output_max above the 99.5th percentile of all kept experts' values (numpy's
    default linear interpolation) AND above max(output_max) / 10. Our reading: both comparisons strict, both thresholds
    taken over the kept layers only. Returns rows sorted by value, largest first.
    """
    out = np.asarray(output_max, dtype=np.float64)
    if out.ndim != 2 or out.size == 0:
        raise ValueError(f"output_max must be a non-empty [L, E] array, got shape {out.shape}")
    if not np.isfinite(out).all() or (out < 0).any():
        raise ValueError("output_max must be finite and non-negative (it is a max of absolute values)")
    if not 0 < layer_fraction <= 1 or not 0 <= percentile <= 100:
        raise ValueError("layer_fraction must be in (0, 1] and percentile in [0, 100]")
    kept = out[: max(1, math.floor(layer_fraction * out.shape[0]))]  # [L', E]
    threshold = max(float(np.percentile(kept, percentile)), relative * float(kept.max()))
    layers, experts = np.nonzero(kept > threshold)
    rows = [SuperExpert(int(layer), int(e), float(kept[layer, e])) for layer, e in zip(layers, experts)]
    return sorted(rows, key=lambda r: -r.value)
