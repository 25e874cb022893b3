"""SGLang expert-distribution dumps (python/sglang/srt/eplb/expert_distribution.py) -> moekit traces.

The dumps are built here exactly as SGLang's _DetailAccumulator (mode per_token) and _StatAccumulator (mode stat) write
them with torch.save."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moekit.trace
from moekit.cli import main
from moekit.errors import UserError
from moekit.trace.sglang import import_sglang

L_ALL, E, K, PAD_K = 4, 8, 2, 8  # layer 0 dense; SGLang pads top-k ids to 8 columns with -1


def _per_token_dump(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    p2l = torch.arange(E + 2).remainder(E).repeat(L_ALL, 1)  # 10 physical slots: experts 0 and 1 replicated
    records, logical = [], []
    passes = [dict(lens=[5, 3], mode=1), dict(lens=None, n=2, mode=2), dict(lens=[4], mode=1)]  # extend, decode, extend
    for fp, spec in enumerate(passes):
        n = sum(spec["lens"]) if spec["lens"] else spec["n"]
        phys = torch.full((L_ALL, n, PAD_K), -1, dtype=torch.int32)
        for l in range(1, L_ALL):  # SGLang picks K distinct logical experts, then one physical replica of each
            logical_k = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])  # [n, K]
            replica = torch.randint(0, 2, (n, K), generator=g) * (logical_k < 2)  # experts 0, 1 sit in slots 8, 9 too
            phys[l, :, :K] = (logical_k + replica * E).int()
        logical.append(torch.where(phys >= 0, p2l.gather(1, phys.clamp(min=0).long().flatten(1)).view_as(phys), -1))
        records.append(dict(forward_pass_id=fp, rank=0, gatherer_key="primary", input_ids=list(range(100, 100 + n)),
                            positions=list(range(n)), extend_seq_lens=spec["lens"], forward_mode=spec["mode"],
                            topk_ids_of_layer=phys, misc_objects=[],
                            global_physical_count=torch.zeros(L_ALL, E + 2, dtype=torch.int32)))
    torch.save(dict(records=records[::-1], last_physical_to_logical_map=p2l), path)  # stored out of pass order
    return torch.cat(logical, dim=1)  # [L_ALL, T, 8] logical ids in pass order


def test_per_token_dump(tmp_path):
    expected = _per_token_dump(tmp_path / "expert_distribution_recorder_1.0_0.pt")
    manifest = import_sglang(tmp_path / "expert_distribution_recorder_1.0_0.pt", tmp_path / "t", chunk_tokens=6)
    t = moekit.trace.open(tmp_path / "t")
    assert manifest["completed"] and len(manifest["chunks"]) >= 2
    assert t.layers == [1, 2, 3] and t.top_k == K and t.num_experts == E and t.num_tokens == 14
    for l in t.layers:
        assert np.array_equal(t.ids(l), expected[l, :, :K].numpy())
        assert np.isnan(t.weights(l)).all(), "SGLang records ids only"
    assert t.seq_id.tolist() == [0] * 5 + [1] * 3 + [2, 3] + [4] * 4, "extend segments; each decode token alone"
    assert t.token_id.tolist()[:8] == list(range(100, 108)) and t.domain_names == ["sglang"]
    assert t.counts().sum() == 14 * K * 3


def test_stat_dump(tmp_path):
    counts = torch.randint(0, 50, (5, L_ALL, E), dtype=torch.int32)
    counts[:, 0] = 0  # a dense layer
    torch.save(dict(rank=0, logical_count=counts, average_utilization_rate_over_window=None), tmp_path / "s.pt")
    import_sglang(tmp_path / "s.pt", tmp_path / "t", top_k=K)
    t = moekit.trace.open(tmp_path / "t")
    assert t.kind == "counts" and t.layers == [1, 2, 3] and t.manifest["num_hidden_layers"] == L_ALL
    assert np.array_equal(t.counts(), counts.sum(0)[1:].numpy())
    with pytest.raises(UserError, match="aggregate"):
        t.ids(1)


def test_not_a_dump(tmp_path, capsys):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    for name, message in [("x.pt", "not an SGLang expert-distribution dump"), ("junk.pt", "cannot read")]:
        with pytest.raises(SystemExit) as exc:
            main(["trace-import-sglang", str(tmp_path / name), "--out", str(tmp_path / f"o_{name}")])
        assert exc.value.code == 2 and message in capsys.readouterr().err
