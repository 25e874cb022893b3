"""trace -> analyze -> report, and ablate, end to end through the CLI on a tiny model."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main
from tests.helpers import run_cli
from tests.trace.helpers import save_checkpoint, write_corpus


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    model = save_checkpoint(root / "model", "qwen3_moe")
    txt, jsonl = write_corpus(root / "data")
    with pytest.raises(SystemExit) as exit_info:
        main(["trace", str(model), "--data", str(txt), "--data", str(jsonl), "--out", str(root / "trace"),
              "--seq-len", "32", "--activation-stats", "--json"])
    assert not exit_info.value.code
    return model, root / "trace", txt


def test_analyze_writes_report_and_json(traced, tmp_path, capsys):
    _, trace, _ = traced
    code, out, _ = run_cli(["analyze", str(trace), "--out", str(tmp_path / "r.html"), "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert res["n_layers"] == 3 and res["n_experts"] == 16
    assert set(res["domains"]["names"]) == {"prose", "code", "math"}
    # the traced model's tokenizer decodes the nPMI tokens
    decoded = [(t, i) for tr, ir in zip(res["npmi"][0]["tokens"], res["npmi"][0]["token_ids"]) for t, i in zip(tr, ir)]
    assert decoded and all(isinstance(t, str) == (i >= 0) for t, i in decoded)
    html = (tmp_path / "r.html").read_text()
    assert 'id="fig-hit-rates"' in html and 'id="table-summary"' in html


def test_analyze_table(traced, capsys):
    _, trace, _ = traced
    code, out, err = run_cli(["analyze", str(trace)], capsys)
    assert code == 0 and "LBL" in out and "MaxVio" in out and "report:" in err
    assert (trace / "report.html").is_file()


def test_ablate_random_experts_reports_perplexity_change(traced, capsys):
    model, trace, txt = traced
    code, out, _ = run_cli(["ablate", str(model), "--trace", str(trace), "--data", str(txt), "--experts", "random",
                            "--count", "4", "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert len(res["zeroed"]) == 4 and len({tuple(p) for p in res["zeroed"]}) == 4
    assert res["before"]["overall"]["perplexity"] != res["after"]["overall"]["perplexity"]
    # both numbers equal an independent evaluation: plain transformers, the chosen experts' slices of the fused
    # tensors zeroed by hand, pooled next-token NLL on the same 256-token windows
    before, after = (_perplexity_by_hand(model, txt, zeroed) for zeroed in ([], res["zeroed"]))
    assert res["before"]["overall"]["perplexity"] == pytest.approx(before, rel=1e-5)
    assert res["after"]["overall"]["perplexity"] == pytest.approx(after, rel=1e-5)


def _perplexity_by_hand(model_dir, txt, zeroed) -> float:
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekit.compress.evaluate import domain_windows
    from moekit.trace.data import encoder, resolve_data

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        for layer, e in zeroed:
            for p in model.model.layers[layer].mlp.experts.parameters():  # fused [E, ...] tensors
                p[e] = 0
    windows = domain_windows(resolve_data([str(txt)]), encoder(AutoTokenizer.from_pretrained(model_dir)), 256, 8192)
    nll = count = 0.0
    with torch.no_grad():
        for w in (w for ws in windows.values() for w in ws):
            ids = torch.as_tensor(w, dtype=torch.long)[None]  # [1, S]
            logits = model(ids).logits[0, :-1]  # [S-1, V]
            nll += torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def test_zeroed_expert_outputs_zero():
    import torch

    import moekit.models
    from moekit.compress.ablate import zero_experts
    from moekit.ops.reference import expert_mlp
    from tests.conftest import tiny_model

    view = moekit.models.load(tiny_model("gpt_oss"))  # biases too
    layer = view.layers[0]
    zero_experts(view, [(layer.index, 3)])
    assert torch.equal(expert_mlp(torch.randn(5, 32), layer.expert_views(3), layer.activation), torch.zeros(5, 32))


def test_ablate_needs_activation_stats(tmp_path, capsys, traced):
    model, _, txt = traced
    with pytest.raises(SystemExit):
        main(["trace", str(model), "--data", str(txt), "--out", str(tmp_path / "t"), "--seq-len", "32", "--json"])
    capsys.readouterr()
    code, _, err = run_cli(["ablate", str(model), "--trace", str(tmp_path / "t"), "--data", str(txt)], capsys)
    assert code == 2 and "--activation-stats" in err and len(err.strip().splitlines()) == 1
