"""Tiny traces recorded from tiny random models (qwen3_moe: 3 MoE layers of 16 experts, top-4; deepseek_v3: a dense
first layer, then 2 MoE layers of 8 experts in 2 groups, top-2)."""

from __future__ import annotations

import pytest
import torch

import moekit.trace
from moekit.trace import TraceOptions
from tests.trace.helpers import save_checkpoint, write_corpus


def _record(tmp_path_factory, model_type: str):
    root = tmp_path_factory.mktemp(model_type)
    model = save_checkpoint(root / "model", model_type)
    txt, jsonl = write_corpus(root / "corpus")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        moekit.trace.record(model, [str(txt), str(jsonl)], root / "trace", options=TraceOptions(seq_len=48))
    finally:
        torch.set_num_threads(before)
    return model, root / "trace"


@pytest.fixture(scope="session")
def qwen_trace(tmp_path_factory):
    """(model folder, trace folder) of a tiny qwen3_moe."""
    return _record(tmp_path_factory, "qwen3_moe")


@pytest.fixture(scope="session")
def grouped_trace(tmp_path_factory):
    """(model folder, trace folder) of a tiny deepseek_v3 (dense layer 0; n_group 2, topk_group 1)."""
    return _record(tmp_path_factory, "deepseek_v3")
