"""The OS page cache as a free tier: a buffered read of an expert whose pages are resident is served by the page cache
(RWF_NOWAIT succeeds: no disk read) and counted; drop_cache (the cold benchmarks) still reads past it."""

from __future__ import annotations

import torch
from safetensors import safe_open

import moekit.models
import moekit.runtime as rt
from tests.conftest import tiny_model


def test_resident_pages_cost_no_disk_read_and_are_counted(tmp_path):
    view = moekit.models.load(tiny_model("qwen3_moe"))
    rt.build_store(view, tmp_path)
    store = rt.ExpertStore(tmp_path)
    assert store.nowait
    store.drop_page_cache()
    first = store.read(0, 3)
    after_first = store.page_cache_bytes
    assert after_first <= store.expert_bytes  # all of it only where the file system keeps pages anyway (tmpfs)
    again = store.read(0, 3)
    assert store.page_cache_bytes - after_first == store.expert_bytes  # now resident: the page cache served it all
    with safe_open(tmp_path / "layer_000.safetensors", "pt") as f:
        for name in ("gate_up", "down"):
            assert torch.equal(first[name], f.get_tensor(f"00003.{name}")) and torch.equal(again[name], first[name])
    store.close()
    cold = rt.ExpertStore(tmp_path, drop_cache=True)
    cold.read(0, 3)
    if cold.direct:  # O_DIRECT never touches the page cache
        assert not cold.nowait and cold.page_cache_bytes == 0
    cold.close()


def test_runtime_counts_page_cache_bytes(tmp_path):
    view = moekit.models.load(tiny_model("qwen3_moe"))
    rt.build_store(view, tmp_path)
    for f in tmp_path.glob("layer_*.safetensors"):
        f.read_bytes()  # the OS page cache holds the store (RAM beyond the budget)
    om = rt.offload(view, tmp_path, "1GB")
    with torch.no_grad():
        view.model(torch.arange(8)[None])
    t = om.totals()
    assert t["bytes_read"] > 0 and 0 <= t["page_cache_bytes"] <= t["bytes_read"]
    assert t["page_cache_bytes"] == t["bytes_read"]  # every miss came from the page cache
    om.close()
