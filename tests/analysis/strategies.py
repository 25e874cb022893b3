"""Small random routing traces for property tests: a few sequences, tokens that often reuse their predecessor's
experts."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


@st.composite
def traces(draw, max_experts: int = 7, max_k: int = 3, max_len: int = 18, max_seqs: int = 3):
    """(ids [T, K], seq_id [T], E). Sequences have random (sometimes equal) lengths."""
    n_experts = draw(st.integers(2, max_experts))
    top_k = draw(st.integers(1, min(max_k, n_experts)))
    n_seqs = draw(st.integers(1, max_seqs))
    if draw(st.booleans()):
        lengths = [draw(st.integers(1, max_len))] * n_seqs
    else:
        lengths = draw(st.lists(st.integers(1, max_len), min_size=n_seqs, max_size=n_seqs))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    reuse = draw(st.floats(0.0, 0.9))
    rows = []
    for length in lengths:
        prev = rng.choice(n_experts, top_k, replace=False)
        for _ in range(length):
            row = prev[rng.permutation(top_k)] if rng.random() < reuse else rng.choice(n_experts, top_k, replace=False)
            rows.append(row)
            prev = row
    seq_id = np.repeat(np.arange(n_seqs) * 7 + 3, lengths)  # ids need not be 0..S-1
    return np.array(rows, dtype=np.int64), seq_id, n_experts
