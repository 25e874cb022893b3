"""Multimodal wrappers (image-text-to-text and omni models whose language model is an MoE family): the view finds the
language model's MoE layers through the wrapper and edits its text config; routing and the reference forward match HF;
a pruned checkpoint keeps the wrapper's class and config and its towers bit for bit, and reloads with plain
from_pretrained of that class (and of AutoModelForCausalLM where transformers maps the wrapper to a causal LM);
offloaded runs reproduce the in-memory logits bit for bit; info, trace, merge, quantize and generation go through it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMultimodalLM

import moekit.models
import moekit.runtime as rt
from moekit.compress.checkpoint import save_checkpoint
from moekit.compress.edit import keep_experts
from moekit.errors import UserError
from moekit.models.architecture import get_path, loads_with_causal_lm, wrapper_of
from moekit.ops.reference import reference_moe_forward
from moekit.runtime.checkpoint import build_store_from_checkpoint, load_from_store
from tests.conftest import TINY_WRAPPERS, tiny_model
from tests.helpers import logits, reload, run_cli, token_ids
from tests.trace.helpers import save_checkpoint as save_checkpoint_with_tokenizer
from tests.trace.helpers import write_corpus


def _towers(model, view) -> dict[str, torch.Tensor]:
    """Every parameter outside the language model's decoder layers' MoE blocks (towers, embeddings, projectors)."""
    moe = {id(p) for m in view.layers for p in m.block.parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in moe}


def _assert_same_logits(got, want, what):
    """Equal up to float32 rounding: tensors loaded from safetensors need not share the in-memory ones' alignment, and
    CPU GEMV kernels round the last bit by alignment (measured: Inkling2's 1-token expert, 3.5e-10)."""
    diff = (got - want).abs().max()
    assert diff <= 1e-6 * want.abs().max(), f"{what}: logits differ by {diff:.3g}"


def test_every_registered_wrapper_has_a_tiny_model():
    assert set(TINY_WRAPPERS) == set(moekit.models.architecture.wrappers())


def test_wrapper_view_routes_and_prunes_through_the_wrapper(wrapper, tmp_path):
    model = tiny_model(wrapper)
    view = moekit.models.load(model)
    spec = wrapper_of(model.config)
    assert view.model_config.model_type == wrapper and view.config is get_path(model.config, spec.text_config)
    assert all(m.block in get_path(model, spec.layers)[m.index].modules() for m in view.layers)
    ids = token_ids(model, 2, 16)
    seen = {}
    handles = [m.block.register_forward_hook(lambda mod, a, out, i=m.index: seen.__setitem__(i, (a[0], out)))
               for m in view.layers]
    logits(model, ids)
    for h in handles:
        h.remove()
    for layer in view.layers:  # the block's input routed by the rule: equal to what the router chose, bit for bit
        x, out = seen[layer.index]
        out = out[0] if isinstance(out, tuple) else out
        with torch.no_grad():
            ours = reference_moe_forward(layer, x).reshape(out.shape)  # Llama 4's block returns [T, H]
            assert (ours - out).abs().max() <= 1e-6 * out.abs().max(), f"{wrapper} layer {layer.index}"
    if view.adapter.fixed_count:
        with pytest.raises(UserError, match="cannot"):
            keep_experts(view, {m.index: [0, 1] for m in view.layers})
        return
    towers = _towers(model, view)
    n = max(view.top_k, view.layers[0].rule.n_group, view.num_experts // 2)
    n -= n % view.layers[0].rule.n_group
    keep_experts(view, {m.index: list(range(view.num_experts - n, view.num_experts)) for m in view.layers})
    expected = logits(model, ids)
    out = save_checkpoint(model, tmp_path / "pruned", report={"method": "test"})
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == wrapper
    text = saved
    for part in spec.text_config.split("."):
        text = text[part]
    assert all(text[k] == n for k in view.adapter.expert_count_keys), "the expert count lands in the text config"
    reloaded = reload(out)
    assert type(reloaded) is type(model)
    _assert_same_logits(logits(reloaded, ids), expected, wrapper)
    after = _towers(reloaded, moekit.models.load(reloaded))
    assert after.keys() == towers.keys() and all(torch.equal(after[k], v) for k, v in towers.items())
    if loads_with_causal_lm(reloaded.config):  # transformers also maps this wrapper config to a causal LM
        causal = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager")
        _assert_same_logits(logits(causal.eval(), ids), expected, f"{wrapper} as a causal LM")


def test_offloaded_wrapper_reproduces_in_memory_logits(wrapper, tmp_path):
    ref = tiny_model(wrapper)
    view = moekit.models.load(ref)
    ref.save_pretrained(tmp_path / "ckpt")
    if not all(hasattr(m.experts, "is_transposed") and not m.rule.weight_on_input for m in view.layers):
        with pytest.raises(UserError, match="not supported for this family"):
            rt.offload(load_from_store(tmp_path / "ckpt", build_store_from_checkpoint(tmp_path / "ckpt",
                                                                                      tmp_path / "store")),
                       tmp_path / "store", "1GB")
        return
    build_store_from_checkpoint(tmp_path / "ckpt", tmp_path / "store")
    for f in (tmp_path / "ckpt").glob("*.safetensors"):
        f.unlink()  # the run reads nothing but the config from the checkpoint
    lazy = load_from_store(tmp_path / "ckpt", tmp_path / "store")
    om = rt.offload(lazy, tmp_path / "store", rt.min_budget(lazy, rt.ExpertStore(tmp_path / "store").expert_bytes),
                    prefetch=True)
    ids = token_ids(ref, 1, 11)
    with torch.no_grad():
        got = lazy.forward(ids).logits
    assert torch.equal(got, view.forward(ids).logits)
    assert om.totals()["misses"] > 0 and type(lazy.model) is type(ref)
    om.close()


@pytest.fixture(scope="module")
def llama4_dir(tmp_path_factory):
    return save_checkpoint_with_tokenizer(tmp_path_factory.mktemp("wrappers") / "llama4", "llama4")


def test_info_on_a_llama4_checkpoint_describes_its_language_model(llama4_dir, capsys):
    code, out, err = run_cli(["info", str(llama4_dir), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["model_type"] == "llama4" and info["moe_family"] == "llama4_text"
    assert info["architecture"] == "Llama4ForConditionalGeneration" and info["loads_with"] == "AutoModelForMultimodalLM"
    assert info["moe_layers"] == [1, 2] and info["experts_per_layer"] == 8


def test_trace_and_analyze_a_wrapper_checkpoint(llama4_dir, tmp_path, capsys):
    txt, _ = write_corpus(tmp_path / "data")
    code, _, err = run_cli(["trace", str(llama4_dir), "--data", str(txt), "--out", str(tmp_path / "t"),
                            "--seq-len", "32"], capsys)
    assert code == 0, err
    t = moekit.trace.open(tmp_path / "t")
    assert t.layers == [1, 2] and t.num_tokens > 0 and t.manifest["model_type"] == "llama4_text"
    code, out, err = run_cli(["analyze", str(tmp_path / "t"), "--out", str(tmp_path / "r.html"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["n_layers"] == 2 and (tmp_path / "r.html").is_file()


def test_merge_and_quantize_through_a_wrapper_keep_its_class_and_towers(tmp_path):
    from moekit.compress.calib import collect
    from moekit.compress.merge import merge
    from moekit.compress.quantize import quantize

    for i, step in enumerate(["merge", "quantize"]):
        model = tiny_model("qwen3_vl_moe", seed=i)
        view = moekit.models.load(model)
        towers = _towers(model, view)
        cal = collect(view, [token_ids(model, 2, 16, seed=s) for s in range(2)])
        if step == "merge":
            merge(view, cal, 4, method="msmoe")
        else:
            quantize(view, 4, method="pmq", group_size=16, cal=cal)
        ids = token_ids(model)
        out = save_checkpoint(model, tmp_path / step)
        reloaded = reload(out)
        assert isinstance(reloaded, type(model)) and torch.equal(logits(reloaded, ids), logits(model, ids))
        assert reloaded.config.text_config.num_local_experts == (4 if step == "merge" else 8)
        after = _towers(reloaded, moekit.models.load(reloaded))
        assert all(torch.equal(after[k], v) for k, v in towers.items()), f"{step} changed a tower"
        assert isinstance(AutoModelForMultimodalLM.from_pretrained(out), type(model))


def test_open_offloaded_generates_through_a_wrapper(tmp_path):
    """run and serve share open_offloaded: the wrapper's generate, the language model's experts offloaded."""
    path = save_checkpoint_with_tokenizer(tmp_path / "qwen3_5_moe", "qwen3_5_moe")
    model = tiny_model("qwen3_5_moe")
    om = rt.open_offloaded(path, rt.RuntimeOptions(budget="1MB", store=tmp_path / "store"))
    ids = om.tokenizer("abc", return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=om.tokenizer.eos_token_id)
    with torch.no_grad():
        assert om.model.generate(ids, **kwargs).tolist() == model.generate(ids, **kwargs).tolist()
    assert type(om.model) is type(model) and om.totals()["misses"] > 0
    om.close()
