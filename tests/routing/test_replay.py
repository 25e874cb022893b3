"""replay=TRACE for users: `moekit run --routing replay=TRACE` (open_offloaded) follows the trace row for row on a model
of another size, and `moekit simulate TRACE --replay-on TARGET` gives the cache what-if at TARGET's size from its
config alone; the trace's weights carried over for the score policy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import moekit.models
import moekit.runtime as rt
import moekit.trace
from moekit.routing.replay import map_ids, map_weights, mapped_layers, sequence_starts
from moekit.runtime.simulate import simulate, with_bounds
from moekit.runtime.hardware import load_profile
from moekit.runtime.sampling import SamplingParams
from moekit.serve.scheduler import Engine, EngineConfig, SequenceSpec
from tests.helpers import run_cli
from tests.trace.helpers import char_tokenizer, record_small_trace


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    """A trace of a 16-expert top-4 model, 3 MoE layers."""
    return record_small_trace(tmp_path_factory.mktemp("replay-user"), seq_len=32)


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    """A 3-layer Qwen3-MoE of 32 experts top-8 saved with a tokenizer (what `moekit run` opens)."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("bigger") / "model"
    config = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=8, vocab_size=128, num_experts=32, num_experts_per_tok=8)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=char_tokenizer(), eos_token="<eos>", unk_token="<unk>").save_pretrained(
        folder)
    return folder


def test_map_weights_shares_a_trace_experts_weight_over_its_block():
    ids, w = np.array([[3, 0]]), np.array([[0.7, 0.3]], np.float32)
    mapped = map_ids(ids, 4, 8, 4)  # [[6, 0, 7, 1]]
    np.testing.assert_allclose(map_weights(ids, w, mapped, 4, 8), [[0.35, 0.15, 0.35, 0.15]], rtol=1e-6)
    collapsed = map_ids(np.array([[0, 1]]), 4, 2, 2)  # both onto expert 0, expert 1 a fill-up
    np.testing.assert_allclose(map_weights(np.array([[0, 1]]), w, collapsed, 4, 2), [[1.0, 0.0]], rtol=1e-6)
    same = map_ids(ids, 4, 4, 2)
    np.testing.assert_array_equal(map_weights(ids, w, same, 4, 4), w)  # same shape: the identity


def test_run_with_replay_follows_the_trace(trace_dir, bigger):
    """The path `moekit run MODEL --routing replay=TRACE` takes: the offloaded model's routers return, row for row,
    the trace's tokens mapped to 32 experts top-8."""
    om = rt.open_offloaded(bigger, rt.RuntimeOptions(budget="1GB", routing=f"replay={trace_dir}", threads=1))
    seen = {m.index: [] for m in om.view.layers}
    hooks = [m.router.register_forward_hook(lambda mod, a, out, m=m: seen[m.index].append(
        m.parse_router_output(out)[2].numpy().copy())) for m in om.view.layers]
    routing = om.routing_policy.for_prompt("It was")
    om.routing_hooks.set_all(routing)
    ids = om.tokenizer("It was the best", return_tensors="pt").input_ids
    with torch.no_grad():
        om.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    trace = moekit.trace.open(trace_dir)
    for index, source, want in mapped_layers(trace, om.view):
        got = np.concatenate(seen[index])
        assert got.shape == (ids.shape[1] + 4, 8)  # the prefill's rows, then one per fed-back token
        assert [set(r) for r in got.tolist()] == [set(r) for r in want[:len(got)].tolist()]
    for h in hooks:
        h.remove()
    om.close()


