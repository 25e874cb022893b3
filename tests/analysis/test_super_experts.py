"""Super experts (arXiv 2507.23279) on hand-built output maxima."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.analysis import super_experts


def test_percentile_and_layer_cut():
    out = np.ones((8, 64))
    out[1, 3], out[2, 10], out[4, 60] = 20.0, 30.0, 40.0
    out[7, 0] = 1000.0  # layer 7 is outside the first 75% (layers 0..5): ignored, and not used for max / 10
    # Kept: 6 x 64 = 384 values, sorted ascending the top three are 20, 30, 40. 99.5th percentile (linear):
    # position 383 * 0.995 = 381.085 -> 20 + 0.085 * (30 - 20) = 20.85; max / 10 = 4. Super: 30 and 40, not 20.
    rows = super_experts(out)
    assert [(r.layer, r.expert, r.value) for r in rows] == [(4, 60, 40.0), (2, 10, 30.0)]


def test_relative_threshold():
    out = np.ones((4, 100))  # kept: layers 0..2, 300 values
    out[:3, :10] = 2.0
    out[0, 50] = 100.0
    out[1, 60] = 9.0
    # Sorted: 268 ones, 30 twos, 9, 100. 99.5th percentile: position 299 * 0.995 = 297.505 -> 2 + 0.505 * (9 - 2)
    # = 5.535. Expert (1, 60) = 9 is above it but not above max / 10 = 10; only (0, 50) passes both.
    rows = super_experts(out)
    assert [(r.layer, r.expert) for r in rows] == [(0, 50)]
    assert [(r.layer, r.expert) for r in super_experts(out, relative=0.05)] == [(0, 50), (1, 60)]


def test_none_when_flat():
    assert super_experts(np.full((4, 8), 3.0)) == []  # nothing strictly above the percentile


@pytest.mark.parametrize("bad", [np.ones(5), np.ones((0, 3)), -np.ones((2, 2)), np.full((2, 2), np.inf)])
def test_bad_input_raises(bad):
    with pytest.raises(ValueError):
        super_experts(bad)
