"""open_offloaded: the one entry point of run, serve and the Python API."""

from __future__ import annotations

import pytest
import torch

import moekit.models
import moekit.runtime as rt
from moekit.errors import UserError
from tests.conftest import tiny_model
from tests.trace.helpers import save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen3", "qwen3_moe")


def test_open_offloaded_generates_what_the_in_memory_model_does(ckpt, tmp_path):
    om = rt.open_offloaded(ckpt, rt.RuntimeOptions(budget="1MB", store=tmp_path / "store"))
    ids = om.tokenizer("abc", return_tensors="pt").input_ids
    with torch.no_grad():
        got = om.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=om.tokenizer.eos_token_id)
        want = tiny_model("qwen3_moe").generate(ids, max_new_tokens=6, do_sample=False,
                                                pad_token_id=om.tokenizer.eos_token_id)
    assert got.tolist() == want.tolist()
    assert om.totals()["misses"] > 0 and om.store_dir == tmp_path / "store"
    om.close()


def test_the_config_skeleton_is_built_once(ckpt, tmp_path, monkeypatch):
    calls = []
    real = moekit.models.load

    def counting(*args, **kwargs):
        calls.append(kwargs.get("meta", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(moekit.models, "load", counting)
    rt.open_offloaded(ckpt, rt.RuntimeOptions(budget="1MB", store=tmp_path / "store")).close()  # builds the store
    assert calls.count(True) == 1, calls
    calls.clear()
    rt.open_offloaded(ckpt, rt.RuntimeOptions(budget="1MB", store=tmp_path / "store")).close()  # reuses it
    assert calls.count(True) == 1, calls


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": "lots"}, "cannot read the size"),
    ({"policy": "mru"}, "unknown cache policy 'mru'; known: .*lru"),
    ({"policy": "belady"}, "offline oracle"),
    ({"io_threads": 0}, "--io-threads must be >= 1"),
    ({"lowbit": 5}, "--lowbit bits must be one of 2, 3, 4, 8"),
    ({"eam_trace": "/nonexistent/trace"}, "no trace at /nonexistent/trace"),
])
def test_bad_options_fail_before_anything_is_read(kwargs, message):
    with pytest.raises(UserError, match=message):
        rt.RuntimeOptions(**kwargs)
