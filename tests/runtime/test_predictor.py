"""The routing predictor: its file format, targets, the folded weights equal the trained network, it learns a
learnable routing, it refuses another model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import moekit.models
from moekit.errors import UserError
from moekit.runtime import predictor as pr
from moekit.runtime import predictor_train as pt
from tests.conftest import tiny_model

SPEC = pr.PredictorSpec("qwen3_moe", "hash", (0, 1, 2), num_experts=6, top_k=2, hidden_size=5, width=4,
                        reuse_width=3, lookahead=2, horizons=(1, 2, 4))


def random_predictor(spec: pr.PredictorSpec = SPEC, seed: int = 0) -> pr.RoutingPredictor:
    rng = np.random.default_rng(seed)
    return pr.RoutingPredictor(spec, {k: rng.normal(size=shape) for k, shape in pr.shapes(spec).items()})


def _inputs(T: int = 7, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(SPEC.num_experts)[:SPEC.top_k] for _ in range(T)])
    return rng.normal(size=(T, SPEC.hidden_size)).astype(np.float32), ids, rng.random((T, SPEC.top_k)).astype(np.float32)


def test_file_round_trip(tmp_path):
    p = random_predictor()
    p.training = {"tokens": 3}
    path = p.save(tmp_path / "p.safetensors")
    q = pr.load(path)
    x, ids, w = _inputs()
    assert q.spec == p.spec and q.training == {"tokens": 3} and q.digest() == p.digest()
    for group in pr.GROUPS:
        np.testing.assert_array_equal(q.logits(group, 1, x, ids, w), p.logits(group, 1, x, ids, w))
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind


def test_torch_and_numpy_inputs_give_the_same_logits():
    p, (x, ids, w) = random_predictor(), _inputs()
    np.testing.assert_array_equal(p.logits("route", 0, torch.from_numpy(x), torch.from_numpy(ids),
                                           torch.from_numpy(w)), p.logits("route", 0, x, ids, w))


@pytest.mark.parametrize("meta, match", [({"format": "moekit.predictor", "format_version": "99"}, "version '99'"),
                                         ({"format": "something"}, "not a moekit predictor")])
def test_foreign_files_are_refused(tmp_path, meta, match):
    path = tmp_path / "p.safetensors"
    save_file({"w": np.zeros(1, np.float32)}, str(path), metadata=meta)
    with pytest.raises(UserError, match=match):
        pr.load(path)


def test_missing_and_damaged_files(tmp_path):
    with pytest.raises(UserError, match="no predictor at"):
        pr.load(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(UserError, match="not a readable predictor"):
        pr.load(tmp_path / "bad.safetensors")


def test_forecast_is_the_expected_log2_next_use(monkeypatch):
    p = random_predictor()
    z = np.zeros((1, len(SPEC.horizons), SPEC.num_experts))
    z[:, :, 0] = 30.0  # expert 0: surely used within 1 token -> 0
    z[:, :, 1] = -30.0  # expert 1: surely not within 4 -> one per horizon
    z[:, :, 2] = [-30.0, 30.0, 30.0]  # expert 2: used at 2 tokens -> ceil(log2 2) = 1
    monkeypatch.setattr(p, "logits", lambda group, *a: z)
    fc = p.forecast(0, *_inputs(1))[0]
    assert fc.dtype == np.float16
    assert fc[0] == 0 and fc[1] == len(SPEC.horizons) and fc[2] == 1 and fc[3] == pytest.approx(1.5)


def test_targets_follow_execution_order():
    """Layer position 2 of 3: routing head d=1 is the next token's layer 0, d=2 its layer 1; a sequence's last token has
    no routing label; reuse horizons look at the same layer in later tokens of the same sequence only."""
    ids = [np.array([[0, 1], [2, 3], [4, 5], [0, 1]]) + l for l in range(3)]  # 3 layers, 4 tokens
    seq = np.array([0, 0, 0, 1])  # tokens 0-2 one sequence, token 3 another
    y, m = pt.targets(SPEC, [i % 6 for i in ids], seq, position=2)
    assert set(np.nonzero(y[0, 0])[0]) == {2, 3}  # token 1's layer 0
    assert set(np.nonzero(y[0, 1])[0]) == {3, 4}  # token 1's layer 1
    assert not m[2, 0].any() and not m[3, 0].any()  # sequence ends: no next token
    h1, h2 = SPEC.lookahead, SPEC.lookahead + 1
    assert set(np.nonzero(y[0, h1])[0]) == {4, 5}  # layer 2 of token 1
    assert set(np.nonzero(y[0, h2])[0]) == {4, 5, 0, 1}  # ... and of token 2 (ids 6, 7 -> 0, 1)
    assert m[0, h2].all()  # tokens 1 and 2 exist
    assert m[1, h2].sum() == 2 and y[1, h2].sum() == 2  # token 1: only token 2 left: used ones labelled, rest masked


@pytest.mark.parametrize("group", pr.GROUPS)
def test_folded_weights_compute_the_trained_network(group):
    torch.manual_seed(0)
    net = pt._Net(SPEC, group)
    with torch.no_grad():
        for prm in net.parameters():
            prm.normal_()
    x, ids, w = _inputs()
    f = pt.features(x, ids, w, SPEC.num_experts)
    mu, sd = f.mean(0), f.std(0) + 0.5
    both = {**pt.fold(pt._Net(SPEC, "route"), mu, sd, SPEC, "route"),
            **pt.fold(pt._Net(SPEC, "reuse"), mu, sd, SPEC, "reuse"), **pt.fold(net, mu, sd, SPEC, group)}
    p = pt.pack(SPEC, [both] * SPEC.num_layers, {})
    with torch.no_grad():
        want = net((f - mu) / sd).numpy().reshape(len(x), -1, SPEC.num_experts)
    np.testing.assert_allclose(p.logits(group, 1, x, ids, w), want, rtol=1e-4, atol=1e-4)


def test_learns_a_learnable_routing():
    """Next layer's experts = a fixed function of the hidden state: held-out recall near 1 (chance: top_k / E)."""
    rng = np.random.default_rng(0)
    N = 4000
    spec = pr.PredictorSpec("t", "h", (0, 1), num_experts=6, top_k=2, hidden_size=5, width=16, reuse_width=4,
                            horizons=(1,))
    x = rng.normal(size=(N, spec.hidden_size)).astype(np.float32)
    nxt = np.argsort(-(x @ rng.normal(size=(spec.hidden_size, spec.num_experts))), axis=1)[:, :spec.top_k]
    ids0 = np.stack([rng.permutation(6)[:2] for _ in range(N)])
    data = pt.Collected([x.astype(np.float16), x.astype(np.float16)], [ids0, nxt], [np.ones((N, 2), np.float32)] * 2,
                        np.arange(N) // 50)
    held = pt.split(data.seq, 0.1)
    p = pt.train_spec(spec, data, held, pt.TrainOptions(steps=600))
    report = pt.evaluate(p, data, held)
    assert report["next_layer"]["recall"] > 0.9, report


def test_refuses_another_model():
    view = moekit.models.load(tiny_model("qwen3_moe"))
    spec = pr.PredictorSpec("qwen3_moe", pr.model_hash(view.config), tuple(m.index for m in view.layers),
                            view.num_experts, view.top_k, view.config.hidden_size)
    pr.RoutingPredictor(spec).check(view)  # its own model: fine
    with pytest.raises(UserError, match="trained for"):
        pr.RoutingPredictor(pr.PredictorSpec(**{**spec.__dict__, "num_experts": 8})).check(view)
    with pytest.raises(UserError, match="config hash differs"):
        pr.RoutingPredictor(pr.PredictorSpec(**{**spec.__dict__, "config_hash": "other"})).check(view)
    runs = view.trace_layers()
    view.trace_layers = lambda: runs + runs[:1]  # a loop layer's second pass: one more routing run per token
    with pytest.raises(UserError, match="loop layers"):
        pr.RoutingPredictor(spec).check(view)


def test_slots_naming_no_expert_add_nothing():
    """A routing policy's dropped slots (ids >= E, weight 0) and identity experts: features as if absent."""
    p, (x, ids, w) = random_predictor(), _inputs()
    dropped = ids.copy()
    dropped[:, 1] = SPEC.num_experts  # the sentinel
    kept_w = w.copy()
    kept_w[:, 1] = 0.0
    np.testing.assert_allclose(p.logits("reuse", 0, x, dropped, w), p.logits("reuse", 0, x, ids, kept_w), rtol=1e-6)
    f = pt.features(x, dropped, w, SPEC.num_experts)
    assert torch.equal(f, pt.features(x, ids, kept_w, SPEC.num_experts))
    assert pt._onehot(dropped, SPEC.num_experts).sum(1).tolist() == [1] * len(x)


def test_cache_check_replays_the_held_out_stream(monkeypatch):
    """The held-out cache check = the simulator on the masked tokens: LFRU as replay_layer gives it, and `predictive`
    fed forecasts that name the experts used next scores above LFRU (a forecast that reverses them, below)."""
    from moekit.runtime.simulate import oracle_forecasts, replay_layer

    rng = np.random.default_rng(3)
    N, spec = 600, pr.PredictorSpec("t", "h", (0,), num_experts=8, top_k=2, hidden_size=5, width=4, reuse_width=3,
                                    horizons=(1,))
    ids = np.stack([rng.choice(8, 2, replace=False, p=np.full(8, 1 / 8)) for _ in range(N)])
    data = pt.Collected([rng.normal(size=(N, 5)).astype(np.float16)], [ids], [np.ones((N, 2), np.float32)],
                        np.arange(N) // 50)
    mask = pt.split(data.seq, 0.5)
    oracle = oracle_forecasts(ids[mask], 8)
    p = random_predictor(spec)
    for sign in (1, -1):
        monkeypatch.setattr(pr.RoutingPredictor, "forecast", lambda self, pos, x, i, w, s=sign: s * oracle)
        got = pt.cache_check(p, data, mask)
        lfru = replay_layer(ids[mask], "lfru", 4)
        assert got["lfru"] == lfru.hits / (lfru.hits + lfru.misses)
        assert (got["predictive"] > got["lfru"]) == (sign == 1), got
