"""Structural expert edits: keeping every expert is the identity; a pruned model saves and reloads with plain
from_pretrained of its class (AutoModelForCausalLM for causal LMs; a wrapper's own class, its towers untouched) with the
same logits as the in-memory result."""

from __future__ import annotations

import pytest
import torch

import moekit.models
from moekit.compress.checkpoint import save_checkpoint
from moekit.compress.edit import keep_experts
from moekit.errors import UserError
from tests.conftest import tiny_model
from tests.helpers import logits as _logits
from tests.helpers import reload
from tests.helpers import token_ids as _ids


def _resizable(view):
    if view.adapter.fixed_count:
        with pytest.raises(UserError, match="cannot"):
            keep_experts(view, {m.index: list(range(m.num_experts)) for m in view.layers})
        pytest.skip(f"{view.model_type}: {view.adapter.fixed_count} (refused in one line)")


def test_keeping_every_expert_reproduces_logits_exactly(family):
    model = tiny_model(family)
    ids = _ids(model)
    before = _logits(model, ids)
    view = moekit.models.load(model)
    _resizable(view)
    keep_experts(view, {m.index: list(range(m.num_experts)) for m in view.layers})
    assert torch.equal(_logits(model, ids), before)


def test_pruned_checkpoint_reloads_with_same_logits(family, tmp_path):
    model = tiny_model(family)
    view = moekit.models.load(model)
    _resizable(view)
    n = max(view.top_k, view.layers[0].rule.n_group, view.num_experts // 2)
    n -= n % view.layers[0].rule.n_group
    keep = {m.index: sorted(torch.randperm(m.num_experts, generator=torch.Generator().manual_seed(m.index))[:n].tolist())
            for m in view.layers}
    keep_experts(view, keep)
    ids = _ids(model)
    expected = _logits(model, ids)
    out = save_checkpoint(model, tmp_path / "pruned", report={"method": "test"})
    reloaded = reload(out)
    assert type(reloaded) is type(model) and moekit.models.load(reloaded).num_experts == n
    assert torch.equal(_logits(reloaded, ids), expected)
    assert (out / "compression.json").is_file()
    assert not list(tmp_path.glob(".pruned.tmp-*"))


def test_kept_expert_keeps_its_weights_and_router_row():
    view = moekit.models.load(tiny_model("deepseek_v3"))
    layer = view.layers[0]
    w5, row5 = layer.get_expert(5), layer.router.weight[5].clone()
    bias5 = layer.correction_bias[5].clone()
    keep_experts(view, {m.index: [5, 0, 2, 7] for m in view.layers})
    assert all(torch.equal(layer.get_expert(0)[k], v) for k, v in w5.items())
    assert torch.equal(layer.router.weight[0], row5) and layer.correction_bias[0] == bias5
    assert view.config.n_routed_experts == 4 and layer.router.num_experts == 4


@pytest.mark.parametrize("keep, message", [([0], "keep at least 2"), ([0, 1, 2], "multiple of 2")])
def test_invalid_plans_are_rejected(keep, message):
    view = moekit.models.load(tiny_model("deepseek_v3"))
    with pytest.raises(UserError, match=message):
        keep_experts(view, {m.index: keep for m in view.layers})


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists"):
        save_checkpoint(tiny_model("mixtral"), tmp_path / "out")
