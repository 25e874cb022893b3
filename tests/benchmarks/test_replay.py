"""The offload benchmark's replayed workload (benchmarks/_replay.py): a trace replayed on a model of another size gives
the in-memory model and its offloaded twin the same routing, row for row the mapped trace's, from per-prompt starts
in different domains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moekit.models
import moekit.runtime as rt
from tests.benchmarks.helpers import bench_module
from tests.trace.helpers import record_small_trace, save_checkpoint

replay = bench_module("_replay")
workload = bench_module("_workload")


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    """A 16-expert top-4 trace over three domains (prose, code, math), windows of 24 tokens."""
    return record_small_trace(tmp_path_factory.mktemp("replay"), seq_len=24)


def target(seed: int = 0):
    """A Qwen3-MoE of 32 experts top-8 (E and K twice the trace's), 3 MoE layers."""
    import transformers

    config = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=8, vocab_size=128, num_experts=32, num_experts_per_tok=8)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.set_experts_implementation("eager")
    return model


def test_starts_cover_the_traces_domains(trace_dir):
    source = replay.ReplaySource(trace_dir)
    t = source.trace
    names = t.manifest["domain_names"]
    starts = source.starts(3, [10, 10, 10])
    assert [names[int(t.domain[s])] for s in starts] == names  # one prompt per domain, in traced order
    assert all(s == 0 or t.seq_id[s] != t.seq_id[s - 1] for s in starts)  # each at a window's first row
    for s in starts:
        assert (t.seq_id[s:s + 10] == t.seq_id[s]).all()  # and the window holds the prompt's rows
    assert source.starts(2, [10_000, 10_000]) == [0, 0]  # no window long enough: the stream from row 0


def test_both_systems_follow_the_mapped_trace(trace_dir, tmp_path):
    offload = bench_module("offload")
    source = replay.ReplaySource(trace_dir)
    prompts = [torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 7)]
    new_tokens = 6
    starts = source.starts(2, [p.shape[1] + new_tokens - 1 for p in prompts])
    ref = target()
    twin = target()
    view = moekit.models.load(twin)
    rt.build_store(view, tmp_path / "store")
    om = rt.offload(view, tmp_path / "store", rt.min_budget(view, rt.ExpertStore(tmp_path / "store").expert_bytes),
                    prefetch=False, record=True)
    executed, outs = [], []
    for model, v in ((ref, moekit.models.load(ref)), (twin, view)):
        run = source.attach(v, starts)
        toks = []
        for i, p in enumerate(prompts):
            run.begin(i)
            toks.append(offload.decode(model, p, new_tokens, offload.Sampler(1.0, i))[0])
        executed.append(run.executed())
        outs.append(toks)
        run.remove()
    assert all(torch.equal(a, b) for a, b in zip(*outs))  # same routing, same logits, same sampled tokens
    assert offload.same_executed(*executed)
    engine = om.routing()  # what the offloaded engine computed: the replayed ids, every prompt's rows in order
    for layer, ids in zip(view.layers, engine):
        want = np.concatenate([run[layer.index] for run in executed[1]])
        assert [set(r) for r in ids.tolist()] == [set(r) for r in want.tolist()]
    om.close()
    # row for row the mapped trace from each prompt's start; layer i of 3 follows trace layer i * 2 // 3
    t = source.trace
    trace_rows = [[t.ids(t.layers[i * len(t.layers) // 3])[s:s + len(run[m.index])]
                   for s, run in zip(starts, executed[0])] for i, m in enumerate(view.layers)]
    got = [[run[m.index] for run in executed[0]] for m in view.layers]
    check = workload.locality_kept(trace_rows, got, t.num_experts, 32)
    assert check["follows"] == 1.0 and check["max_srp_diff"] == 0.0 and check["kept"]
    # the row check is the one that can fail: the same runs read against the trace one row later do not follow it
    late = [[rows[1:] for rows in layer] for layer in trace_rows]
    assert workload.locality_kept(late, [[g[:-1] for g in layer] for layer in got], t.num_experts, 32)["follows"] < 1


def test_replay_check_reports_the_whole_trace_beside_the_run(trace_dir):
    offload = bench_module("offload")
    source = replay.ReplaySource(trace_dir)
    t = source.trace
    starts = source.starts(2, [8, 8])
    from moekit.routing.replay import map_ids

    executed = [{li: map_ids(t.ids(li)[s:s + 8], t.num_experts, 32, 8) for li in t.layers} for s in starts]
    rep = offload.replay_check(source, executed, starts, 32)
    assert rep["locality"]["kept"] and rep["start_domains"] == [t.manifest["domain_names"][int(t.domain[s])]
                                                                for s in starts]
    assert set(rep["whole_trace"]["per_layer"]) == set(t.layers)
    assert rep["whole_trace"]["capacities"] == [2 * t.top_k, 4 * t.top_k]


def test_warm_run_reads_its_misses_from_the_page_cache_and_the_cold_run_from_the_disk(tmp_path):
    """--warm: the same decode with the store's files read once first and nothing dropped; moekit's RWF_NOWAIT reads
    count what the page cache served (all of it warm, none cold: O_DIRECT). A tiny model's files stay cached after its
    prefill anyway, so this guards the wiring (buffered reads, counter), not the warm-up read itself."""
    offload = bench_module("offload")
    ckpt = save_checkpoint(tmp_path / "ckpt")
    prompts = [torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    runs = {}
    for warm in (False, True):
        res, outs, _ = offload.run_moekit(ckpt, tmp_path, 0.5, prompts, 6, False, "lru", 1,
                                          [offload.Sampler(1.0, i) for i in range(2)], warm=warm)
        runs[warm] = res, outs
    (cold, cold_out), (warm, warm_out) = runs[False], runs[True]
    assert cold["bytes_per_token"] > 0 and cold["page_cache_bytes_per_token"] == 0
    assert warm["page_cache_bytes_per_token"] == warm["bytes_per_token"] > 0
    assert all(torch.equal(a, b) for a, b in zip(cold_out, warm_out))  # the page cache changes where bytes come from
