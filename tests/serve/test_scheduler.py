"""The continuous-batching engine in-process: batched tokens equal each prompt run alone (transformers' `generate`,
what `moekit run` calls) on the demo model with experts offloaded, whatever else is in the batch; seeds; aborts;
bounds; families whose layers are not all attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moekit.runtime as rt
from moekit.runtime.sampling import SamplingParams
from moekit.serve.scheduler import Engine, EngineConfig, QueueFull, SequenceSpec
from tests.conftest import tiny_model

DEMO = Path(__file__).resolve().parents[2] / "demo"
GREEDY = SamplingParams(temperature=0)
N = 12


def corpus(name: str, chars: int) -> str:
    return (DEMO / "corpus" / "heldout" / f"{name}.txt").read_text()[:chars]


PROMPTS = ["def fibonacci(n):", "The king said", "A: How are you?\nB:", "Москва", corpus("japanese", 120),
           corpus("russian", 200), "import os\nimport sys\n", "Let x = 3"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model with 8 of its 32 experts per layer cached (evictions in every step), and each prompt's
    greedy continuation by transformers' generate alone (computed before the engine takes the model)."""
    om = rt.open_offloaded(DEMO / "model", rt.RuntimeOptions(budget="6MiB", store=tmp_path_factory.mktemp("store"),
                                                             threads=1))
    ids = [om.tokenizer(p).input_ids for p in PROMPTS]
    ref = []
    with torch.no_grad():
        for p in ids:
            out = om.model.generate(torch.tensor([p]), max_new_tokens=N, do_sample=False, pad_token_id=0,
                                    eos_token_id=None)
            ref.append(out[0, len(p):].tolist())
    yield om, ids, ref
    om.close()


class Collect:
    def __init__(self):
        self.tokens, self.finish, self.text = {}, {}, {}

    def sink(self, rid):
        def f(events):
            for e in events:
                self.tokens.setdefault(rid, []).extend(e.tokens)
                self.text[rid] = self.text.get(rid, "") + e.text
                if e.finish_reason is not None:
                    self.finish[rid] = e.finish_reason
        return f


def engine(om, **cfg) -> Engine:
    return Engine(om.model, om.tokenizer, EngineConfig(**cfg), max_len=1024)


def run_all(eng: Engine, arrivals: dict[int, list] = (), check=None) -> None:
    """Step until idle (bounded), submitting arrivals[step] = [(rid, specs, sink)] when that step comes."""
    for step in range(2000):
        for rid, specs, sink in dict(arrivals).get(step, []):
            eng.submit(rid, specs, sink)
        busy = eng.step()
        if check is not None:
            check(eng)
        if not busy and step > max(dict(arrivals) or [0]):
            return
    raise AssertionError("the engine did not drain in 2000 steps")


def test_batched_equals_alone_with_chunked_prefill_and_late_arrivals(demo):
    om, ids, ref = demo
    longest = max(len(p) for p in ids)
    cfg = dict(max_batch=3, max_step_tokens=24, max_queue=16, max_kv_tokens=longest + N + 40)
    eng = engine(om, **cfg)
    assert eng.batched
    out = Collect()
    arrivals = {0: [(f"r{i}", [SequenceSpec(p, N, GREEDY)], out.sink(f"r{i}")) for i, p in enumerate(ids[:4])]}
    arrivals.update({2 * k + 1: [(f"r{i}", [SequenceSpec(ids[i], N, GREEDY)], out.sink(f"r{i}"))]
                     for k, i in enumerate(range(4, len(ids)))})
    seen = {"max_batch": 0, "prefill_and_decode": False}

    def check(e):
        assert len(e.running) <= cfg["max_batch"] and e.reserved <= cfg["max_kv_tokens"]
        seen["max_batch"] = max(seen["max_batch"], len(e.running))
        phases = {s.cached < len(s.prompt) for s in e.running}
        seen["prefill_and_decode"] |= phases == {True, False}

    run_all(eng, arrivals, check)
    assert seen["max_batch"] == cfg["max_batch"] and seen["prefill_and_decode"]  # it did batch, and mix phases
    for i, r in enumerate(ref):
        assert out.tokens[f"r{i}"] == r, f"prompt {i} differs from generate alone"
        assert out.finish[f"r{i}"] == "length"
    assert eng.reserved == 0 and not eng.running and not eng.waiting


def test_seed_gives_the_same_tokens_whatever_the_batch(demo):
    om, ids, _ = demo
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone, crowded = Collect(), Collect()
    eng = engine(om, max_batch=8)
    run_all(eng, {0: [("a", [SequenceSpec(ids[0], N, sampled)], alone.sink("a"))]})
    others = [("g", [SequenceSpec(ids[1], N, GREEDY)]), ("s", [SequenceSpec(ids[2], N, SamplingParams(0.7, seed=9))]),
              ("t", [SequenceSpec(ids[3], N, SamplingParams(1.0))])]
    run_all(eng, {0: [(rid, specs, crowded.sink(rid)) for rid, specs in others],
                  2: [("a", [SequenceSpec(ids[0], N, sampled)], crowded.sink("a"))]})
    assert alone.tokens["a"] == crowded.tokens["a"]
    other_seed = Collect()
    run_all(eng, {0: [("b", [SequenceSpec(ids[0], N, SamplingParams(0.9, 0.95, seed=4321))], other_seed.sink("b"))]})
    assert other_seed.tokens["b"] != alone.tokens["a"]  # the seed matters


