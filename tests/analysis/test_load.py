"""Load statistics on a hand-computed 4-token, 4-expert, top-2 trace."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moekit.analysis import (
    expert_counts,
    expert_frequency,
    gate_probs,
    layer_entropy,
    load_balance_loss,
    max_violation,
    sequence_max_violation,
    soft_usage,
    summarise_layer,
    token_entropy,
)

IDS = np.array([[0, 1], [0, 2], [1, 0], [3, 0]])  # counts e0: 4, e1: 2, e2: 1, e3: 1 (8 selections)
WEIGHTS = np.array([[3.0, 1.0], [1.0, 1.0], [2.0, 2.0], [1.0, 3.0]])  # renormalised: .75/.25, .5/.5, .5/.5, .25/.75
SEQ = np.array([0, 0, 1, 1])


def test_counts_frequency_entropy_maxvio():
    assert expert_counts(IDS, 4).tolist() == [4, 2, 1, 1]
    np.testing.assert_allclose(expert_frequency(IDS, 4), [0.5, 0.25, 0.125, 0.125])
    # H = .5*1 + .25*2 + 2 * .125*3 = 1.75 bits
    assert layer_entropy(expert_frequency(IDS, 4)) == pytest.approx(1.75)
    assert layer_entropy([1, 1, 1, 1]) == pytest.approx(2.0)
    # mean load 2, max 4 -> (4 - 2) / 2
    assert max_violation(expert_counts(IDS, 4)) == pytest.approx(1.0)
    assert max_violation([3, 3, 3]) == 0.0
    # per sequence: [2, 1, 1, 0] and [2, 1, 0, 1], mean 1, max 2 -> 1.0 each
    assert sequence_max_violation(IDS, 4, SEQ) == pytest.approx(1.0)


def test_gate_probs_from_topk_weights():
    probs, source = gate_probs(IDS, 4, WEIGHTS)
    assert source == "topk_weights"
    np.testing.assert_allclose(probs, [[.75, .25, 0, 0], [.5, 0, .5, 0], [.5, .5, 0, 0], [.75, 0, 0, .25]])


def test_lbl_topk_approximation():
    # P = mean gate prob = [2.5, .75, .5, .25] / 4 = [.625, .1875, .125, .0625]; f = [.5, .25, .125, .125]
    # global = 4 * (.3125 + .046875 + .015625 + .0078125) = 1.53125
    # seq 0: f = [.5, .25, .25, 0], P = [.625, .125, .25, 0] -> 4 * .40625 = 1.625
    # seq 1: f = [.5, .25, 0, .25], P = [.625, .25, 0, .125] -> 4 * .40625 = 1.625
    lbl = load_balance_loss(IDS, 4, SEQ, weights=WEIGHTS)
    assert lbl.global_lbl == pytest.approx(1.53125)
    assert lbl.sequence_lbl == pytest.approx(1.625)
    assert lbl.p_source == "topk_weights"


def test_lbl_from_logits_uniform_gate_is_one():
    # Uniform gate probabilities: P_i = 1/E, so E * sum_i f_i / E = 1 whatever f is.
    lbl = load_balance_loss(IDS, 4, SEQ, logits=np.zeros((4, 4)))
    assert (lbl.global_lbl, lbl.sequence_lbl, lbl.p_source) == (pytest.approx(1.0), pytest.approx(1.0), "logits")


def test_lbl_sequence_differs_from_global():
    # Seq 0 always picks experts {0, 1} with gate mass on them, seq 1 always {2, 3}: globally balanced (f = 1/4
    # each, P = 1/4 each -> 1.0), but each sequence is concentrated: f = P = [.5, .5, 0, 0] -> 4 * (.25 + .25) = 2.
    ids = np.array([[0, 1], [1, 0], [2, 3], [3, 2]])
    w = np.ones((4, 2))
    lbl = load_balance_loss(ids, 4, SEQ, weights=w)
    assert lbl.global_lbl == pytest.approx(1.0)
    assert lbl.sequence_lbl == pytest.approx(2.0)


def test_soft_usage_and_token_entropy_from_logits():
    ln2 = math.log(2.0)
    logits = np.array([[ln2, 0, 0, 0], [0, 0, 0, ln2]])  # softmax rows [.4, .2, .2, .2] and [.2, .2, .2, .4]
    np.testing.assert_allclose(soft_usage(logits), [0.3, 0.2, 0.2, 0.3])
    h, source = token_entropy(np.array([[0, 1], [3, 0]]), 4, logits=logits)
    expected = -(0.4 * math.log2(0.4) + 3 * 0.2 * math.log2(0.2))  # 1.921928...
    assert source == "logits"
    np.testing.assert_allclose(h, [expected, expected], rtol=1e-6)
    h_uniform, _ = token_entropy(IDS, 4, logits=np.zeros((4, 4), dtype=np.float32))
    np.testing.assert_allclose(h_uniform, 2.0, rtol=1e-6)


def test_token_entropy_from_renormalised_topk():
    h, source = token_entropy(IDS, 4, weights=WEIGHTS)
    h_quarter = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # 0.811278...
    assert source == "topk_weights"
    np.testing.assert_allclose(h, [h_quarter, 1.0, 1.0, h_quarter])


def test_summarise_layer_matches_parts():
    s = summarise_layer(IDS, 4, SEQ, weights=WEIGHTS)
    assert (s.n_tokens, s.top_k, s.unused_experts) == (4, 2, 0)
    assert s.layer_entropy_bits == pytest.approx(1.75)
    assert s.global_lbl == pytest.approx(1.53125) and s.sequence_lbl == pytest.approx(1.625)
    assert s.max_vio_global == pytest.approx(1.0) and s.max_vio_sequence == pytest.approx(1.0)
    assert s.entropy_source == "topk_weights" and s.soft_usage is None
    assert s.token_entropy_bits == pytest.approx((2 * 0.811278 + 2) / 4, abs=1e-6)
    with_logits = summarise_layer(IDS, 4, SEQ, weights=WEIGHTS, logits=np.zeros((4, 4)))
    assert with_logits.entropy_source == "logits" and with_logits.token_entropy_bits == pytest.approx(2.0)
    np.testing.assert_allclose(with_logits.soft_usage, 0.25)
    bare = summarise_layer(IDS, 4, SEQ)
    assert bare.entropy_source == "none" and math.isnan(bare.global_lbl)


@pytest.mark.parametrize("call", [
    lambda: load_balance_loss(IDS, 4, SEQ),  # neither logits nor weights
    lambda: load_balance_loss(IDS, 4, SEQ, weights=np.ones((4, 3))),
    lambda: load_balance_loss(IDS, 4, SEQ, logits=np.zeros((4, 5))),
    lambda: load_balance_loss(IDS, 4, SEQ, weights=-np.ones((4, 2))),
    lambda: load_balance_loss(IDS, 4, SEQ, logits=np.full((4, 4), np.nan)),
    lambda: load_balance_loss(IDS, 4, np.array([0, 1, 0, 1]), weights=WEIGHTS),
    lambda: max_violation([]),
    lambda: layer_entropy([-1.0, 2.0]),
])
def test_bad_input_raises(call):
    with pytest.raises(ValueError):
        call()


def test_blockwise_gate_sums_equal_dense():
    # Blocks of 3 tokens straddle the sequences (lengths 4, 1, 5): sums must equal a dense softmax computation.
    from moekit.analysis.load import _gate_stats

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10, 5))
    ids = np.argsort(-logits, axis=1)[:, :2]
    starts, lengths = np.array([0, 4, 5]), np.array([4, 1, 5])
    stats = _gate_stats(ids, 5, None, logits, starts, lengths, block=3)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(stats.p_sum, p.sum(axis=0))
    np.testing.assert_allclose(stats.p_seq, [p[:4].sum(0), p[4:5].sum(0), p[5:].sum(0)])
    np.testing.assert_allclose(stats.token_entropy, -(p * np.log2(p)).sum(axis=1))


def test_a_token_whose_selections_were_all_dropped_counts_evenly():
    """Capacity drops (Switch, NLLB-MoE) and Zaya's skip expert leave a token with weight 0 on every slot: gate_probs
    spreads it over the experts it recorded instead of refusing the trace."""
    ids = np.array([[0, 1], [2, 3]])
    probs, source = gate_probs(ids, 4, weights=np.array([[0.75, 0.25], [0.0, 0.0]]))
    assert source == "topk_weights" and np.allclose(probs, [[0.75, 0.25, 0, 0], [0, 0, 0.5, 0.5]])
