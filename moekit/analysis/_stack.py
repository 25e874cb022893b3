"""Batched priority-stack (Mattson) kernel: cache hits for every capacity in one pass.

Mattson et al. (1970), "Evaluation techniques for storage hierarchies": for any replacement policy that evicts the resident
with the lowest priority, where priorities do not depend on the cache size, the caches of all sizes are nested, so one
"stack" holds them all: the top C entries are the content of a cache of capacity C. The moe-lrc code
(arXiv 2505.16056, github ljcleo/moe-lrc, src/41_sch_calc.py and src/50_chr_calc.py) uses this to get SCH, LRU and Belady
hit rates for all capacities at once, one sequence at a time in Python.

Here the same update is vectorised over a batch of independent (layer, sequence) streams. When expert x is referenced and
sits at depth d (d = W if absent), the new stack is: x on top; at every level j < d the element that stays is the
higher-priority one of (old stack[j], carried element), and the carried element is the prefix minimum of old
stack[0..j-1]; at level d the carried element lands. With x's own entry replaced by -inf, the whole update is
`new[j] = max(old[j], prefix_min(old)[j-1])` for j >= 1, which numpy does in a few whole-array operations per reference.
Only the top W = max capacity entries are kept: the top-W prefix of the stack evolves on its own (it is the cache of
capacity W).

Keys pack (priority, expert id) into one int64 so that ties cannot happen and min/max carry the identity along.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MIN = -(1 << 62)  # marks the referenced expert's own entry during an update: below every real key


@dataclass(frozen=True)
class SeqBatch:
    """Independent (layer, sequence) streams laid out for vectorised stepping.

    Columns are sorted by length descending, so the streams still running at token t are the prefix [:active[t]].
    """

    ids: np.ndarray  # [Tmax, K, B] expert ids (padding = E, never read)
    lengths: np.ndarray  # [B] tokens per stream, descending
    active: np.ndarray  # [Tmax + 1] number of streams with length > t
    layer: np.ndarray  # [B] layer index of each column
    seq: np.ndarray  # [B] sequence index of each column
    n_experts: int
    n_layers: int
    n_seqs: int


def make_batch(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n_experts: int) -> SeqBatch:
    """Lay out ids [L, T, K] (contiguous sequences given by starts/lengths [S]) as a SeqBatch."""
    n_layers, n_tokens, top_k = ids.shape
    n_seqs = starts.size
    seq_len = np.tile(lengths, n_layers)  # [B]
    order = np.argsort(-seq_len, kind="stable")  # [B] longest first
    col_of = np.empty_like(order)
    col_of[order] = np.arange(order.size)
    t_max = int(lengths.max()) if n_seqs else 0
    dtype = np.int16 if n_experts + 2 < 2**15 else np.int32
    out = np.full((t_max, top_k, n_layers * n_seqs), n_experts, dtype=dtype)  # [Tmax, K, B]
    seq_of_tok = np.repeat(np.arange(n_seqs), lengths)  # [T]
    pos = np.arange(n_tokens) - np.repeat(starts, lengths)  # [T] position within its sequence
    for layer in range(n_layers):
        cols = col_of[layer * n_seqs + seq_of_tok]  # [T]
        out[pos, :, cols] = ids[layer]
    sorted_len = seq_len[order]
    active = (sorted_len[None, :] > np.arange(t_max + 1)[:, None]).sum(axis=1)  # [Tmax + 1]
    return SeqBatch(out, sorted_len, active, order // max(n_seqs, 1), order % max(n_seqs, 1),
                    n_experts, n_layers, n_seqs)


def next_use(batch: SeqBatch) -> np.ndarray:
    """Flat index (t * K + k) of the next reference of the same expert in the same stream, [Tmax, K, B].

    Never referenced again -> Tmax * K. A backward scan over tokens, vectorised over streams.
    """
    t_max, top_k, n_b = batch.ids.shape
    never = t_max * top_k
    last = np.full((batch.n_experts + 2) * n_b, never, dtype=np.int64)  # [(E+2) * B] flat
    col = np.arange(n_b)
    out = np.empty((t_max, top_k, n_b), dtype=np.int64)
    for t in range(t_max - 1, -1, -1):
        n = batch.active[t]
        for k in range(top_k - 1, -1, -1):
            fi = batch.ids[t, k, :n].astype(np.int64) * n_b + col[:n]
            out[t, k, :n] = last[fi]
            last[fi] = t * top_k + k
    return out


def effective_depths(batch: SeqBatch, width: int, policy: str, window: int = 0, block: int = 4096) -> np.ndarray:
    """Per reference: the smallest capacity at which it counts as a hit, minus one; [Tmax, K, B] int32.

    A reference is a hit at capacity C iff the returned value is < C, under the SCH conventions (arXiv 2505.16056,
    released code): per stream; a token's K experts are judged against the cache as it was before the token; the first
    C distinct experts of a stream fill free space and count as hits. For a first use the value is the number of
    distinct experts seen before it; otherwise it is the expert's stack depth at the token's start (`width` = deeper).

    policy: "lru" (priority = last use), "lfu" (uses so far in the stream, then last use), "belady" (sooner next use),
    "sch" (uses in the window of `window` tokens starting at the current one, a use consumed when processed, then
    last use).
    """
    out = np.empty(batch.ids.shape, dtype=np.int32)
    n_b = batch.ids.shape[2]
    nxt = next_use(batch) if policy == "belady" else None
    for lo in range(0, n_b, block):
        hi = min(lo + block, n_b)
        sub = SeqBatch(batch.ids[:, :, lo:hi], batch.lengths[lo:hi],
                       np.minimum(np.maximum(batch.active - lo, 0), hi - lo), batch.layer[lo:hi], batch.seq[lo:hi],
                       batch.n_experts, batch.n_layers, batch.n_seqs)
        out[:, :, lo:hi] = _run_block(sub, width, policy, window, None if nxt is None else nxt[:, :, lo:hi])
    return out


def _run_block(batch: SeqBatch, width: int, policy: str, window: int, nxt: np.ndarray | None) -> np.ndarray:
    ids = batch.ids
    t_max, top_k, n_b = ids.shape
    n_e = batch.n_experts
    empty_id = n_e + 1
    sh = (n_e + 1).bit_length()  # id bits
    ts = max(t_max * top_k, 1).bit_length()  # timestamp bits inside a priority
    cnt_shift = sh + ts
    if (max(window, t_max) + 2).bit_length() + cnt_shift > 61:
        raise ValueError("trace too long for the packed 64-bit stack keys; split sequences")
    empty_key = (-1 << sh) | empty_id  # free slot: lower priority than any expert, so it is "evicted" first
    col = np.arange(n_b, dtype=np.int64)
    cur = (np.arange(n_e + 2, dtype=np.int64)[:, None] + np.zeros(n_b, np.int64)[None, :])  # [E+2, B] key of each expert
    cur[empty_id] = empty_key
    if policy == "sch":
        # window counts for the first token's window, tokens 0..m-1 (arXiv 2505.16056 released code, calc_fsf)
        for t in range(min(window, t_max)):
            n = batch.active[t]
            for k in range(top_k):
                cur[ids[t, k, :n], col[:n]] += 1 << cnt_shift
    cur = cur.reshape(-1)  # flat [(E+2) * B]
    stack = np.full((width, n_b), empty_key, dtype=np.int64)  # [W, B] keys, top first
    pm = np.empty((width, n_b), dtype=np.int64)
    seen = np.zeros((n_e + 2) * n_b, dtype=bool)
    n_seen = np.zeros(n_b, dtype=np.int64)
    eff = np.full((t_max, top_k, n_b), width, dtype=np.int32)
    depth_rows = np.arange(width, dtype=np.float32)
    for t in range(t_max):
        n = batch.active[t]
        x_all = ids[t, :, :n].astype(np.int64)  # [K, n]
        fi_all = x_all * n_b + col[:n]  # [K, n]
        # depth at the token's start of each of its K experts (width = not among the top W)
        st = stack[:, :n]
        eq = st[:, None, :] == cur[fi_all][None, :, :]  # [W, K, n]
        found = eq.any(axis=0)  # [K, n]
        depth = np.tensordot(depth_rows, eq.astype(np.float32), axes=(0, 0))  # [K, n]
        depth = np.where(found, depth.astype(np.int32), width)
        for k in range(top_k):
            fi = fi_all[k]
            first = ~seen[fi]  # [n]
            eff[t, k, :n] = np.where(first, n_seen[:n], depth[k])
            n_seen[:n] += first
            seen[fi] = True
            old = cur[fi]  # [n]
            s = t * top_k + k
            if policy == "lru":
                new = (s << sh) | x_all[k]
            elif policy == "belady":
                new = ((t_max * top_k - nxt[t, k, :n]) << sh) | x_all[k]
            else:
                step = 1 if policy == "lfu" else -1  # lfu counts the use; sch consumes it from the window
                new = (((old >> cnt_shift) + step) << cnt_shift) | (s << sh) | x_all[k]
            _push(st, old, new, pm[:, :n])
            cur[fi] = new
        if policy == "sch" and t + window < t_max and batch.active[t + window] > 0:
            n2 = batch.active[t + window]
            cur[ids[t + window, :, :n2].astype(np.int64) * n_b + col[:n2]] += 1 << cnt_shift
            n1 = batch.active[t + 1]
            st1 = stack[:, :n1]
            st1[...] = cur[(st1 & ((1 << sh) - 1)) * n_b + col[:n1]]  # refresh keys whose window count changed
    return eff


def _push(st: np.ndarray, old: np.ndarray, new: np.ndarray, pm: np.ndarray) -> None:
    """Reference the expert whose current key is `old` (per column): move it to the top with key `new`. In place.

    st, pm: [W, n]; old, new: [n]. Rows below the expert's old depth are left unchanged because its entry becomes
    the minimum, which stops the carried element there.
    """
    np.copyto(st, _MIN, where=st == old)
    pm[0] = st[0]
    for j in range(1, st.shape[0]):  # prefix minimum; a Python loop over W rows beats minimum.accumulate(axis=0)
        np.minimum(pm[j - 1], st[j], out=pm[j])
    np.maximum(st[1:], pm[:-1], out=st[1:])
    st[0] = new


def hit_rates(eff: np.ndarray, batch: SeqBatch, capacities: np.ndarray, min_len: int = 1) -> np.ndarray:
    """Hit rate per layer and capacity, [L, C]: hits / (T_s * K) per stream, then the mean over its layer's streams.

    Streams shorter than `min_len` tokens are left out (SCH: sequences shorter than the segment length m). A layer with
    no stream left gets NaN.
    """
    top_k = eff.shape[1]
    valid = np.arange(eff.shape[0])[:, None] < batch.lengths[None, :]  # [Tmax, B]
    out = np.full((batch.n_layers, capacities.size), np.nan)
    keep = batch.lengths >= min_len  # [B]
    per_layer = np.bincount(batch.layer[keep], minlength=batch.n_layers)  # [L]
    for c, cap in enumerate(capacities):
        hits = ((eff < cap) & valid[:, None, :]).sum(axis=(0, 1))  # [B]
        rate = hits / np.maximum(batch.lengths * top_k, 1)  # [B]
        sums = np.bincount(batch.layer[keep], weights=rate[keep], minlength=batch.n_layers)  # [L]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, c] = np.where(per_layer > 0, sums / np.maximum(per_layer, 1), np.nan)
    return out
