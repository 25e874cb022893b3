"""`moekit run` stays within resident weights + budget + a stated slack, on a model whose experts are 4x the budget.

Measured in processes forked from one server (tests/processes.py), against the same run of a twin checkpoint whose
experts are almost empty (same layers, attention, vocabulary, tokenizer and code paths): what the twin's run peaks at is
the interpreter, the libraries and the activations, so the difference is what the weights and the cache add.
- a run from a built store: peak RSS (VmHWM) <= twin + resident weights + budget + SLACK;
- the first run, which builds the store first: its anonymous memory (RssAnon, sampled) obeys the same bound. Its
  VmHWM also counts the checkpoint's pages safetensors maps while transformers converts them (page cache the kernel
  can drop, ~ the checkpoint's size), so VmHWM is reported, not bounded, for that run;
- the bound means something: the experts are 4x the budget, and the same run with a budget that holds every expert
  peaks higher by at least half of what it caches beyond the budget.
SLACK covers the expert reads in flight (io_threads x one expert), the cache's bookkeeping and allocator rounding."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import PreTrainedTokenizerFast

from moekit.runtime.checkpoint import build_store_from_checkpoint
from tests.processes import run
from tests.trace.helpers import CHARS, char_tokenizer

MiB = 2**20
BUDGET = 48 * MiB
SLACK = 32 * MiB


def _checkpoint(path, moe_intermediate: int):
    """8 layers x 16 experts (top-2), hidden 256, float32; routers spread (std 1) so a prompt reaches most experts."""
    config = transformers.Qwen3MoeConfig(hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=64, vocab_size=128,
                                         max_position_embeddings=512, num_experts=16, num_experts_per_tok=2,
                                         moe_intermediate_size=moe_intermediate, norm_topk_prob=True)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0, 1.0 if name.endswith("mlp.gate.weight") else 0.02,
                                                       generator=g)
    model.save_pretrained(path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=char_tokenizer(), eos_token="<eos>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    experts = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    return experts, sum(p.numel() * 4 for p in model.parameters()) - experts


@pytest.mark.slow
def test_run_peak_rss_is_resident_plus_budget_plus_slack(tmp_path):
    experts, resident = _checkpoint(tmp_path / "big", 512)
    _checkpoint(tmp_path / "twin", 8)
    assert experts >= 4 * BUDGET, "the experts must exceed the budget 4x for the bound to mean something"
    build_store_from_checkpoint(tmp_path / "twin", tmp_path / "twin-store")
    env = {"MOEKIT_CACHE": str(tmp_path / "cache")}

    def moekit_run(name: str, budget: int):
        argv = ["run", str(tmp_path / name), "--prompt", CHARS.replace("\n", " ")[:80], "--budget", str(budget),
                "--store", str(tmp_path / f"{name}-store"), "--max-new-tokens", "8", "--json"]
        result = run(argv, tmp_path / "log", env=env)
        assert result.code == 0, result.log
        return result, json.loads(result.log.splitlines()[-1])

    twin, _ = moekit_run("twin", BUDGET)
    first, _ = moekit_run("big", BUDGET)  # builds the store, then generates
    again, stats = moekit_run("big", BUDGET)  # from the store
    allowed = resident + BUDGET + SLACK
    report = (f"twin {twin.peak_rss / MiB:.0f} MiB (anon {twin.peak_anon / MiB:.0f}); first run "
              f"{first.peak_rss / MiB:.0f} (anon {first.peak_anon / MiB:.0f}); from the store "
              f"{again.peak_rss / MiB:.0f}; allowed over the twin: "
              f"{resident / MiB:.1f} resident + {BUDGET / MiB:.0f} budget + {SLACK / MiB:.0f} slack")
    assert again.peak_rss <= twin.peak_rss + allowed, report
    assert first.peak_anon <= twin.peak_anon + allowed, report
    assert stats["bytes_read"] > BUDGET, "the run must read more than the budget holds (evictions)"

    everything, unbounded = moekit_run("big", 4 * experts)  # a budget that holds every expert it reads
    cached_beyond = min(unbounded["bytes_read"], experts) - BUDGET
    assert cached_beyond > SLACK, "the prompt reaches too few experts to tell the budget from no budget"
    print(f"{report}; every expert cached: {everything.peak_rss / MiB:.0f} MiB")  # pytest -s shows the numbers
    assert everything.peak_rss - again.peak_rss >= cached_beyond / 2, (
        f"{report}; with every expert cached {everything.peak_rss / MiB:.0f} MiB: the measurement does not see the "
        f"{cached_beyond / MiB:.0f} MiB cached beyond the budget")
