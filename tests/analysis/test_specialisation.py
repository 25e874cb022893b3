"""Domain usage, JS divergence, domain NMI and token-expert nPMI on hand-computed traces."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moekit.analysis import domain_counts, domain_jsd, domain_nmi, domain_usage, token_expert_npmi

IDS = np.array([[0, 1], [0, 1], [2, 3], [2, 1]])
DOMAIN = np.array([0, 0, 1, 1])
# domain 0 selects e0 x2, e1 x2; domain 1 selects e2 x2, e3 x1, e1 x1
JSD = 0.5 * (0.5 + 0.5 * math.log2(4 / 3)) + 0.5 * (0.25 * math.log2(2 / 3) + 0.5 + 0.25)  # 0.655639...


def test_domain_usage():
    assert domain_counts(IDS, DOMAIN, 2, 4).tolist() == [[2, 2, 0, 0], [0, 1, 2, 1]]
    np.testing.assert_allclose(domain_usage(IDS, DOMAIN, 2, 4), [[.5, .5, 0, 0], [0, .25, .5, .25]])
    assert np.isnan(domain_usage(IDS, DOMAIN, 3, 4)[2]).all()  # a domain without tokens


def test_domain_jsd():
    # M = [.25, .375, .25, .125]; KL(P||M) = .5 + .5 log2(4/3); KL(Q||M) = .25 log2(2/3) + .5 + .25
    jsd = domain_jsd(domain_usage(IDS, DOMAIN, 2, 4))
    np.testing.assert_allclose(jsd, [[0, JSD], [JSD, 0]], atol=1e-12)
    np.testing.assert_allclose(domain_jsd(np.array([[1.0, 0], [0, 1.0]])), [[0, 1], [1, 0]], atol=1e-12)


def test_domain_nmi():
    # H(d) = 1, H(e) = H(.25, .375, .25, .125), H(d, e) = 2.25; I = 1 + H(e) - 2.25. With two equiprobable domains
    # I(d; e) equals the JS divergence of the two usage vectors.
    h_e = 0.25 * 2 + 0.375 * math.log2(8 / 3) + 0.25 * 2 + 0.125 * 3
    assert domain_nmi(IDS, DOMAIN, 2, 4) == pytest.approx(1 + h_e - 2.25)
    assert domain_nmi(IDS, DOMAIN, 2, 4) == pytest.approx(JSD)
    assert domain_nmi(np.array([[0], [0], [1], [1]]), DOMAIN, 2, 2) == pytest.approx(1.0)  # experts reveal domain
    assert domain_nmi(np.array([[0], [1], [0], [1]]), DOMAIN, 2, 2) == pytest.approx(0.0)  # independent
    assert math.isnan(domain_nmi(IDS, np.zeros(4, np.int64), 1, 4))  # H(domain) = 0


def test_npmi_hand_case():
    # K = 1, N = 4: tokens 5 5 7 7 -> experts 0 0 1 0.
    # nPMI(5, 0) = log2(.5 / (.5 * .75)) / -log2(.5) = log2(4/3); nPMI(7, 1) = log2(.25 / (.5 * .25)) / 2 = .5;
    # nPMI(7, 0) = log2(.25 / (.5 * .75)) / 2 = log2(2/3) / 2.
    r = token_expert_npmi(np.array([[0], [0], [1], [0]]), np.array([5, 5, 7, 7]), 2, top_n=3, min_count=2)
    assert r.token_ids.tolist() == [[5, 7, -1], [7, -1, -1]]
    np.testing.assert_allclose(r.npmi[0, :2], [math.log2(4 / 3), math.log2(2 / 3) / 2])
    assert r.npmi[1, 0] == pytest.approx(0.5) and np.isnan(r.npmi[1, 1:]).all()
    assert r.counts.tolist() == [[2, 1, 0], [1, 0, 0]]
    none = token_expert_npmi(np.array([[0], [0], [1], [0]]), np.array([5, 5, 7, 7]), 2, min_count=3)
    assert (none.token_ids == -1).all()  # no token occurs 3 times


def test_npmi_topk_probabilities():
    # K = 2: p(x) is the share of selections made by token x = n_tokens(x) / T. Token 5 -> {0, 1}, token 6 -> {0, 2}:
    # p(5, 0) = 1/4, p(5) = 1/2, p(0) = 1/2 -> PMI 0; p(5, 1) = 1/4, p(1) = 1/4 -> PMI 1, nPMI 1/2.
    r = token_expert_npmi(np.array([[0, 1], [0, 2]]), np.array([5, 6]), 3, top_n=2, min_count=1)
    np.testing.assert_allclose(r.npmi[0], [0.0, 0.0])
    assert r.token_ids[0].tolist() == [5, 6]  # tie on nPMI and count -> smaller token id first
    assert r.token_ids[1].tolist() == [5, -1] and r.npmi[1, 0] == pytest.approx(0.5)


def test_npmi_large_sparse_token_ids_take_the_unique_path():
    ids = np.array([[0], [1], [0]])
    r = token_expert_npmi(ids, np.array([10**12, 3, 10**12]), 2, top_n=1, min_count=1)
    assert r.token_ids[:, 0].tolist() == [10**12, 3]
    assert r.npmi[0, 0] == pytest.approx(1.0) and r.npmi[1, 0] == pytest.approx(1.0)  # p(x, e) = p(x) = p(e)


@pytest.mark.parametrize("call", [
    lambda: domain_usage(IDS, np.array([0, 0, 2, 1]), 2, 4),  # code out of range
    lambda: domain_usage(IDS, DOMAIN[:3], 2, 4),
    lambda: domain_jsd(np.ones(3)),
    lambda: token_expert_npmi(IDS, np.arange(4), 4, top_n=0),
    lambda: token_expert_npmi(IDS, np.arange(3), 4),
])
def test_bad_input_raises(call):
    with pytest.raises(ValueError):
        call()