def test_abort_drops_only_that_request_queued_or_running(demo):
    om, ids, ref = demo
    eng = engine(om, max_batch=2, max_queue=8)
    out = Collect()
    for i in range(4):
        eng.submit(f"r{i}", [SequenceSpec(ids[i], N, GREEDY)], out.sink(f"r{i}"))
    for _ in range(3):
        eng.step()
    running = {s.request.id for s in eng.running}
    assert running == {"r0", "r1"} and {s.request.id for s in eng.waiting} == {"r2", "r3"}
    eng.abort("r1")  # running
    eng.abort("r3")  # queued
    run_all(eng)
    assert out.tokens["r0"] == ref[0] and out.tokens["r2"] == ref[2]
    assert "r1" not in out.finish and "r3" not in out.tokens  # no event after the abort, none at all when queued
    assert eng.reserved == 0 and eng.load() == {"running": 0, "waiting": 0, "kv_reserved": 0, "kv_tokens": 0}


def test_queue_bound(demo):
    om, ids, _ = demo
    eng = engine(om, max_batch=1, max_queue=2)
    out = Collect()
    eng.submit("a", [SequenceSpec(ids[0], 2, GREEDY)], out.sink("a"))
    with pytest.raises(QueueFull):
        eng.submit("b", [SequenceSpec(ids[1], 2, GREEDY), SequenceSpec(ids[1], 2, GREEDY)], out.sink("b"))
    eng.submit("c", [SequenceSpec(ids[1], 2, GREEDY)], out.sink("c"))
    eng.step()  # admits a: the queue has room again
    eng.submit("d", [SequenceSpec(ids[2], 2, GREEDY)], out.sink("d"))
    run_all(eng)
    assert set(out.finish) == {"a", "c", "d"}
    with pytest.raises(ValueError, match="exceeds"):
        eng.submit("e", [SequenceSpec(ids[0], 2000, GREEDY)], out.sink("e"))


def test_stop_token_ids_end_the_sequence(demo):
    om, ids, ref = demo
    i = next(i for i, r in enumerate(ref) if len(set(r[:6])) > 3)
    cut = 3
    while ref[i][cut] in ref[i][:cut]:
        cut += 1
    eng = engine(om)
    out = Collect()
    run_all(eng, {0: [("r", [SequenceSpec(ids[i], N, GREEDY, stop_ids=frozenset({ref[i][cut]}))], out.sink("r"))]})
    assert out.tokens["r"] == ref[i][:cut] and out.finish["r"] == "stop"


def test_a_stop_string_found_in_the_text_held_back_at_max_tokens_is_a_stop(demo):
    """The last token completes a stop string y while a longer stop x + y + ... is still pending from x on, so y is
    held back; at max_tokens the flushed text holds y: finish_reason is "stop" (not "length"), the text cut before y.
    y is the shortest suffix of the unstopped text found nowhere earlier in it."""
    om, ids, _ = demo
    m, prompt = 12, ids[0]
    out = Collect()
    run_all(engine(om), {0: [("free", [SequenceSpec(prompt, m, GREEDY)], out.sink("free"))]})
    full = out.text["free"]
    n = next(n for n in range(1, len(full)) if full.find(full[-n:]) == len(full) - n)  # y: found only at the end
    x, y = full[-n - 1], full[-n:]
    run_all(engine(om), {0: [("r", [SequenceSpec(prompt, m, GREEDY, stop=[y, x + y + "\u0000"])], out.sink("r"))]})
    assert out.finish["free"] == "length"
    assert out.finish["r"] == "stop" and out.text["r"] == full[:-n], (x, y)


@pytest.mark.parametrize("family, batched", [("qwen3_moe", True), ("deepseek_v3", True), ("gpt_oss", True),
                                             ("mimo_v2_flash", True), ("qwen3_next", False), ("minimax", False),
                                             ("deepseek_v32", False)])
def test_families_equal_generate(family, batched, demo):
    """Attention-only families are batched (sliding windows, MLA, sinks, eager attention included); families with
    linear-attention, Mamba or indexer layers are detected and computed one sequence at a time, still exact."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (5, 11, 3)]  # > the sliding window of 8
    ref = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    eng = Engine(model, demo[0].tokenizer, EngineConfig(max_batch=3, max_step_tokens=8), max_len=128)
    assert eng.batched == batched
    out = Collect()
    run_all(eng, {0: [(str(i), [SequenceSpec(p, 6, GREEDY)], out.sink(str(i))) for i, p in enumerate(prompts)]})
    assert [out.tokens[str(i)] for i in range(3)] == ref


def test_in_memory_grouped_experts_batched_equals_alone():
    """--budget all: the whole model in memory, transformers' grouped_mm experts; batching keeps the tokens too."""
    om = rt.open_offloaded(DEMO / "model", rt.RuntimeOptions(budget="all", threads=1))
    assert not om.layers and om.model.config._experts_implementation in ("grouped_mm", "eager")
    ids = [om.tokenizer(p).input_ids for p in PROMPTS[:5]]
    with torch.no_grad():
        ref = [om.model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)[0, len(p):].tolist() for p in ids]
    eng = engine(om, max_batch=5, max_step_tokens=40)
    out = Collect()
    run_all(eng, {0: [(str(i), [SequenceSpec(p, 8, GREEDY)], out.sink(str(i))) for i, p in enumerate(ids)]})
    assert [out.tokens[str(i)] for i in range(5)] == ref