def test_served_sequences_replay_their_own_traced_sequences(trace_dir, bigger):
    """Under a server-wide replay=TRACE each new sequence replays its own traced sequence (n mod S): one sequence
    alone follows the trace from row 0 (as before); then two sequences packed in the same steps get different
    expert ids, each its own traced sequence's rows (mapped), not the same rows in lockstep."""
    om = rt.open_offloaded(bigger, rt.RuntimeOptions(budget="1GB", routing=f"replay={trace_dir}", threads=1))
    eng = Engine(om.model, om.tokenizer, EngineConfig(max_batch=4, max_step_tokens=64), max_len=256,
                 routing_hooks=om.routing_hooks)
    calls = {m.index: [] for m in om.view.layers}  # per router call (one per step): the packed rows' ids
    hooks = [m.router.register_forward_hook(lambda mod, a, out, m=m: calls[m.index].append(
        m.parse_router_output(out)[2].numpy().copy())) for m in om.view.layers]
    max_tokens = 6

    def serve(prompts: list[str]) -> dict[int, list[np.ndarray]]:
        """Each sequence's routed rows per layer. The first step packs the prompts (admission order), every later
        one decodes one token of each sequence (the same order): docs of moekit/serve/scheduler.py."""
        for c in calls.values():
            c.clear()
        ids = [om.tokenizer(p).input_ids for p in prompts]
        for i, p in enumerate(ids):
            eng.submit(f"r{i}", [SequenceSpec(p, max_tokens, SamplingParams(temperature=0),
                                              routing=om.routing_policy.for_prompt(prompts[i]))], lambda events: None)
        for _ in range(50):
            if not eng.step():
                break
        edges = np.cumsum([0] + [len(p) for p in ids])
        assert all(c[0].shape[0] == edges[-1] and all(len(step) == len(ids) for step in c[1:]) for c in calls.values())
        return {index: [np.concatenate([c[0][edges[s]:edges[s + 1]], *(step[s:s + 1] for step in c[1:])])
                        for s in range(len(ids))] for index, c in calls.items()}

    trace = moekit.trace.open(trace_dir)
    starts = sequence_starts(trace)
    want = {index: ids for index, _, ids in mapped_layers(trace, om.view)}
    assert np.diff(starts[:4]).min() >= 20  # sequences 0-2's stretches each inside its own traced window
    alone = serve(["It was the best"])  # sequence 0
    pair = serve(["It was the best", "The code runs"])  # sequences 1 and 2, in the same steps
    as_sets = lambda a: [set(r) for r in a.tolist()]  # noqa: E731  (the order within a row is the router's)
    for index in want:
        got = alone[index][0]
        assert got.shape[0] == len(om.tokenizer("It was the best").input_ids) + max_tokens - 1  # prompt, fed back
        assert as_sets(got) == as_sets(want[index][:len(got)])  # row 0 on: what one sequence always replayed
        a, b = pair[index]
        assert as_sets(a) != as_sets(b[:len(a)])
        for seq, rows in ((1, a), (2, b)):
            assert as_sets(rows) == as_sets(want[index][starts[seq]:starts[seq] + len(rows)])
    for h in hooks:
        h.remove()
    om.close()


def test_simulate_replay_on_a_config_folder(trace_dir, bigger, tmp_path, capsys):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    config = json.loads((bigger / "config.json").read_text())
    (config_only / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))  # no weights, tokenizer
    code, out, err = run_cli(["simulate", str(trace_dir), "--replay-on", str(config_only), "--policy",
                              "lru,score,belady", "--capacity", "1x,2x", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model_shape"] == {"num_experts": 32, "top_k": 8, "layers": 5}
    assert doc["trace_shape"] == {"num_experts": 16, "top_k": 4, "layers": 3}
    # an independent run of the simulator on the mapped ids and weights gives the same rows
    trace, view = moekit.trace.open(trace_dir), moekit.models.load(config_only, meta=True)
    src = [trace.layers[i] for i in (0, 0, 1, 1, 2)]  # model layer i follows trace layer i * 3 // 5
    ids = [map_ids(trace.ids(s), 16, 32, 8) for s in src]
    weights = [map_weights(trace.ids(s), trace.weights(s), m, 16, 32) for s, m in zip(src, ids)]
    want = with_bounds(simulate(ids, num_experts=32, top_k=8, expert_bytes=view.bytes_per_expert(),
                                policies_=("lru", "score", "belady"), capacities=(1, 2), weights_per_layer=weights),
                       load_profile("nvme-cpu"), layers=5, top_k=8, expert_params=view.layers[0].expert_numel())
    assert [(r["policy"], r["experts_per_layer"], r["hits"], r["misses"]) for r in doc["rows"]] == [
        (r["policy"], r["experts_per_layer"], r["hits"], r["misses"]) for r in want]
    assert [r["experts_per_layer"] for r in doc["rows"]][:2] == [8, 16]


def test_simulate_replay_on_the_traces_own_shape_changes_nothing(trace_dir, capsys):
    ckpt = trace_dir.parent / "ckpt"
    args = ["simulate", str(trace_dir), "--policy", "lru,score", "--capacity", "1x,2x", "--json"]
    _, plain, _ = run_cli(args + ["--model", str(ckpt)], capsys)
    _, replayed, _ = run_cli(args + ["--replay-on", str(ckpt)], capsys)
    assert json.loads(plain)["rows"] == json.loads(replayed)["rows"]


def test_simulate_refuses_a_model_of_another_shape_without_replay_on(trace_dir, bigger, capsys):
    code, out, err = run_cli(["simulate", str(trace_dir), "--model", str(bigger)], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--replay-on" in err and "32 experts top-8" in err and "16 top-4" in err
    code, _, err = run_cli(["simulate", str(trace_dir), "--replay-on", str(bigger / "nowhere")], capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
