"""MoE-Infinity's activation-matrix prediction driving the runtime's prefetch: lossless, and its precision/recall are
those of the predictor replayed offline on the same routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.errors import UserError
from moekit.runtime.eam import ActivationMatrixPredictor, collection_from_sequences
from tests.conftest import tiny_model
from tests.runtime.helpers import offloaded, prompt_ids


def _collection(model, n=4):
    """EAMs of n prompts as the in-memory model routes them (the runtime records routing with record=True)."""
    import moekit.models

    view = moekit.models.load(model)
    seqs = []
    for i in range(n):
        ids = []
        hooks = [m.router.register_forward_hook(lambda mod, inp, out, acc=ids: acc.append(out[2].numpy()))
                 for m in view.layers]
        with torch.no_grad():
            model(prompt_ids(128, 10, seed=100 + i))
        for h in hooks:
            h.remove()
        seqs.append(ids)
    return collection_from_sequences(seqs, view.num_experts)


def test_eam_prefetch_is_lossless_and_scores_like_the_predictor(tmp_path):
    eams = _collection(tiny_model("qwen3_moe"))  # the EAMs of other prompts, as the same model routes them
    ref, model, om = offloaded("qwen3_moe", tmp_path / "store", record=True, eam=eams)
    x = prompt_ids(128, 9)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, ref.generate(x, max_new_tokens=6, do_sample=False))
    t = om.totals()
    assert t["prefetch_reads"] > 0
    # offline replay of the recorded routing through a fresh predictor gives the same counts
    pred = ActivationMatrixPredictor(eams, model.config.num_experts_per_tok)
    steps = [[rt_l.stats.routing[s] for rt_l in om.layers] for s in range(len(om.layers[0].stats.routing))]
    predicted = correct = actual = 0
    for s, step in enumerate(steps):
        if s == 0:
            pred.reset()
        for pos, ids in enumerate(step):
            if pos > 0:
                p, chosen = pred.predict(pos), set(np.unique(ids).tolist())
                predicted, correct, actual = predicted + len(p), correct + len(p & chosen), actual + len(chosen)
            pred.observe(pos, ids)
    assert (predicted, correct) == (sum(r.stats.predicted for r in om.layers), sum(r.stats.correct for r in om.layers))
    assert 0 < correct < predicted  # the prompts differ: some predictions right, some wrong
    assert t["prefetch_precision"] == correct / predicted and t["prefetch_recall"] == correct / actual
    om.close()


def test_collection_of_another_shape_is_refused(tmp_path):
    with pytest.raises(UserError, match="EAM collection"):
        offloaded("qwen3_moe", tmp_path, eam=np.zeros((2, 5, 7), np.int64))
