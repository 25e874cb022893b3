"""Matplotlib figures of the routing-analysis results (the dict from moekit.analysis.run.analyze_arrays).

Object-oriented matplotlib on the Agg canvas: no pyplot, no global backend switch, safe to call from any thread.
Every function takes parts of `results` (JSON values: None where a number is undefined) and returns a Figure.
"""

from __future__ import annotations

import warnings

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MANY_LAYERS = 8  # above this, line plots show the mean over layers with a min-max band instead of one line per layer


def as_array(x) -> np.ndarray:
    """JSON numbers (None = undefined) -> float array with NaN."""
    return np.array(x, dtype=float)


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return -(-n // cols), cols


def usage_heatmap(frequency, layer_names: Sequence[str]) -> Figure:
    """Expert load per layer: f_e * E (1 = perfectly even), layers x experts."""
    f = as_array(frequency)  # [L, E]
    n_layers, n_experts = f.shape
    fig = new_figure(min(3 + 0.18 * n_experts, 16), min(1.5 + 0.3 * n_layers, 12))
    ax = fig.add_subplot()
    im = ax.imshow(f * n_experts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(n_layers), labels=list(layer_names))
    fig.colorbar(im, ax=ax, label="load f_e x E (1 = even)")
    return fig


def matrix_grid(mats: Sequence, titles: Sequence[str], xlabel: str, ylabel: str, clabel: str,
                ylabels: Sequence[str] | None = None, vmin=None, vmax=None, cmap: str = "magma") -> Figure:
    """One heatmap per matrix (e.g. per layer), sharing a colour scale."""
    arrays = [as_array(m) for m in mats]
    rows, cols = _grid(len(arrays))
    fig = new_figure(4.2 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays] + [np.zeros(0)])
    lo = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
    hi = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
    im = None
    for ax, a, title in zip(axes.flat, arrays, titles):
        im = ax.imshow(a, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        if ylabels is not None:
            ax.set_yticks(range(len(ylabels)), labels=list(ylabels), fontsize=7)
    for ax in list(axes.flat)[len(arrays):]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=axes, label=clabel, shrink=0.8)
    return fig


def _layer_lines(ax, x, values, layer_names, **style) -> None:
    """values [L, X]: one line per layer, or the mean with a min-max band when there are many layers."""
    values = as_array(values)
    if values.shape[0] <= MANY_LAYERS:
        for name, row in zip(layer_names, values):
            ax.plot(x, row, marker="o", ms=3, label=f"layer {name}", **style)
    else:
        with np.errstate(all="ignore"):
            ax.fill_between(x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), alpha=0.2, **style)
            ax.plot(x, np.nanmean(values, axis=0), marker="o", ms=3, label=f"mean of {values.shape[0]} layers", **style)


def lrc_curves(locality: dict, layer_names: Sequence[str], multiples: Sequence[int]) -> Figure:
    """SRP and SCH versus segment length m (arXiv 2505.16056), SCH at each cache size (multiples of top-k)."""
    ms = np.asarray(locality["segment_lengths"])
    sch = as_array(locality["sch"])  # [L, M, C]
    rows, cols = _grid(1 + sch.shape[2], 3)
    fig = new_figure(4.2 * cols, 3.3 * rows)
    grid = fig.subplots(rows, cols, squeeze=False).flat
    axes = [next(grid) for _ in range(1 + sch.shape[2])]
    for spare in grid:
        spare.set_visible(False)
    _layer_lines(axes[0], ms, locality["srp"], layer_names)
    axes[0].set_title("SRP (best F1 of a segment router)", fontsize=9)
    for c, ax in enumerate(axes[1:]):
        _layer_lines(ax, ms, sch[:, :, c], layer_names)
        ax.set_title(f"SCH, cache = {multiples[c]}x top-k", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, labels=[str(m) for m in ms])
        ax.set_xlabel("segment length m")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


POLICY_STYLE = {
    "lru": {"color": "tab:blue", "marker": "o", "label": "LRU"},
    "lfu": {"color": "tab:orange", "marker": "s", "label": "LFU"},
    "belady": {"color": "tab:green", "marker": "^", "label": "Belady MIN"},
    "opt": {"color": "black", "linestyle": "--", "marker": "", "label": "opt (ceiling)"},
}


def hit_rate_curves(cache: dict, locality: dict, multiples: Sequence[int]) -> Figure:
    """Hit rate vs cache size (multiples of top-k), mean over layers, per policy; opt is the offline ceiling under
    these conventions; SCH (window-aware eviction) at each m for comparison, same conventions."""
    x = np.asarray(multiples)
    fig = new_figure(6.5, 4.2)
    ax = fig.add_subplot()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (segments longer than every sequence)
        for m, curve in zip(locality["segment_lengths"], np.nanmean(as_array(locality["sch"]), axis=0)):
            ax.plot(x, curve, color="tab:purple", alpha=0.35 + 0.15 * np.log2(m) / 8, lw=1, label=f"SCH m={m}")
        for policy in cache["policies"]:
            ax.plot(x, np.nanmean(as_array(cache[policy]), axis=0), ms=4, **POLICY_STYLE.get(policy, {"label": policy}))
    ax.set_xticks(x, labels=[f"{k}x" for k in x])
    ax.set_xlabel("cache size (multiples of top-k, per layer)")
    ax.set_ylabel("hit rate (mean over layers)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    return fig
