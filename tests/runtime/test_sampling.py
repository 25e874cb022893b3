"""The shared sampler against transformers' own warpers (the slow reference), its seeding, and `moekit run` with it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from moekit.errors import UserError
from moekit.runtime.sampling import Sampler, SamplingParams, sample_step
from tests.helpers import run_cli


def hf_warp(logits, p: SamplingParams):
    x = logits[None].clone()
    x = TemperatureLogitsWarper(p.temperature)(None, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(None, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(None, x)
    return x[0]


@pytest.mark.parametrize("params", [SamplingParams(0.7), SamplingParams(1.3, top_k=5), SamplingParams(1.0, top_p=0.6),
                                    SamplingParams(0.5, top_p=0.9, top_k=40), SamplingParams(2.0, top_k=1)])
def test_warp_keeps_the_tokens_transformers_keeps(params):
    logits = torch.randn(200, generator=torch.Generator().manual_seed(3)) * 3
    ours, ref = Sampler(params).warp(logits), hf_warp(logits, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    torch.testing.assert_close(ours[kept], ref[kept])


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    toks, _ = sample_step(logits, [Sampler(SamplingParams(0.0)) for _ in range(4)])
    assert toks == logits.argmax(-1).tolist()
    toks, _ = sample_step(logits, [Sampler(SamplingParams(1.0, top_k=1, seed=i)) for i in range(4)])
    assert toks == logits.argmax(-1).tolist()


def test_draws_follow_the_distribution_and_the_seed():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    p = SamplingParams(temperature=0.8, seed=11)
    s = Sampler(p)
    draws = torch.tensor([s.choose(logits) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits / 0.8, -1), atol=0.03, rtol=0)
    again = Sampler(p)
    assert [again.choose(logits) for _ in range(4000)] == draws.tolist()  # the same seed, the same stream
    other = Sampler(p, choice=1)  # choice i of one request draws from seed + i
    assert [other.choose(logits) for _ in range(50)] != draws[:50].tolist()


def test_a_row_does_not_depend_on_its_neighbours():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(1.0, seed=5)
    alone = [sample_step(logits[1:2], [Sampler(p)])[0][0] for _ in range(1)]
    together, _ = sample_step(logits, [Sampler(SamplingParams(1.0, seed=9)), Sampler(p), Sampler(SamplingParams(0))])
    assert together[1] == alone[0]


def test_logprobs_are_the_raw_distribution():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(2))
    toks, lps = sample_step(logits, [Sampler(SamplingParams(0.0, logprobs=3)), Sampler(SamplingParams(0.5, seed=1))])
    ref = torch.log_softmax(logits[0], -1)
    assert lps[1] is None and lps[0].token == toks[0]
    assert lps[0].logprob == pytest.approx(float(ref.max()))
    assert [t for t, _ in lps[0].top] == ref.topk(3).indices.tolist()


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(logprobs=21)])
def test_bad_parameters(kwargs):
    with pytest.raises(UserError):
        SamplingParams(**kwargs)


def test_run_samples_with_a_seed_and_chats(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    base = ["run", "demo/model", "--budget", "all", "--max-new-tokens", "8", "--json", "--prompt", "How are you?"]
    texts = []
    for seed in (3, 3, 4):
        code, out, err = run_cli([*base, "--temperature", "1.0", "--seed", str(seed)], capsys)
        assert code == 0, err
        texts.append(json.loads(out)["text"])
    assert texts[0] == texts[1] != texts[2]
    code, out, _ = run_cli([*base, "--chat"], capsys)
    reply = json.loads(out)["text"]
    assert code == 0 and reply and not reply.startswith("A:")  # only the model's turn, not the template
    code, _, err = run_cli([*base, "--top-p", "0"], capsys)
    assert code == 2 and "top_p" in err
