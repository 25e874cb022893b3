"""`moekit run` and `moekit simulate`: output, JSON, one-line errors (exit 2), the minimum-budget message."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import moekit.models
import moekit.runtime as rt
from moekit.errors import UserError
from tests.conftest import tiny_model
from tests.helpers import run_cli
from tests.trace.helpers import save_checkpoint, write_corpus


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen3", "qwen3_moe")


@pytest.fixture(scope="module")
def trace_dir(ckpt, tmp_path_factory):
    import moekit.trace

    txt, _ = write_corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("trace") / "t"
    moekit.trace.record(str(ckpt), [str(txt)], out)
    return out


def test_budget_too_small_names_the_minimum(tmp_path):
    view = moekit.models.load(tiny_model("qwen3_moe"))
    rt.build_store(view, tmp_path)
    eb = rt.ExpertStore(tmp_path).expert_bytes
    need = rt.min_budget(view, eb)
    assert need == 3 * 4 * eb  # 3 MoE layers x top-4
    with pytest.raises(UserError, match=f"minimum budget .*{need} bytes"):
        rt.offload(view, tmp_path, need - 1)
    rt.offload(view, tmp_path, need).close()  # exactly the minimum works


def test_parse_bytes():
    assert rt.parse_bytes("512MB") == 512 * 10**6 and rt.parse_bytes("1.5GiB") == int(1.5 * 2**30)
    with pytest.raises(UserError):
        rt.parse_bytes("lots")


def test_run_json_and_stats(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    code, out, _ = run_cli(["run", str(ckpt), "--budget", "1MB", "--prompt", "abc", "--max-new-tokens", "5",
                            "--policy", "lfru", "--stats", "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    assert res["new_tokens"] == 5 and res["policy"] == "lfru" and len(res["layers"]) == 3
    assert res["hits"] + res["misses"] > 0
    ref = tiny_model("qwen3_moe")  # same weights as the saved checkpoint: the same greedy text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("abc", return_tensors="pt").input_ids
    with torch.no_grad():
        expect = ref.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert res["text"] == tok.decode(expect[0], skip_special_tokens=True)


def test_run_streams_text_and_prints_table(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    code, out, _ = run_cli(["run", str(ckpt), "--prompt", "hello", "--max-new-tokens", "3", "--stats",
                            "--no-prefetch"], capsys)
    assert code == 0
    assert "h e l l o" in out and "policy lru" in out and "all" in out
    assert "pre P" not in out and "low-bit" not in out  # columns shown only when there is something to show
    code, out, _ = run_cli(["run", str(ckpt), "--prompt", "hello", "--max-new-tokens", "3", "--stats", "--prefetch",
                            "--lowbit", "8", "--lowbit-threshold", "1"], capsys)
    assert code == 0 and "pre P" in out and "low-bit" in out


def test_run_budget_too_small_is_one_line_exit_2(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    code, _, err = run_cli(["run", str(ckpt), "--budget", "1KB", "--prompt", "a"], capsys)
    assert code == 2 and "minimum budget" in err and "Traceback" not in err


def test_simulate_json_belady_is_the_ceiling(trace_dir, ckpt, capsys):
    code, out, _ = run_cli(["simulate", str(trace_dir), "--policy", "lru,lfu,lfru,score,belady", "--capacity",
                            "1x,2x", "--hardware", "nvme-cpu", "--model", str(ckpt), "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    rows = res["rows"]
    assert len(rows) == 10 and res["hardware"]["slow_gbs"] == 7.45
    for cap in ("1x", "2x"):
        best = next(r for r in rows if r["policy"] == "belady" and r["capacity"] == cap)
        assert all(r["hit_rate"] <= best["hit_rate"] for r in rows if r["capacity"] == cap)
    view = moekit.models.load(ckpt, meta=True)
    r = rows[0]
    assert r["bytes_per_token"] == pytest.approx(r["misses"] * view.bytes_per_expert() / res["tokens"])
    assert r["load_bound_tok_s"] == pytest.approx(7.45e9 / r["bytes_per_token"])


def test_simulate_table_and_yaml_profile(trace_dir, ckpt, tmp_path, capsys):
    prof = tmp_path / "laptop.yaml"
    prof.write_text("slow_tier: USB SSD\nslow_gbs: 1.0\nfast_tier: LPDDR5\nfast_gbs: 100\ncompute_tflops: 2\n")
    code, out, _ = run_cli(["simulate", str(trace_dir), "--policy", "lru,belady", "--capacity", "1x",
                            "--hardware", str(prof), "--model", str(ckpt)], capsys)
    assert code == 0 and "laptop" in out and "belady" in out


def test_simulate_bad_inputs_are_one_line_errors(trace_dir, ckpt, capsys):
    for args in (["--policy", "fifo"], ["--capacity", "big"], ["--hardware", "tpu9"]):
        code, _, err = run_cli(["simulate", str(trace_dir), "--model", str(ckpt), *args], capsys)
        assert code == 2 and "Traceback" not in err, args


def test_simulator_counts_cold_misses():
    from moekit.runtime.simulate import simulate

    ids = [np.array([[0, 1], [0, 1], [0, 1]])]
    (r,) = simulate(ids, num_experts=4, top_k=2, expert_bytes=10, policies_=("lru",), capacities=(1,))
    assert (r.hits, r.misses) == (4, 2) and r.bytes_per_token == pytest.approx(20 / 3)


def test_run_lowbit_builds_copies_once_and_reads_them(ckpt, tmp_path, capsys, monkeypatch):
    import moekit.runtime.lowbit as lowbit

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    builds = []
    build = lowbit.build_lowbit
    monkeypatch.setattr(lowbit, "build_lowbit", lambda *a, **k: builds.append(a) or build(*a, **k))
    args = ["run", str(ckpt), "--budget", "1MB", "--prompt", "abc", "--max-new-tokens", "4", "--json"]
    code, out, err = run_cli([*args, "--lowbit", "8", "--lowbit-threshold", "1.0"], capsys)  # every miss low-bit
    assert code == 0, err
    res = json.loads(out)
    assert res["lowbit_reads"] == res["misses"] > 0
    (store,) = (tmp_path / "stores").iterdir()
    files = {f: f.stat().st_mtime_ns for f in (store / "lowbit8").iterdir()}
    assert (store / "lowbit8" / "manifest.json") in files and len(builds) == 1
    code, out, _ = run_cli([*args, "--lowbit", "8", "--lowbit-threshold", "1.0"], capsys)  # again: reuses the copies
    assert code == 0 and json.loads(out)["lowbit_reads"] == res["lowbit_reads"]
    assert len(builds) == 1 and {f: f.stat().st_mtime_ns for f in (store / "lowbit8").iterdir()} == files
    code, out, _ = run_cli(args, capsys)  # off by default
    assert code == 0 and json.loads(out)["lowbit_reads"] == 0


def test_run_lowbit_bad_width_is_one_line_exit_2(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    code, _, err = run_cli(["run", str(ckpt), "--prompt", "a", "--lowbit", "5"], capsys)
    assert code == 2 and "bits" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_run_eam_trace_prefetches_and_keeps_the_text(ckpt, trace_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    args = ["run", str(ckpt), "--budget", "1MB", "--prompt", "the cat", "--max-new-tokens", "5", "--json"]
    code, out, _ = run_cli([*args, "--eam-trace", str(trace_dir)], capsys)
    assert code == 0
    eam = json.loads(out)
    code, out, _ = run_cli([*args, "--no-prefetch"], capsys)
    plain = json.loads(out)
    assert eam["prefetch_reads"] > 0 and plain["prefetch_reads"] == 0
    assert eam["text"] == plain["text"]  # prefetching never changes the output
