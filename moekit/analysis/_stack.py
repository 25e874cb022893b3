"""Batched priority-stack (Mattson) kernel: cache hits for every capacity in one pass.

Mattson et al. (1970), "Evaluation techniques for storage hierarchies": for any replacement policy that evicts the
resident with the lowest priority, where priorities do not depend on the cache size, the caches of all sizes are
nested, so one "stack" holds them all: the top C entries are the content of a cache of capacity C. The moe-lrc code
(arXiv 2505.16056, github ljcleo/moe-lrc, src/41_sch_calc.py and src/50_chr_calc.py) uses this to get SCH, LRU and
Belady hit rates for all capacities at once, one sequence at a time in Python.

Here the same update is vectorised over a batch of independent (layer, sequence) streams. When expert x is referenced
and sits at depth d (d = W if absent), the new stack is: x on top; at every level j < d the element that stays is the
higher-priority one of (old stack[j], carried element), and the carried element is the prefix minimum of old
stack[0..j-1]; at level d the carried element lands. With x's own entry replaced by -inf, the whole update is
`new[j] = max(old[j], prefix_min(old)[j-1])` for j >= 1: a few whole-array numpy operations per reference. Only the top
W = max capacity entries are kept: the top-W prefix of the stack evolves on its own (it is the cache of capacity W).

Keys pack (priority, last use, expert id) into one integer so that ties cannot happen and min/max carry the identity.
Everything that does not depend on the stack (first uses, previous and next use, window counts, hence every reference's
key before and after its use) is computed up front by vectorised scans, so the per-reference work is the push alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

_NOT_FOUND = -2  # key of an expert with no entry (first use): matches nothing
_EMPTY = -1  # free slot: below every real key (>= 0), so the first C distinct experts fill free space first
_PAD = 32767  # effective depth of padding references (beyond a stream's end)
_MARK = {t: np.iinfo(t).min for t in (np.int32, np.int64)}  # the referenced expert's entry during a push: below all


@dataclass(frozen=True)
class SeqBatch:
    """Independent (layer, sequence) streams laid out for vectorised stepping.

    Columns are sorted by length descending, so the streams still running at token t are the prefix [:active[t]].
    """

    ids: np.ndarray  # [Tmax, K, B] int32 expert ids (padding = E, never read)
    flat: np.ndarray  # [Tmax, K, B] ids * B + column (int32 when it fits): index into [E+1, B] tables, flattened
    lengths: np.ndarray  # [B] tokens per stream, descending
    active: np.ndarray  # [Tmax + 1] number of streams with length > t
    layer: np.ndarray  # [B] layer index of each column
    seq: np.ndarray  # [B] sequence index of each column
    n_experts: int
    n_layers: int
    n_seqs: int


@dataclass(frozen=True)
class Reuse:
    """Policy-independent facts about every reference (t, k) of every stream, [Tmax, K, B] each."""

    cold: np.ndarray  # int16: first use -> distinct experts seen before it in the stream; otherwise _PAD
    prev: np.ndarray  # int32: flat index (t * K + k) of the same expert's previous reference, -1 if none
    rank: np.ndarray  # int32: uses of this expert in the stream so far, this one included
    next: np.ndarray  # int32: flat index of its next reference, Tmax * K if none
    window: dict = field(default_factory=dict)  # m -> uses of the expert in tokens t+1..t+m-1 (see window_uses)


def make_batch(ids, starts: np.ndarray, lengths: np.ndarray, n_experts: int) -> SeqBatch:
    """Lay out per-layer ids ([L, T, K] or a list of L [T, K] arrays; contiguous sequences given by starts/lengths [S])
    as a SeqBatch."""
    n_layers, (n_tokens, top_k) = len(ids), ids[0].shape
    if n_experts >= _PAD:
        raise ValueError(f"at most {_PAD - 1} experts per layer are supported by the stack kernel")
    if n_tokens == 0:
        raise ValueError("the trace has no tokens")
    n_seqs = starts.size
    seq_len = np.tile(lengths, n_layers)  # [B]
    order = np.argsort(-seq_len, kind="stable")  # [B] longest first
    t_max = int(lengths.max()) if n_seqs else 0
    if n_seqs and (lengths == t_max).all():  # equal lengths (the common case): the stable order is the identity
        rows = np.stack([np.asarray(layer, dtype=np.int32).reshape(n_seqs, t_max, top_k) for layer in ids])
    else:  # pad every sequence to Tmax (contiguous row writes), then put streams in length order
        rows = np.full((n_layers * n_seqs, t_max, top_k), n_experts, dtype=np.int32)  # [B, Tmax, K]
        seq_of_tok = np.repeat(np.arange(n_seqs), lengths)  # [T]
        pos = np.arange(n_tokens) - np.repeat(starts, lengths)  # [T] position within its sequence
        for layer in range(n_layers):
            rows[layer * n_seqs + seq_of_tok, pos] = ids[layer]
        rows = rows[order]
    out = np.ascontiguousarray(rows.reshape(-1, t_max, top_k).transpose(1, 2, 0))  # [Tmax, K, B]
    n_b = out.shape[2]
    flat_type = np.int32 if (n_experts + 1) * n_b < 2**31 else np.int64
    flat = np.multiply(out, n_b, dtype=flat_type)
    flat += np.arange(n_b, dtype=flat_type)
    sorted_len = seq_len[order]
    active = (sorted_len[None, :] > np.arange(t_max + 1)[:, None]).sum(axis=1)  # [Tmax + 1]
    return SeqBatch(out, flat, sorted_len, active, order // max(n_seqs, 1), order % max(n_seqs, 1),
                    n_experts, n_layers, n_seqs)


def reuse(batch: SeqBatch) -> Reuse:
    """One forward and one backward scan over tokens, vectorised over streams and the K slots of a token."""
    t_max, top_k, n_b = batch.ids.shape
    shape = (t_max, top_k, n_b)
    cold = np.full(shape, _PAD, dtype=np.int16)
    prev = np.full(shape, -1, dtype=np.int32)
    rank = np.zeros(shape, dtype=np.int32)
    nxt = np.full(shape, t_max * top_k, dtype=np.int32)
    last = np.full((batch.n_experts + 1) * n_b, -1, dtype=np.int32)  # flat [(E+1) * B]: latest reference
    count = np.zeros((batch.n_experts + 1) * n_b, dtype=np.int32)
    n_seen = np.zeros(n_b, dtype=np.int32)
    slot = np.arange(top_k, dtype=np.int32)[:, None]  # [K, 1]
    for t in range(t_max):
        n = batch.active[t]
        fi = batch.flat[t, :, :n]  # [K, n] (ids distinct in a token: no write conflicts)
        p = last[fi]
        prev[t, :, :n] = p
        first = p < 0
        order = np.cumsum(first, axis=0, dtype=np.int32)  # [K, n] first uses so far within the token
        cold[t, :, :n] = np.where(first, n_seen[:n] + order - 1, _PAD)
        n_seen[:n] += order[-1]
        c = count[fi] + 1
        count[fi] = c
        rank[t, :, :n] = c
        last[fi] = t * top_k + slot
    last[:] = t_max * top_k
    for t in range(t_max - 1, -1, -1):
        n = batch.active[t]
        fi = batch.flat[t, :, :n]
        nxt[t, :, :n] = last[fi]
        last[fi] = t * top_k + slot
    return Reuse(cold, prev, rank, nxt)


def window_uses(batch: SeqBatch, reuse_: Reuse, windows: Sequence[int]) -> None:
    """Fill reuse_.window[m], for every m in windows not there yet: uses of each reference's expert in the next m - 1
    tokens of its stream (t+1 .. t+m-1), [Tmax, K, B].

    One forward scan for all m: the running count of tokens that used each expert, read m - 1 tokens late.
    """
    ms = sorted({int(m) for m in windows} - set(reuse_.window))
    if not ms:
        return
    t_max, top_k, n_b = batch.ids.shape
    dtype = np.int16 if ms[-1] < 2**15 else np.int32
    outs = {m: np.zeros((t_max, top_k, n_b), dtype=dtype) for m in ms}
    count = np.zeros((batch.n_experts + 1) * n_b, dtype=np.int32)
    for u in range(t_max + ms[-1] - 1):
        if u < t_max:
            count[batch.flat[u, :, :batch.active[u]]] += 1
        for m in ms:
            t = u - m + 1
            if 0 <= t < t_max:
                n = batch.active[t]  # streams that ended before u keep their final count: the window is cut there
                outs[m][t, :, :n] = count[batch.flat[t, :, :n]] - reuse_.rank[t, :, :n]
    reuse_.window.update(outs)


def _key_dtype(bits: int):
    if bits <= 30:
        return np.int32
    if bits <= 62:
        return np.int64
    raise ValueError("trace too long for the packed 64-bit stack keys; split sequences")


def policy_keys(batch: SeqBatch, reuse_: Reuse, policy: str, window: int = 0):
    """Layout of the packed keys and a function t -> (old [K, n], new [K, n]): each reference's key before and after it.

    Key = (count << count_shift) | (timestamp << id_bits) | expert, larger = kept longer. Policies:
      lru     timestamp = flat index of the last use.
      lfu     count = uses so far in the stream (perfect LFU), timestamp = last use.
      belady  timestamp = Tmax * K - next use (sooner next use = higher); no count. opt: same keys.
      sch     count = uses in the current window not yet consumed, timestamp = last use (arXiv 2505.16056). Between
              tokens the window slides; stack_depths adds 1 to the count of the experts of the entering token.
    """
    t_max, top_k, _ = batch.ids.shape
    id_bits = max(int(batch.n_experts).bit_length(), 1)  # ids 0..E-1 < 2**id_bits, and EMPTY & mask is no id
    ts_bits = max(t_max * top_k, 1).bit_length()
    count_bits = (max(window, t_max) + 1).bit_length() if policy in ("lfu", "sch") else 0
    dtype = _key_dtype(id_bits + ts_bits + count_bits)
    csh = id_bits + ts_bits
    slot = np.arange(top_k, dtype=dtype)[:, None]  # [K, 1]
    if policy == "sch":
        window_uses(batch, reuse_, [window])
    wn = reuse_.window.get(window) if policy == "sch" else None
    never = dtype(t_max * top_k)

    def keys(t: int):
        n = batch.active[t]
        x = batch.ids[t, :, :n].astype(dtype, copy=False)  # [K, n]
        s = dtype(t * top_k) + slot
        prev = reuse_.prev[t, :, :n].astype(dtype, copy=False)
        if policy == "lru":
            old, new = (prev << id_bits) | x, (s << id_bits) | x
        elif policy in ("belady", "opt"):
            old = ((never - s) << id_bits) | x
            new = ((never - reuse_.next[t, :, :n].astype(dtype, copy=False)) << id_bits) | x
        elif policy == "lfu":
            r = reuse_.rank[t, :, :n].astype(dtype, copy=False)
            old, new = ((r - 1) << csh) | (prev << id_bits) | x, (r << csh) | (s << id_bits) | x
        else:  # sch: at x's previous use the window count became its uses in (t', t'+m-1]; slides since added those
            w = wn[t, :, :n].astype(dtype, copy=False)  # up to t+m-1, i.e. old count = w + 1 (this use, not consumed)
            old, new = ((w + 1) << csh) | (prev << id_bits) | x, (w << csh) | (s << id_bits) | x
        old[prev < 0] = _NOT_FOUND
        return old, new

    return dtype, id_bits, csh, keys


def stack_depths(batch: SeqBatch, reuse_: Reuse, width: int, policy: str, window: int = 0) -> np.ndarray:
    """Depth of every reference's expert in the stack at the start of its token, [Tmax, K, B] int16 (width = absent).

    A token's K experts are judged against the stack as it was before the token, then pushed in order (SCH
    conventions, arXiv 2505.16056 released code).
    """
    t_max, top_k, n_b = batch.ids.shape
    dtype, id_bits, csh, keys = policy_keys(batch, reuse_, policy, window)
    opt = policy == "opt"
    stack = np.full((width, n_b), _EMPTY, dtype=dtype)  # [W, B] keys, top first
    pm = np.empty_like(stack)
    depth = np.full((t_max, top_k, n_b), _PAD, dtype=np.int16)
    id_mask = (1 << id_bits) - 1
    for t in range(t_max):
        n = batch.active[t]
        st = stack[:, :n]
        old, new = keys(t)  # [K, n] each
        found = np.zeros(old.shape, dtype=bool)
        below = np.zeros(old.shape, dtype=np.int16)  # rows at or below the match
        for j in range(width):
            found |= st[j] == old
            below += found
        depth[t, :, :n] = width - below
        if opt:  # the token's experts compete with their priority after the token (their hits are already judged)
            for k in range(top_k):
                np.copyto(st, new[k], where=st == old[k])
            old = new
        for k in range(top_k):
            _push(st, old[k], new[k], pm[:, :n], bypass=opt)
        if policy == "sch" and t + window < t_max and batch.active[t + window] > 0:
            n2 = batch.active[t + window]
            st2 = stack[:, :n2]
            entering = batch.ids[t + window, :, :n2]  # [K, n2] the token that slides into the window
            ids_st = st2 & id_mask  # [W, n2]
            hit = ids_st == entering[0]
            for k in range(1, top_k):  # OR of K compares: several times cheaper than masked adds
                hit |= ids_st == entering[k]
            st2 += hit.astype(dtype) << csh
    return depth


def effective_depths(batch: SeqBatch, width: int, policy: str, window: int = 0, reuse_: Reuse | None = None):
    """Per reference, one less than the smallest capacity at which it is a hit, [Tmax, K, B] int16 (_PAD = padding).

    A reference is a hit at capacity C iff the value is < C, under the SCH conventions (arXiv 2505.16056, released
    code): per stream; a token's K experts are judged against the cache as it was before the token; the first C
    distinct experts of a stream fill free space and count as hits. A first use's value is the number of distinct
    experts seen before it (its depth is `width`, so the minimum picks it); otherwise it is the stack depth.
    """
    reuse_ = reuse(batch) if reuse_ is None else reuse_
    depth = stack_depths(batch, reuse_, width, policy, window)
    return np.minimum(depth, reuse_.cold, out=depth)


def _push(st: np.ndarray, old: np.ndarray, new: np.ndarray, pm: np.ndarray, bypass: bool = False) -> None:
    """Reference the expert whose current key is `old` (per column) and give it key `new`. In place.

    st, pm: [W, n]; old, new: [n]. Default: the expert goes on top (demand fetch: every cache holds it afterwards).
    Rows below its old depth are left unchanged because its entry becomes the minimum, which stops the carried element
    there. bypass=True: the expert enters as the carried element instead of on top, so a cache for which it has the
    lowest priority of residents + newcomer does not keep it (MIN with bypass).
    """
    st[st == old] = _MARK[st.dtype.type]
    if bypass:
        np.minimum(st[0], new, out=pm[0])
        np.maximum(st[0], new, out=st[0])
    else:
        pm[0] = st[0]
    for j in range(1, st.shape[0]):  # prefix minimum; a Python loop over W rows beats minimum.accumulate(axis=0)
        np.minimum(pm[j - 1], st[j], out=pm[j])
    np.maximum(st[1:], pm[:-1], out=st[1:])
    if not bypass:
        st[0] = new


def hit_rates(eff: np.ndarray, batch: SeqBatch, capacities: np.ndarray, min_len: int = 1) -> np.ndarray:
    """Hit rate per layer and capacity, [L, C]: hits / (T_s * K) per stream, then the mean over its layer's streams.

    Streams shorter than `min_len` tokens are left out (SCH: sequences shorter than the segment length m). A layer with
    no stream left gets NaN.
    """
    t_max, top_k, n_b = eff.shape
    flat = eff.reshape(t_max * top_k, n_b)  # padding holds _PAD: never below a capacity
    hits = np.stack([(flat < min(cap, _PAD)).sum(axis=0, dtype=np.int64) for cap in capacities], axis=1)  # [B, C]
    rate = hits / np.maximum(batch.lengths * top_k, 1)[:, None]  # [B, C]
    keep = batch.lengths >= min_len  # [B]
    n_per_layer = np.bincount(batch.layer[keep], minlength=batch.n_layers)  # [L]
    out = np.full((batch.n_layers, capacities.size), np.nan)
    for c in range(capacities.size):
        sums = np.bincount(batch.layer[keep], weights=rate[keep, c], minlength=batch.n_layers)  # [L]
        out[:, c] = np.where(n_per_layer > 0, sums / np.maximum(n_per_layer, 1), np.nan)
    return out
