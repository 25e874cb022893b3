"""MoE-Infinity's activation-matrix prediction (moekit/runtime/eam.py): hand-computed EAMs and matches, fallback, the
collection cap, a two-domain behaviour test, and a collection built from a recorded trace."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.runtime import eam


def test_eam_counts_tokens_per_expert_per_layer():
    ids = [np.array([[0, 1], [1, 2], [1, 0]]),  # layer 0: expert 0 twice, 1 three times, 2 once
           np.array([[3, 2], [3, 2], [2, 3]])]  # layer 1
    np.testing.assert_array_equal(eam.eam_from_ids(ids, 4), [[2, 3, 1, 0], [0, 0, 3, 3]])


def test_eam_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        eam.eam_from_ids([np.array([[0, 4]])], 4)


def test_match_restricted_to_rows_upto():
    # EAMs 0 and 1 agree on rows 0..1 and differ on row 2; EAM 2 differs from the start
    a = [[2, 0, 0], [0, 2, 0], [2, 0, 0]]
    b = [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    c = [[0, 0, 2], [2, 0, 0], [0, 0, 2]]
    collection = np.array([a, b, c])
    partial = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert eam.match(collection, partial, upto=0) == 0  # a and b tie: lowest index
    assert eam.match(collection, partial, upto=1) == 0  # still a tie: row 2 must not be looked at
    assert eam.match(collection, partial, upto=2) == 1  # row 2 decides


def test_match_normalises_rows():
    # partial = [[30, 10], [0, 1]]: row 0 has seen many more tokens than row 1.
    # Raw cosine prefers B = [[3, 1], [1, 0]]: 100 / (31.64 * 3.317) = 0.953 against A: 30 / (31.64 * 1.414) = 0.671.
    # Row-normalised, p = [[.75, .25], [0, 1]]: A = [[1, 0], [0, 1]] gives 1.75 / (1.275 * 1.414) = 0.971,
    # B = [[.75, .25], [1, 0]] gives 0.625 / (1.275 * 1.275) = 0.385, so A wins.
    collection = np.array([[[1, 0], [0, 1]], [[3, 1], [1, 0]]])
    assert eam.match(collection, np.array([[30, 10], [0, 1]]), upto=1) == 0


def test_match_needs_observed_rows():
    collection = np.ones((2, 3, 4), np.int64)
    with pytest.raises(ValueError, match="all zero"):
        eam.match(collection, np.zeros((3, 4)), upto=1)
    with pytest.raises(ValueError, match="upto"):
        eam.match(collection, np.ones((3, 4)), upto=3)


def test_predict_layer_returns_matched_rows_top_k():
    a = [[4, 0, 0, 0, 0], [1, 5, 3, 0, 2]]
    b = [[0, 4, 0, 0, 0], [0, 0, 1, 6, 4]]
    collection = np.array([a, b])
    partial = np.array([[0, 3, 0, 0, 0], [0, 0, 0, 0, 0]])  # layer 0 looks like b
    np.testing.assert_array_equal(eam.predict_layer(collection, partial, 0, 1, 2), [3, 4])
    np.testing.assert_array_equal(eam.predict_layer(collection, partial, 0, 1, 3), [3, 4, 2])
    # experts b never used at layer 1 are not predicted, however large k
    np.testing.assert_array_equal(eam.predict_layer(collection, partial, 0, 1, 5), [3, 4, 2])


def test_zero_partial_falls_back_to_collection_mean():
    # row 1: a = [5, 4, 0, 0], b = [0, 4, 5, 0] -> mean of normalised rows [5, 8, 5, 0] / 18: expert 1 first,
    # while either EAM alone would put expert 0 or 2 first
    collection = np.array([[[1, 0, 0, 0], [5, 4, 0, 0]], [[0, 1, 0, 0], [0, 4, 5, 0]]])
    zero = np.zeros((2, 4), np.int64)
    np.testing.assert_array_equal(eam.predict_layer(collection, zero, 0, 1, 1), [1])
    np.testing.assert_array_equal(eam.predict_layer(collection, zero, -1, 0, 4), [0, 1])
    fresh = eam.ActivationMatrixPredictor(collection, 1)
    assert fresh.predict(1) == {1}


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_match_invariant_to_scaling_partial(data):
    n, n_layers, n_experts = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    counts = st.integers(0, 9)
    collection = np.array(data.draw(st.lists(counts, min_size=n * n_layers * n_experts,
                                             max_size=n * n_layers * n_experts))).reshape(n, n_layers, n_experts)
    partial = np.array(data.draw(st.lists(counts, min_size=n_layers * n_experts,
                                          max_size=n_layers * n_experts))).reshape(n_layers, n_experts)
    upto = data.draw(st.integers(0, n_layers - 1))
    if not partial[:upto + 1].any():
        return
    # integer scales: (c x) / (c s) rounds exactly as x / s, so even near-ties must keep their winner
    c = data.draw(st.integers(1, 1000))
    assert eam.match(collection, c * partial, upto) == eam.match(collection, partial, upto)


def _domain_sequences(sets_per_layer, n_seq, n_tokens, seed):
    """Sequences [S][L] -> ids [T, K]: at layer l every token selects the experts sets_per_layer[l], in random order."""
    rng = np.random.default_rng(seed)
    return [[np.array([rng.permutation(experts) for _ in range(n_tokens)]) for experts in sets_per_layer]
            for _ in range(n_seq)]


def test_predictor_matches_the_right_domain():
    # two domains with disjoint experts, {0..3} and {4..7}, each with its own pair per layer; 4 MoE layers, top-2
    dom_a = _domain_sequences([[0, 1], [2, 3], [0, 2], [1, 3]], 6, 12, seed=0)
    dom_b = _domain_sequences([[4, 5], [6, 7], [4, 6], [5, 7]], 6, 12, seed=1)
    mixed = eam.collection_from_sequences(dom_b[:3] + dom_a[:3] + dom_b[3:], 8)
    held_out = dom_a[3:]
    right = eam.replay(mixed, held_out, k=2)
    assert right["precision"] == 1.0 and right["recall"] == 1.0  # layer 0 observed -> a domain-a EAM matched
    assert right["tokens"] == 3 * 12 and [d["layer"] for d in right["layers"]] == [1, 2, 3]
    assert eam.replay(mixed, held_out, k=4)["precision"] == 1.0  # experts the match never used are not predicted
    wrong = eam.replay(eam.collection_from_sequences(dom_b, 8), held_out, k=2)
    assert wrong["precision"] == 0.0 and wrong["recall"] == 0.0


def test_predictor_counters_and_decode_rows():
    collection = np.array([[[2, 0, 0], [0, 2, 0]], [[0, 2, 0], [0, 0, 2]]])
    p = eam.ActivationMatrixPredictor(collection, 1)
    assert p.predict(0) == {0}  # fresh request: mean row [.5, .5, 0], the tie broken by expert id
    p.observe(0, np.array([[1]]))
    assert p.predict(1) == {2}  # layer 0 chose expert 1 -> EAM 1 -> its row 1
    p.score(1, np.array([[2]]))
    p.observe(1, np.array([[2]]))
    assert p.counters() == {"predicted": 1, "actual": 1, "correct": 1}
    p.score(1, np.array([[2]]))  # nothing pending: no count
    assert p.counters() == {"predicted": 1, "actual": 1, "correct": 1}
    # decode: the next token predicts layer 0 from all rows of the earlier token, not from the mean
    assert p.seen == 1 and p.predict(0) == {1}
    p.score(0, np.array([[0]]))
    assert (p.precision, p.recall) == (0.5, 0.5)
    p.reset()
    assert p.seen == -1 and not p.eam.any() and p.counters()["predicted"] == 2  # counters span requests


def test_cap_keeps_at_most_max_eams_and_covers_rare_requests():
    a = [[[3, 1, 0, 0]], [[2, 2, 0, 0]], [[1, 3, 0, 0]]]  # three directions of domain a
    rare = [[0, 0, 1, 1]]
    eams = np.array([a[i % 3] for i in range(5)] + [rare] + [a[i % 3] for i in range(20)])  # [26, 1, 4]
    kept = eam.cap_collection(eams, 2)
    np.testing.assert_array_equal(kept, [a[0], rare])  # the rare request is kept, in original order
    assert eam.cap_collection(eams, 10).shape == (4, 1, 4)  # duplicates stop the sampling early
    assert eam.cap_collection(eams, 30).shape == eams.shape  # under the cap: everything
    rng = np.random.default_rng(0)
    assert eam.cap_collection(rng.integers(0, 5, (50, 3, 6)), 8).shape == (8, 3, 6)


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    import moekit.trace
    from tests.conftest import tiny_model
    from tests.trace.helpers import char_tokenizer, write_corpus

    txt, _ = write_corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("trace") / "t"
    moekit.trace.record(tiny_model("qwen3_moe"), [str(txt)], out, tokenizer=char_tokenizer(),
                        options=moekit.trace.TraceOptions(seq_len=16, batch_size=8, max_tokens=192))
    return out


def test_collection_from_recorded_trace(trace_dir):
    import moekit.trace

    t = moekit.trace.open(trace_dir)
    seqs = eam.sequence_ids(t)
    n_seq = len(np.unique(t.seq_id))
    coll = eam.collection_from_trace(trace_dir, max_eams=10**6)
    assert len(seqs) == n_seq > 4 and coll.shape == (n_seq, len(t.layers), t.num_experts)
    lengths = np.array([len(s[0]) for s in seqs])
    np.testing.assert_array_equal(coll.sum(axis=2), np.repeat(lengths[:, None] * t.top_k, len(t.layers), axis=1))
    np.testing.assert_array_equal(coll.sum(axis=0), t.counts())  # the EAMs partition the trace's counts
    assert eam.collection_from_trace(t, max_eams=3).shape[0] <= 3
    train = eam.collection_from_trace(t, sequences=slice(0, None, 2))
    assert train.shape[0] == (n_seq + 1) // 2
    result = eam.replay(train, seqs[1::2], k=t.top_k)
    assert result["tokens"] == lengths[1::2].sum()
    # with a single stored EAM every match is that EAM, so each layer's prediction is fixed: its row's top-k (ties by
    # id, never-used experts left out). Precision and recall then follow from the held-out ids by counting alone.
    one = eam.collection_from_trace(t, sequences=slice(0, 1))  # [1, L, E]
    got = eam.replay(one, seqs[1::2], k=t.top_k)
    predicted = actual = correct = 0
    for l in range(1, len(t.layers)):
        row = one[0, l]
        fixed = {int(e) for e in np.argsort(-row, kind="stable")[:t.top_k] if row[e] > 0}
        for seq in seqs[1::2]:
            for ids in seq[l]:  # [K] per token
                chosen = set(np.unique(ids).tolist())
                predicted, actual, correct = predicted + len(fixed), actual + len(chosen), correct + len(fixed & chosen)
    assert (got["predicted"], got["actual"], got["correct"]) == (predicted, actual, correct)
    assert got["precision"] == correct / predicted and got["recall"] == correct / actual
