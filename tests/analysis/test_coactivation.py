"""Co-activation and inter-layer affinity on hand-computed traces."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moekit.analysis import affinity, affinity_concentration, affinity_counts, coactivation


def test_coactivation_hand_case():
    ids = np.array([[0, 1], [1, 2], [0, 1]])
    expected = [[2, 2, 0], [2, 3, 1], [0, 1, 1]]  # diagonal = token counts; C_01 = 2 tokens with both 0 and 1
    assert coactivation(ids, 3).tolist() == expected


def test_affinity_hand_case():
    a = np.array([[0, 1], [0, 1], [2, 0]])  # layer l
    b = np.array([[1, 2], [1, 0], [2, 1]])  # layer l+1
    # token pairs: t0 (0,1)(0,2)(1,1)(1,2); t1 (0,1)(0,0)(1,1)(1,0); t2 (2,2)(2,1)(0,2)(0,1)
    counts = [[1, 3, 2], [1, 2, 1], [0, 1, 1]]
    assert affinity_counts(a, b, 3).tolist() == counts
    np.testing.assert_allclose(affinity(a, b, 3), [[1 / 6, 1 / 2, 1 / 3], [.25, .5, .25], [0, .5, .5]])
    conc = affinity_concentration(np.array(counts), k=2)
    # top-2 mass per row: 5/6, 3/4, 1; weights 6/12, 4/12, 2/12 -> 5/12 + 1/4 + 1/6 = 5/6
    assert conc.topk_mass == pytest.approx(5 / 6)
    h0 = (1 / 6) * math.log2(6) + 0.5 + (1 / 3) * math.log2(3)
    assert conc.row_entropy_bits == pytest.approx(0.5 * h0 + (1 / 3) * 1.5 + (1 / 6) * 1.0)


def test_affinity_unused_row_is_nan_and_extremes():
    a = np.array([[0], [1], [0]])
    b = np.array([[2], [3], [2]])
    p = affinity(a, b, 4)
    assert np.isnan(p[2]).all() and np.isnan(p[3]).all()
    np.testing.assert_allclose(p[:2], [[0, 0, 1, 0], [0, 0, 0, 1]])
    assert affinity_concentration(affinity_counts(a, b, 4), 1).topk_mass == pytest.approx(1.0)  # deterministic
    uniform = affinity_concentration(np.ones((4, 4)), 1)
    assert uniform.topk_mass == pytest.approx(0.25) and uniform.row_entropy_bits == pytest.approx(2.0)


def test_bad_input_raises():
    with pytest.raises(ValueError):
        affinity_counts(np.array([[0], [1]]), np.array([[0]]), 2)  # different T
    with pytest.raises(ValueError):
        affinity_concentration(np.ones((2, 3)), 1)
    with pytest.raises(ValueError):
        affinity_concentration(np.ones((2, 2)), 3)
