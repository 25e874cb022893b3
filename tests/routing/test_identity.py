"""Each policy's identity case gives bit-identical logits to the stock model on every tiny family (float32, CPU), and
dropped slots (sentinel ids) run on every family's experts loop."""

from __future__ import annotations

from functools import cache

import pytest
import torch

import moekit.models
import moekit.routing as R
from moekit.errors import UserError
from moekit.routing.apply import NO_SENTINEL
from tests.conftest import TINY, tiny_config, tiny_model
from tests.helpers import assert_close, token_ids


@cache
def _stock(family: str):
    """(tiny model, its view), built once for this module's tests: they only add hooks, and remove them."""
    model = tiny_model(family)
    return model, moekit.models.load(model)


def _logits(view, ids, routing=None):
    with R.apply(view if routing is not None else None, routing), torch.no_grad():
        return view.forward(ids).logits


def _identity_specs(view):
    l = next(m.index for m in reversed(view.layers) if not m.rule.hashed)
    return ["skip=0", f"steer=0@{l}:0,{l}:1", f"scale=1@{l}:1", f"topk={view.top_k}"]


def _refused(view, spec: str = "topk=1") -> bool:
    """True, after checking the refusal's one line, when no routing policy applies to the family."""
    if not view.adapter.fixed_routing:
        return False
    for routing in (R.parse(spec), R.parse("skip=0")):
        with pytest.raises(UserError, match=f"routing policies do not apply to {view.model_type}: ") as err:
            with R.apply(view, routing):
                pass
        assert "\n" not in str(err.value) and view.adapter.fixed_routing in str(err.value)
    return True


def test_identity_policies_are_bit_identical(family):
    model, view = _stock(family)
    if _refused(view):
        return
    ids = token_ids(model, 2, 8)
    stock = _logits(view, ids)
    routed_calls = sum(m.passes for m in view.layers if not m.rule.hashed)  # a loop layer's router runs per pass
    for spec in _identity_specs(view):
        routing = R.parse(spec)
        with R.apply(view, routing) as hooks, torch.no_grad():
            out = view.forward(ids).logits
        assert hooks.calls == routed_calls, f"{family} {spec}: the hooks did not reroute every learned-routed layer"
        assert torch.equal(out, stock), f"{family} {spec}: max diff {(out - stock).abs().max():.3g}"


def _all_experts_model(family):
    """The tiny model with K = every choice its router has (E; Zaya: E + its skip expert; all groups eligible)."""
    config = tiny_config(family)
    text = moekit.models.text_config(config)
    view = _stock(family)[1]
    setattr(text, view.adapter.top_k_key, R.policies.candidates(view.layers[0]))
    if getattr(text, "topk_group", None) is not None:
        text.topk_group = getattr(text, "n_group", None) or getattr(text, "num_expert_group")
    torch.manual_seed(0)
    model = moekit.models.model_class(config).from_config(config, dtype=torch.float32)
    model.set_experts_implementation("eager")
    return model.eval()


@pytest.mark.parametrize("family", sorted(set(TINY) - {"phimoe", "longcat_flash"}))
def test_top_p_one_renormalised_keeps_every_expert_bit_identically(family):
    """top-p with P = 1 (renorm) on a model with K = E is the stock routing. PhiMoE's sparsemixer is top-2 only;
    LongCat-Flash's zero experts are excluded (E + Z logits, its config ties K to the routed experts)."""
    try:
        model = _all_experts_model(family)
    except (ValueError, TypeError) as err:  # a config class that cannot take K = E
        pytest.skip(f"{family}: K = E not constructible ({err})")
    view = moekit.models.load(model)
    if _refused(view, "top-p=1,renorm"):
        return
    if view.top_k != R.policies.candidates(view.layers[0]):
        pytest.skip(f"{family}: the router does not take K = E")
    ids = token_ids(model, 2, 8)
    assert torch.equal(_logits(view, ids, R.parse("top-p=1,renorm")), _logits(view, ids))


def test_empty_steering_file_is_identity():
    """No spec is no routing; an empty steering file changes nothing."""
    model, view = _stock("mixtral")
    ids = token_ids(model)
    assert R.parse(None) is None
    routing = R.Routing(R.spec.policies_from_steering(R.spec.steering_document([], {}), "empty.json"))
    assert torch.equal(_logits(view, ids, routing), _logits(view, ids))


def _takes_sentinel(layer, hidden_size: int) -> bool | None:
    """Whether the experts module computes (x [t, H'], ids, weights) with a sentinel slot without failing (None: its
    experts are not such a module: JetMoE's block, Llama 4's dense experts, one module per expert)."""
    if layer.adapter.experts == "" or layer.adapter.per_expert or layer.adapter.router_output == "scores_logits":
        return None
    x = layer.expert_input(torch.randn(3, hidden_size))
    ids = torch.tensor([[0, R.sentinel(layer)]] * 3)
    try:
        with torch.no_grad():
            layer.experts(x, ids, torch.tensor([[1.0, 0.0]] * 3))
        return True
    except (RuntimeError, ValueError, IndexError):
        return False


def test_sentinel_slots_are_skipped_by_every_family(family):
    """Dropped slots run on every family's experts loop, the ones that cannot take the sentinel included (NO_SENTINEL:
    probed here): a batch whose sequences are routed by a stock routing and by a policy keeping fewer experts (so the
    narrower rows are padded with sentinel slots) equals each routing run alone, row for row."""
    model, view = _stock(family)
    layer = next(m for m in view.layers if not m.rule.hashed)
    if _refused(view):
        return
    probe = _takes_sentinel(layer, view.config.hidden_size)
    if probe is not None:
        assert probe == (family not in NO_SENTINEL), f"{family}: update NO_SENTINEL"
    # two routings of different widths: the narrower one's rows get sentinel slots in the mixed call
    narrow, wide = (R.parse("skip=2"), None) if layer.rule.top_k > 1 else (None, R.parse("topk=2"))
    ids = token_ids(model, 2, 8, seed=1)
    alone = [_logits(view, ids, r) for r in (narrow, wide)]
    dropped = []
    hooks = R.attach(view)
    seen = layer.router.register_forward_hook(  # after the policy hook: what the experts got
        lambda m, a, out: dropped.append(int((layer.parse_router_output(out)[2] >= R.sentinel(layer)).sum())))
    try:
        with hooks.use(R.batch_spans([narrow, wide], ids.shape[1])), torch.no_grad():
            mixed = view.forward(ids).logits
    finally:
        hooks.remove()
        seen.remove()
    assert sum(dropped) > 0, f"{family}: no sentinel slot reached the experts; the test proves nothing"
    for row, want in enumerate(alone):
        assert_close(mixed[row], want[row], f"{family} row {row}")
