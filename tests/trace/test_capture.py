"""The trace records what the router computed: ids and weights equal route(logits, rule, correction_bias), exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moekit.models
import moekit.trace
from moekit.ops.routing import canonical_order, route
from moekit.trace import TraceOptions
from tests.conftest import tiny_model
from tests.trace.helpers import char_tokenizer, write_corpus

FAMILIES = ["qwen3_moe", "deepseek_v3", "llama4_text", "gpt_oss", "qwen2_moe", "mixtral"]


def _router_logits_log(view):
    """A second hook on every router: the float32 logits of each forward, in call order."""
    log, handles = {layer.index: [] for layer in view.layers}, []
    for layer in view.layers:
        def hook(mod, args, out, layer=layer):
            log[layer.index].append(layer.parse_router_output(out)[0].detach().clone())
        handles.append(layer.router.register_forward_hook(hook))
    return log, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_routing_equals_route_of_router_logits(family, tmp_path):
    view = moekit.models.load(tiny_model(family))
    txt, jsonl = write_corpus(tmp_path / "data")
    log, handles = _router_logits_log(view)
    options = TraceOptions(seq_len=32, batch_size=1, chunk_tokens=64)  # batch 1: no padding, rows = hook calls
    moekit.trace.record(view, [str(txt), str(jsonl)], tmp_path / "t", tokenizer=char_tokenizer(), options=options)
    for h in handles:
        h.remove()
    t = moekit.trace.open(tmp_path / "t")
    assert t.layers == [layer.index for layer in view.layers]
    for layer in view.layers:
        # route each router call's logits as the router saw them: Llama 4's sigmoid rounds by position in its tensor
        routed = [route(logits, layer.rule, layer.correction_bias) for logits in log[layer.index]]
        weights, ids = torch.cat([w for w, _ in routed]), torch.cat([i for _, i in routed])  # [T, K]
        rec_w, rec_ids = torch.from_numpy(t.weights(layer.index)), torch.from_numpy(t.ids(layer.index).astype(np.int64))
        assert rec_ids.shape == ids.shape == (t.num_tokens, view.top_k)
        assert (rec_w[:, :-1] >= rec_w[:, 1:]).all(), "stored selections are ordered by weight"
        w_ref, id_ref = canonical_order(weights, ids)
        w_rec, id_rec = canonical_order(rec_w, rec_ids)
        assert torch.equal(id_rec, id_ref), f"{family} layer {layer.index}: ids differ"
        assert torch.equal(w_rec, w_ref), f"{family} layer {layer.index}: max diff {(w_rec - w_ref).abs().max():.3g}"


def test_padding_in_larger_batches_changes_nothing_recorded(tmp_path):
    model = tiny_model("qwen3_moe")
    txt, jsonl = write_corpus(tmp_path / "data")
    traces = {}
    for b in (1, 4):
        out = tmp_path / f"b{b}"
        moekit.trace.record(model, [str(txt), str(jsonl)], out, tokenizer=char_tokenizer(),
                            options=TraceOptions(seq_len=48, batch_size=b))
        traces[b] = moekit.trace.open(out)
    one, four = traces[1], traces[4]
    assert np.array_equal(one.seq_id, four.seq_id) and np.array_equal(one.token_id, four.token_id)
    for l in one.layers:
        assert np.array_equal(one.ids(l), four.ids(l))
        np.testing.assert_allclose(one.weights(l), four.weights(l), rtol=0, atol=1e-6)


def test_token_metadata_domains_and_positions(tmp_path):
    txt, jsonl = write_corpus(tmp_path / "data")
    tok = char_tokenizer()
    moekit.trace.record(tiny_model("qwen3_moe"), [str(txt), str(jsonl)], tmp_path / "t", tokenizer=tok,
                        options=TraceOptions(seq_len=40, batch_size=3, chunk_tokens=80))
    t = moekit.trace.open(tmp_path / "t")
    assert t.domain_names == ["prose", "code", "math"]
    first_doc = tok.encode(txt.read_text().split("\n<|endoftext|>\n")[0]).ids
    assert t.token_id[: len(first_doc)].tolist() == first_doc
    assert t.position[:45].tolist() == list(range(45)), "positions run across the windows of one document"
    assert t.seq_id[:45].tolist() == [0] * 40 + [1] * 5
    assert t.seq_id.dtype == np.int64 and t.domain.shape == t.seq_id.shape == (t.num_tokens,)
    names = [t.domain_names[c] for c in t.domain]
    assert names[0] == "prose" and names[-1] == "code" and "math" in names
    assert np.array_equal(t.counts().sum(axis=1), np.full(len(t.layers), t.num_tokens * t.top_k))


def test_logits_and_activation_stats(tmp_path):
    view = moekit.models.load(tiny_model("qwen3_moe"))
    txt, _ = write_corpus(tmp_path / "data")
    log, handles = _router_logits_log(view)
    moekit.trace.record(view, [str(txt)], tmp_path / "t", tokenizer=char_tokenizer(),
                        options=TraceOptions(seq_len=64, batch_size=1, chunk_tokens=64, logits=True,
                                             activation_stats=True))
    for h in handles:
        h.remove()
    t = moekit.trace.open(tmp_path / "t")
    for layer in view.layers:
        expected = torch.cat(log[layer.index]).to(torch.float16).numpy()
        assert np.array_equal(t.logits(layer.index), expected)
    act_in, act_out = t.activation_stats
    assert act_in.shape == act_out.shape == (len(t.layers), t.num_experts)
    used = np.stack([np.bincount(t.ids(l).reshape(-1), minlength=t.num_experts) for l in t.layers]) > 0
    assert (act_out[used] > 0).all() and (act_in[~used] == 0).all()
