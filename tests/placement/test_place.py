"""`moekit place` / `place-eval` end to end on tiny traces: every output passes the engines' structural rules, bad
input gets one line and exit code 2, nothing half-written is left behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import moekit.placement as mp
from moekit.errors import UserError
from moekit.placement.check import plan_dir_problems, sglang_file_problems
from tests.helpers import run_cli


@pytest.mark.parametrize("method, gpus, nodes, redundant", [("eplb", 2, 1, 0), ("eplb", 4, 2, 4),
                                                             ("exflow", 4, 1, 0), ("balanced-affinity", 2, 1, 2)])
def test_outputs_are_valid_for_the_engines(qwen_trace, tmp_path, method, gpus, nodes, redundant):
    model, trace = qwen_trace
    out = tmp_path / "plan"
    rep = mp.place(trace, out, mp.Cluster(gpus, nodes, redundant), method, options=mp.PlanOptions(time_limit=10))
    assert sorted(p.name for p in out.iterdir()) == ["eplb.safetensors", "plan.json", "sglang.json"]
    assert plan_dir_problems(out) == []
    E, P = 16, 16 + redundant
    # independently of the checker: SGLang's file has exactly one key, a row per decoder layer of length P
    d = json.loads((out / "sglang.json").read_text())
    assert list(d) == ["physical_to_logical_map"] and np.asarray(d["physical_to_logical_map"]).shape == (3, P)
    assert all(sorted(set(r)) == list(range(E)) for r in d["physical_to_logical_map"])
    t = load_file(out / "eplb.safetensors")
    assert t["phy2log"].shape == (3, P) and t["logcnt"].sum(axis=1).tolist() == [P] * 3
    assert (t["log2phy"] >= -1).all() and t["log2phy"].shape[2] == t["logcnt"].max()
    meta = json.loads((out / "plan.json").read_text())
    assert meta["method"] == method and meta["topology"]["gpus"] == gpus and meta["solver"] == rep["solver"]
    assert set(meta["metrics_on_fit_trace"]) == {"plan", "default"} and meta["inputs"]["kind"] == "moekit trace"
    assert meta["info"]["model_facts"]["hidden_size"] == 32  # read from the traced model's config


def test_dense_layers_get_trivial_rows(grouped_trace, tmp_path):
    model, trace = grouped_trace  # deepseek_v3: layer 0 dense; 8 experts in 2 groups, top-2
    rep = mp.place(trace, tmp_path / "p", mp.Cluster(2, 2, 2), "eplb")
    rows = json.loads((tmp_path / "p" / "sglang.json").read_text())["physical_to_logical_map"]
    assert len(rows) == 3 and rows[0] == [p % 8 for p in range(10)]
    assert rep["constraints"]["eplb_policy"] == "hierarchical" and rep["topology"]["num_groups"] == 2
    # groups on nodes: each node's 5 slots hold one whole group of 4 experts
    for row in rows[1:]:
        assert {e // 4 for e in row[:5]} != {e // 4 for e in row[5:]} and len({e // 4 for e in row[:5]}) == 1


def test_place_eval_scores_plan_and_default(qwen_trace, tmp_path, capsys):
    model, trace = qwen_trace
    code, out, err = run_cli(["place", str(trace), "--gpus", "4", "--method", "balanced-affinity", "--out",
                              str(tmp_path / "p"), "--time-limit", "10"], capsys)
    assert code == 0 and "cross-GPU transitions" in out and "solver:" in out
    code, out, err = run_cli(["place-eval", str(tmp_path / "p"), "--trace", str(trace), "--json"], capsys)
    res = json.loads(out)
    for key in ("vllm_balancedness", "sglang_balancedness", "cross_gpu_transitions", "dispatch_bytes_per_token",
                "nodes_per_token", "moe_step_ms"):
        assert res["plan"][key] is not None and res["default"][key] is not None, key
    assert res["plan"]["cross_gpu_transitions"] <= res["default"]["cross_gpu_transitions"] + 1e-9
    assert res["hardware"]["name"] == "dgx-h100" and len(res["plan"]["layers"]) == 3
    assert res["plan"]["dispatch_bytes_per_token"] == pytest.approx(
        res["plan"]["dispatch_gpus_per_token_layer"] * 3 * 32 * 4)  # 3 layers x hidden 32 x float32
    # an SGLang map scores the same as the folder it came from
    code, out2, _ = run_cli(["place-eval", str(tmp_path / "p" / "sglang.json"), "--gpus", "4", "--trace", str(trace),
                             "--json", "--model", str(model)], capsys)
    assert json.loads(out2)["plan"]["vllm_balancedness"] == pytest.approx(res["plan"]["vllm_balancedness"])


def test_sglang_stat_dump_input(tmp_path, capsys):
    counts = torch.randint(1, 90, (3, 4, 8), dtype=torch.int32)
    counts[:, 0] = 0  # a dense layer
    torch.save(dict(rank=0, logical_count=counts, average_utilization_rate_over_window=None), tmp_path / "s.pt")
    code, out, err = run_cli(["place", str(tmp_path / "s.pt"), "--gpus", "2", "--redundant", "2", "--out",
                              str(tmp_path / "p"), "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["layers"] == [1, 2, 3] and rep["num_hidden_layers"] == 4 and rep["inputs"]["kind"] == "sglang stat dump"
    assert sglang_file_problems(tmp_path / "p" / "sglang.json", num_hidden_layers=4, num_experts=8, gpus=2,
                                moe_layers=[1, 2, 3]) == []
    from moekit.placement.eplb import rebalance_experts

    expected = rebalance_experts(counts.sum(0)[1:].numpy(), 10, 1, 1, 2)[0]  # what SGLang's init_by_eplb computes
    assert np.array_equal(load_file(tmp_path / "p" / "eplb.safetensors")["phy2log"], expected)
    code, _, err = run_cli(["place", str(tmp_path / "s.pt"), "--gpus", "2", "--method", "exflow", "--out",
                            str(tmp_path / "q")], capsys)
    assert code == 2 and "counts only" in err and not (tmp_path / "q").exists()


@pytest.mark.parametrize("args, message", [
    (["--gpus", "3"], "do not split evenly over 3 GPUs"),
    (["--gpus", "4", "--nodes", "3"], "not a multiple of --nodes 3"),
    (["--gpus", "4", "--method", "milp"], "unknown --method 'milp'"),
    (["--gpus", "4", "--checkpoint", "MODEL", "--redundant", "4"], "--checkpoint holds each expert once"),
    (["--gpus", "4", "--time-limit", "0"], "--time-limit must be > 0"),
])
def test_bad_input_one_line(qwen_trace, tmp_path, capsys, args, message):
    model, trace = qwen_trace
    args = [str(model) if a == "MODEL" else a for a in args]
    code, out, err = run_cli(["place", str(trace), "--out", str(tmp_path / "p"), *args], capsys)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.tmp-*"))


def test_out_must_be_empty_and_failures_leave_nothing(qwen_trace, tmp_path, monkeypatch):
    model, trace = qwen_trace
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        mp.place(trace, tmp_path / "full", mp.Cluster(2))
    import moekit.placement.files as files

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(files, "plan_dir_problems", boom)
    with pytest.raises(OSError):
        mp.place(trace, tmp_path / "p", mp.Cluster(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no plan, no temporary folder


def test_model_that_does_not_match_the_trace(qwen_trace, grouped_trace, tmp_path):
    with pytest.raises(UserError, match="give the model the trace was recorded from"):
        mp.place(qwen_trace[1], tmp_path / "p", mp.Cluster(2), model=grouped_trace[0])
