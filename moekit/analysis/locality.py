"""Local routing consistency: SRP and SCH ("Not All Models Suit Expert Offloading", arXiv 2505.16056, github
ljcleo/moe-lrc).

Both are per layer, for segment lengths m (default 4, 16, 64, 256), over sliding windows of m consecutive tokens that
never cross a sequence boundary; sequences shorter than m contribute nothing.

SRP (segment routing performance): how well one fixed expert set per window, chosen by a threshold on in-window counts,
predicts the per-token top-k.  SCH (segment cache hit rate): hit rate of a per-layer cache whose eviction looks at the
current window.  Fast paths are vectorised (SRP: windowed counts via a cumulative sum; SCH: the batched priority-stack
kernel of _stack.py, all capacities in one pass as the paper does); `srp_reference` and `sch_reference` are slow literal
implementations of the definitions that the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekit.analysis import _reference, _stack
from moekit.analysis._common import check_capacities, check_ids, sequence_bounds

SEGMENT_LENGTHS = (4, 16, 64, 256)


@dataclass(frozen=True)
class SRPResult:
    """SRP per segment length, [M] each (M = len(segment_lengths)); NaN where no window exists."""

    segment_lengths: np.ndarray  # [M]
    f1: np.ndarray  # [M] SRP = best F1 over tau
    tau: np.ndarray  # [M] threshold reaching it (-1 if no window)
    matches: np.ndarray  # [M] at the best tau
    predictions: np.ndarray  # [M]
    actuals: np.ndarray  # [M]
    windows: np.ndarray  # [M] number of windows


def _check_segments(segment_lengths) -> np.ndarray:
    ms = np.asarray(segment_lengths, dtype=np.int64).reshape(-1)
    if ms.size == 0 or (ms < 1).any():
        raise ValueError(f"segment lengths must be positive integers, got {segment_lengths}")
    return ms


def srp_from_histogram(hist: np.ndarray, m: int) -> tuple[float, int, int, int, int]:
    """Best F1 over tau from the histogram of in-window counts c (hist[c] = #(window, expert) pairs), [m + 1].

    arXiv 2505.16056, SRP: the segment router selects expert e in a window when c_e >= tau; matches = sum of c_e over
    selected experts, predictions = m * |selected|, actuals = all top-k activations; F1 = 2 * matches / (predictions +
    actuals), summed over all windows and experts of the layer before the division (one tau per layer). tau ranges over
    0..m like the released code (src/30_srp_calc.py, where tau = 0 selects every expert).
    Returns (f1, tau, matches, predictions, actuals).
    """
    c = np.arange(m + 1)
    selected = np.cumsum(hist[::-1])[::-1]  # [m + 1] pairs with c >= tau
    matches = np.cumsum((c * hist)[::-1])[::-1]  # [m + 1]
    predictions = m * selected
    actuals = int(matches[0])
    denom = predictions + actuals
    f1 = np.where(denom > 0, 2 * matches / np.maximum(denom, 1), 0.0)
    best = int(np.argmax(f1))
    return float(f1[best]), best, int(matches[best]), int(predictions[best]), actuals


def window_count_histogram(ids, seq_id, n_experts: int, m: int) -> tuple[np.ndarray, int]:
    """Histogram [m + 1] of c_e over all windows of m tokens inside a sequence and all experts, and the window count:
    the sufficient statistic of SRP (arXiv 2505.16056; the released src/30_srp_calc.py keeps the same histogram)."""
    ids = check_ids(ids, n_experts)
    starts, lengths = sequence_bounds(seq_id, ids.shape[0])
    return _window_histograms(ids, starts, lengths, n_experts, np.array([m]))[0]


def _window_histograms(ids, starts, lengths, n_experts, ms, chunk: int = 1 << 16):
    """[(hist [m + 1], n_windows)] for each m, from one cumulative sum of the one-hot routing."""
    n_tokens = ids.shape[0]
    onehot = np.zeros((n_experts, n_tokens), dtype=np.uint16)  # [E, T]: expert-major, so the running sum is contiguous
    onehot[ids, np.arange(n_tokens)[:, None]] = 1
    # uint16 arithmetic wraps modulo 2**16, so differences of the running sum are exact for counts <= m < 2**16
    csum = np.zeros((n_experts, n_tokens + 1), dtype=np.uint16)  # [E, T + 1]
    np.cumsum(onehot, axis=1, dtype=np.uint16, out=csum[:, 1:])
    del onehot
    pos = np.arange(n_tokens) - np.repeat(starts, lengths)  # [T] position in its sequence
    room = np.repeat(lengths, lengths) - pos  # [T] tokens left in the sequence from here, inclusive
    out = []
    for m in ms:
        m = int(m)
        if m >= 2**16:
            raise ValueError(f"segment length {m} too large (max 65535)")
        hist = np.zeros(m + 1, dtype=np.int64)
        n_win = n_tokens + 1 - m
        valid = np.flatnonzero(room >= m)  # [Nw] starts of windows that stay inside their sequence
        n_valid = valid.size
        if n_valid < n_win // 2:  # long windows: few valid starts, gather just those
            for lo in range(0, n_valid, chunk):
                at = valid[lo:lo + chunk]
                counts = csum[:, at + m] - csum[:, at]  # [E, chunk]
                hist += np.bincount(counts.ravel(), minlength=m + 1)[: m + 1]
        else:  # short windows: contiguous slices of every start, invalid ones zeroed and taken back out of bin 0
            for lo in range(0, max(n_win, 0), chunk):
                hi = min(lo + chunk, n_win)
                counts = csum[:, lo + m:hi + m] - csum[:, lo:hi]  # [E, chunk] c_e of windows starting at lo..hi-1
                ok = room[lo:hi] >= m  # [chunk]
                counts *= ok.astype(np.uint16)
                hist += _count_histogram(counts, m)
                hist[0] -= int((~ok).sum()) * n_experts
        out.append((hist, n_valid))
    return out


def _count_histogram(counts: np.ndarray, m: int) -> np.ndarray:
    """Histogram [m + 1] of the values of counts [E, n] (uint16, each <= m).

    g experts' counts are packed into one base-(m+1) code first, so bincount (whose int64 conversion dominates) sees
    E/g times fewer values; the histogram is the sum of the code histogram's g marginals.
    """
    n_exp, base = counts.shape[0], m + 1
    g = max((d for d in range(1, n_exp + 1) if n_exp % d == 0 and base**d <= 2**16), default=1)
    if g == 1:
        return np.bincount(counts.ravel(), minlength=base)[:base]
    grouped = counts.reshape(n_exp // g, g, -1)  # [E/g, g, n]
    code = grouped[:, 0].copy()
    for r in range(1, g):  # digit r carries weight base**r; the largest code is base**g - 1 < 2**16
        code += grouped[:, r] * np.uint16(base**r)
    joint = np.bincount(code.ravel(), minlength=base**g).reshape((base,) * g)  # axis 0 = the highest digit
    return sum(joint.sum(axis=tuple(a for a in range(g) if a != keep)) for keep in range(g))


def segment_routing_performance(ids, seq_id, n_experts: int, segment_lengths=SEGMENT_LENGTHS) -> SRPResult:
    """SRP of one layer for each segment length (arXiv 2505.16056, Sec. 3; variant of the released code, see
    `srp_from_histogram`). ids [T, K]; windows never cross a sequence boundary."""
    ids = check_ids(ids, n_experts)
    ms = _check_segments(segment_lengths)
    starts, lengths = sequence_bounds(seq_id, ids.shape[0])
    rows = []
    for m, (hist, n_win) in zip(ms, _window_histograms(ids, starts, lengths, n_experts, ms)):
        rows.append(srp_from_histogram(hist, int(m)) + (n_win,) if n_win else (np.nan, -1, 0, 0, 0, 0))
    f1, tau, mat, pred, act, win = (np.array(col) for col in zip(*rows))
    return SRPResult(ms, f1.astype(float), tau.astype(np.int64), mat.astype(np.int64), pred.astype(np.int64),
                     act.astype(np.int64), win.astype(np.int64))


def srp_reference(ids, seq_id, n_experts: int, m: int) -> float:
    """Slow literal SRP (arXiv 2505.16056) for one layer and one m: loops over windows, experts and thresholds."""
    ids = check_ids(ids, n_experts)
    starts, lengths = sequence_bounds(seq_id, ids.shape[0])
    windows = []
    for start, length in zip(starts, lengths):
        rows = [set(r) for r in ids[start:start + length].tolist()]
        for i in range(length - m + 1):
            windows.append([sum(e in rows[j] for j in range(i, i + m)) for e in range(n_experts)])
    if not windows:
        return float("nan")
    best = 0.0
    for tau in range(m + 1):
        matches = sum(c for w in windows for c in w if c >= tau)
        predictions = m * sum(1 for w in windows for c in w if c >= tau)
        actuals = sum(c for w in windows for c in w)
        if predictions + actuals:
            best = max(best, 2 * matches / (predictions + actuals))
    return best


def segment_cache_hit_rate(ids, seq_id, n_experts: int, capacities, segment_lengths=SEGMENT_LENGTHS) -> np.ndarray:
    """SCH for each segment length and capacity: ids [T, K] -> [M, C]; ids [L, T, K] -> [L, M, C].

    arXiv 2505.16056, SCH, with the conventions of the released code (src/41_sch_calc.py, calc_fsf): per sequence, a
    per-layer cache of C experts that, when full, evicts the resident with the lowest priority = (uses in the current
    window, then most recent use); the window while processing token i is tokens i..i+m-1 (cut at the sequence end) and
    a use is consumed when its token's expert is inserted; a token's K experts are judged against the cache as it was
    before the token, then inserted in order (an insertion may evict another expert of the same token); the first C
    distinct experts of a sequence fill free space and count as hits; hit rate = hits / (T_s * K) per sequence, SCH =
    mean over sequences. Deviation: sequences shorter than m are left out (the released code only sees sequences of one
    fixed length >= m); a layer with none left gets NaN. The paper subsamples sequences ([::16]); we use them all.
    """
    ids = check_ids(ids, n_experts, allow_layers=True)
    ms = _check_segments(segment_lengths)
    caps = check_capacities(capacities)
    batch = _stack.make_batch(ids if ids.ndim == 3 else ids[None], *sequence_bounds(seq_id, ids.shape[-2]), n_experts)
    reuse = _stack.reuse(batch)
    _stack.window_uses(batch, reuse, ms)  # one scan for every m
    out = np.stack([sch_from_batch(batch, caps, int(m), reuse) for m in ms], axis=1)  # [L, M, C]
    return out if ids.ndim == 3 else out[0]


def sch_from_batch(batch: _stack.SeqBatch, caps: np.ndarray, m: int, reuse: _stack.Reuse | None = None) -> np.ndarray:
    """[L, C] SCH of an already laid-out batch for one segment length."""
    width = int(min(batch.n_experts, caps.max()))
    eff = _stack.effective_depths(batch, width, "sch", window=m, reuse_=reuse)
    return _stack.hit_rates(eff, batch, caps, min_len=m)


def sch_reference(ids, seq_id, n_experts: int, m: int, capacity: int) -> float:
    """Slow literal SCH (arXiv 2505.16056, released-code conventions) for one layer, one m and one capacity: a
    per-capacity simulation with Python sets, the reference for `segment_cache_hit_rate`."""
    ids = check_ids(ids, n_experts)
    starts, lengths = sequence_bounds(seq_id, ids.shape[0])
    rates = []
    for start, length in zip(starts, lengths):
        if length < m:
            continue
        rows = ids[start:start + length].tolist()
        state: dict = {}
        prio = _reference.sch_priority(rows, m, state)
        rates.append(_reference.simulate_hits(rows, int(capacity), prio, state) / (length * ids.shape[1]))
    return float(np.mean(rates)) if rates else float("nan")
