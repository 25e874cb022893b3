"""`moekit experts find` and steering files; replay=TRACE keeps the trace's locality; SCMoE; C3PO; CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import moekit.models
import moekit.routing as R
import moekit.trace
from moekit.analysis.locality import segment_cache_hit_rate, segment_routing_performance
from moekit.routing import find, replay, scmoe
from tests.helpers import run_cli, token_ids
from tests.conftest import tiny_model
from tests.trace.helpers import save_checkpoint, write_corpus


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steer")
    ckpt = save_checkpoint(tmp / "ckpt")
    txt, jsonl = write_corpus(tmp / "data")
    opts = moekit.trace.TraceOptions(seq_len=32)
    moekit.trace.record(ckpt, [str(txt)], tmp / "a", options=opts)
    moekit.trace.record(ckpt, [str(jsonl)], tmp / "b", options=opts)
    return tmp, ckpt


def test_npmi_and_risk_difference_definitions():
    x = np.array([1, 1, 0, 0], bool)
    sel = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], bool)
    assert find.npmi(x, sel)[0] == pytest.approx(1.0)  # expert 0 fires exactly on x: nPMI = 1 (RICE's test)
    assert find.npmi(np.array([1, 0], bool), np.array([[0], [1]], bool))[0] == -1.0
    assert find.risk_diff(sel[:2], sel[2:]).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("method", find.METHODS)
def test_experts_find_writes_a_steering_file_that_steer_reads(traces, method, capsys):
    tmp, ckpt = traces
    out = tmp / f"{method}.json"
    code, stdout, err = run_cli(["experts", "find", "--contrast", str(tmp / "a"), "--contrast", str(tmp / "b"),
                                 "--method", method, "--top", "3", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["version"] == 1 and len(doc["experts"]) == 3
    assert [e["score"] for e in doc["experts"]] == sorted((e["score"] for e in doc["experts"]), reverse=True)
    view = moekit.models.load(tiny_model("qwen3_moe"))
    routing = R.parse(None, out).bind(view)
    assert routing.policies


def test_bad_steering_files_name_the_field(tmp_path, capsys):
    cases = {"schema": {"schema": "x"}, "version": {"schema": "moekit.steering", "version": 9},
             "experts[0].action": {"schema": "moekit.steering", "version": 1,
                                   "experts": [{"layer": 0, "expert": 1, "action": "boost", "strength": 1}]},
             "experts[0].layer": {"schema": "moekit.steering", "version": 1,
                                  "experts": [{"layer": -1, "expert": 1, "action": "mask"}]}}
    for field, doc in cases.items():
        f = tmp_path / "s.json"
        f.write_text(json.dumps(doc))
        with pytest.raises(R.spec.UserError, match=field.replace("[", r"\[").replace("]", r"\]")):
            R.parse(None, f)


def test_cli_rejects_a_bad_spec_before_loading(tmp_path, capsys):
    code, _, err = run_cli(["eval", str(tmp_path / "nomodel"), "--data", "prose", "--routing", "nosuch=1"], capsys)
    assert code == 2 and "known:" in err and "top-p" in err and len(err.strip().splitlines()) == 1


def test_cli_trace_with_routing(traces, capsys):
    tmp, ckpt = traces
    txt = tmp / "data" / "prose.txt"
    code, stdout, err = run_cli(["trace", str(ckpt), "--data", str(txt), "--out", str(tmp / "tp"), "--seq-len", "32",
                                 "--routing", "top-p=0.3", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["routing"] == "top-p=0.3"


# ---- replay
def test_map_ids_blocks_and_fill():
    ids = np.array([[3, 0], [1, 2]])
    assert replay.map_ids(ids, 4, 8, 4).tolist() == [[6, 0, 7, 1], [2, 4, 3, 5]]  # E x2, K x2: whole blocks
    assert replay.map_ids(ids, 4, 4, 2).tolist() == ids.tolist()  # same shape: the identity
    collapsed = replay.map_ids(np.array([[0, 1]]), 4, 2, 2)  # 0 and 1 both map to 0: the next free id fills
    assert collapsed.tolist() == [[0, 1]]


def test_replay_keeps_the_traces_locality(traces, tmp_path):
    """Replaying a trace (16 experts, top-4) on a model with 32 experts and top-8 keeps SRP exactly and SCH within
    0.05 at capacities of 2x and 4x top-k (the docstring of moekit/routing/replay.py says why)."""
    import transformers

    tmp, _ = traces
    t = moekit.trace.open(tmp / "a")
    config = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=8, vocab_size=128, num_experts=32, num_experts_per_tok=8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.set_experts_implementation("eager")
    view = moekit.models.load(model)
    routing = R.parse(f"replay={tmp / 'a'}")
    seen = {m.index: [] for m in view.layers}
    hooks = R.attach(view)
    hooks.set_all(routing)
    for m in view.layers:
        m.router.register_forward_hook(lambda mod, a, o, i=m.index: seen[i].append(o[2]))
    tokens = torch.from_numpy(t.token_id.astype(np.int64))
    with torch.no_grad():
        for s in np.unique(t.seq_id):  # one forward per traced sequence: the replay's rows follow the trace's
            model(tokens[t.seq_id == s][None])
    for m in view.layers:
        got = torch.cat(seen[m.index]).numpy()
        want = t.ids(m.index)
        srp_t = segment_routing_performance(want, t.seq_id, 16, (4, 16)).f1
        srp_m = segment_routing_performance(got, t.seq_id, 32, (4, 16)).f1
        assert np.allclose(srp_t, srp_m)
        sch_t = segment_cache_hit_rate(want, t.seq_id, 16, [8, 16], (4, 16))
        sch_m = segment_cache_hit_rate(got, t.seq_id, 32, [16, 32], (4, 16))
        assert np.abs(np.asarray(sch_t) - np.asarray(sch_m)).max() <= 0.05


# ---- SCMoE
def test_contrast_scores_reduce_to_greedy():
    g = torch.Generator().manual_seed(0)
    zs, zw = torch.randn(5, 50, generator=g), torch.randn(5, 50, generator=g)
    for alpha, beta, weak in [(0.1, 0.0, zw), (1.0, 0.5, zw), (0.1, 0.5, zs)]:  # beta 0, alpha 1, weak == strong
        assert torch.equal(scmoe.contrast_scores(zs, weak, alpha, beta).argmax(-1), zs.argmax(-1))
    s = scmoe.contrast_scores(zs, zw, 0.1, 0.5)
    ps = torch.softmax(zs, -1)
    assert torch.equal(torch.isinf(s), ps < 0.1 * ps.max(-1, keepdim=True).values)


def test_scmoe_paired_rows_are_strong_and_weak_runs():
    model = tiny_model("mixtral")
    view = moekit.models.load(model)
    hooks = R.attach(view)
    ids = token_ids(model, 1, 9)
    with torch.no_grad():
        zs, zw, _ = scmoe.paired_logits(model, hooks, ids, None, R.parse("rank=1"))
        stock = model(ids).logits
        with hooks.use(R.parse("rank=1")):
            weak = model(ids).logits
        out = scmoe.generate(model, hooks, ids, scmoe.Contrast(beta=0.0), max_new_tokens=5)
        greedy = model.generate(ids, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(zs, stock, rtol=0, atol=1e-6)
    torch.testing.assert_close(zw, weak, rtol=0, atol=1e-6)
    assert torch.equal(out, greedy)  # beta = 0: SCMoE is the strong model's greedy decoding
    hooks.remove()


def test_scmoe_spec_errors():
    assert scmoe.parse_contrast("default") == scmoe.Contrast()
    assert scmoe.parse_contrast("beta=1,rank=1") == scmoe.Contrast(beta=1.0, rank=1)
    with pytest.raises(R.spec.UserError, match="alpha"):
        scmoe.parse_contrast("alpha=2")
    with pytest.raises(R.spec.UserError, match="not alpha"):
        scmoe.parse_contrast("gamma=1")
