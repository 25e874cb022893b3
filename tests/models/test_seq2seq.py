"""Encoder-decoder MoEs (Switch Transformers, NLLB-MoE): capacity drops as the routers make them, transformers'
NLLB-MoE dispatch bug, traces with encoder and decoder layer kinds (old traces still read), `moekit prune` end to end,
and one-line refusals of the commands that do not apply."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

import moekit.models
import moekit.trace
from moekit.ops.routing import route
from moekit.trace import TraceOptions
from tests.compress.test_eval import save_tiny_checkpoint, write_data
from tests.conftest import tiny_model
from tests.helpers import module_calls, run_cli, token_ids
from tests.trace.helpers import char_tokenizer, write_corpus


@pytest.mark.parametrize("family", ["switch_transformers", "nllb-moe"])
def test_routers_drop_tokens_over_capacity_and_the_rule_drops_the_same(family):
    view = moekit.models.load(tiny_model(family))
    seen = module_calls(view, lambda m: m.router, token_ids(view.model, 2, 24))
    dropped = 0
    for layer in view.layers:
        (x, *_), _, out = seen[layer.index][0]
        _, hf_weights, hf_ids = layer.parse_router_output(out)
        logits = layer.router_logits(x.reshape(-1, x.shape[-1]))
        weights, ids = route(logits, layer.rule, sequences=x.shape[0] if x.dim() == 3 else 1)
        order = torch.argsort(ids, dim=-1, stable=True)
        hf_order = torch.argsort(hf_ids, dim=-1, stable=True)
        assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
        assert torch.equal(weights.gather(1, order), hf_weights.float().gather(1, hf_order))
        dropped += int((hf_weights == 0).sum())
        unlimited = dataclasses.replace(layer.rule, capacity=0, capacity_fraction=0.0)
        assert (route(logits, unlimited)[0] > 0).all()  # without the capacity nothing is dropped
    assert dropped > 0, "the tiny capacities drop no token: the test proves nothing about dropping"


def test_transformers_nllb_moe_runs_experts_0_and_1_instead_of_the_chosen_ones():
    """transformers 5.24 NllbMoeExperts.forward one-hot-encodes the router's 0/1 top-1 mask, so expert 1 gets every
    token's first-choice weight and expert 0 its other weights. moekit's reference runs the chosen experts (as fairseq's
    NLLB-MoE does): the block comparison in test_families is a strict xfail until transformers is fixed."""
    view = moekit.models.load(tiny_model("nllb-moe"))
    layer = view.layers[0]
    x = torch.randn(1, 10, view.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = layer.block(x)[0]
        top1, gates, _ = layer.router(x.reshape(-1, x.shape[-1]))
        scale = 1 - layer.token_dropout
        buggy = sum(layer.experts[f"expert_{int(top1[t, j])}"](x[0, t]) * gates[t, j] * scale
                    for t in range(10) for j in range(gates.shape[1]) if gates[t, j] > 0)
        assert torch.allclose(hf.sum(0), buggy, atol=1e-5)
        chosen = torch.stack([sum(layer.experts[f"expert_{e}"](x[0, t]) * gates[t, e] * scale
                                  for e in range(gates.shape[1]) if gates[t, e] > 0) for t in range(10)])
        from moekit.ops.reference import reference_moe_forward

        ours = reference_moe_forward(layer, x)[0]
        assert torch.allclose(ours, chosen, atol=1e-5) and not torch.allclose(ours, hf, atol=1e-3)


def test_trace_records_encoder_and_decoder_layers_with_their_kind(tmp_path):
    view = moekit.models.load(tiny_model("switch_transformers"))
    txt, jsonl = write_corpus(tmp_path / "data")
    seen = {}
    handles = [m.router.register_forward_hook(lambda mod, a, out, i=m.index: seen.setdefault(i, []).append(out))
               for m in view.layers]
    moekit.trace.record(view, [str(txt)], tmp_path / "t", tokenizer=char_tokenizer(),
                        options=TraceOptions(seq_len=24, batch_size=1, chunk_tokens=48))
    for h in handles:
        h.remove()
    t = moekit.trace.open(tmp_path / "t")
    kinds = {m.index: m.kind for m in view.layers}
    assert t.layer_kinds == kinds and set(kinds.values()) == {"encoder", "decoder"}
    for layer in view.layers:
        parsed = [layer.parse_router_output(out) for out in seen[layer.index]]
        assert np.array_equal(t.ids(layer.index).astype(np.int64), torch.cat([p[2] for p in parsed]).numpy())
        assert np.array_equal(t.weights(layer.index), torch.cat([p[1] for p in parsed]).float().numpy())
    assert (t.weights(view.layers[0].index) == 0).any(), "capacity drops are recorded at weight 0"
    from moekit.analysis.run import analyze_trace

    result = analyze_trace(t)  # the analyses read an encoder-decoder trace like any other
    assert result["n_layers"] == len(view.layers)
    # a trace written before layer kinds existed reads as all decoder layers
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    del manifest["layer_kinds"]
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(manifest))
    old = moekit.trace.open(tmp_path / "t")
    first = view.layers[0].index
    assert set(old.layer_kinds.values()) == {"decoder"} and np.array_equal(old.ids(first), t.ids(first))


@pytest.fixture(scope="module")
def switch_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq")
    return save_tiny_checkpoint(root / "switch", "switch_transformers"), ",".join(write_data(root))


def test_prune_cli_writes_an_encoder_decoder_checkpoint_that_reloads(switch_dir, capsys):
    path, data = switch_dir
    out = path.parent / "pruned"
    code, stdout, err = run_cli(["prune", str(path), "--keep", "4", "--method", "frequency", "--calib", data,
                                 "--out", str(out), "--max-tokens", "96", "--seq-len", "24", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["experts_before"] == 8 and rep["experts_after"] == 4
    model = AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32)
    view = moekit.models.load(model)
    assert view.num_experts == 4 and {m.kind for m in view.layers} == {"encoder", "decoder"}
    assert torch.isfinite(view.forward(token_ids(model)).logits).all()


@pytest.mark.parametrize("argv", [
    ["run", "{m}", "--prompt", "hi", "--max-new-tokens", "2"],
    ["merge", "{m}", "--groups", "4", "--calib", "{d}", "--out", "{o}"],
    ["quantize", "{m}", "--avg-bits", "4", "--out", "{o}"],
    ["eval", "{m}", "--data", "{d}"],
])
def test_commands_that_need_a_causal_lm_refuse_in_one_line(switch_dir, argv, capsys, tmp_path):
    path, data = switch_dir
    code, _, err = run_cli([a.format(m=path, d=data, o=tmp_path / "out") for a in argv], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "works on causal LMs; switch_transformers is an encoder-decoder model" in err
    assert not (tmp_path / "out").exists()
