import torch

import moekit.models
from moekit.compress.calib import collect
from moekit.ops.reference import reference_moe_forward
from tests.conftest import tiny_model
from tests.helpers import assert_close


def test_collect_keeps_block_inputs_and_outputs():
    view = moekit.models.load(tiny_model("qwen2_moe"))
    batches = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cal = collect(view, batches, max_tokens=40)
    assert cal.tokens == 40 and set(cal.x) == {m.index for m in view.layers}
    for layer in view.layers:
        assert cal.x[layer.index].shape == (40, 32) == cal.z[layer.index].shape
        with torch.no_grad():
            ref = reference_moe_forward(layer, cal.x[layer.index])
        assert_close(ref, cal.z[layer.index], f"layer {layer.index}: reference block on X vs recorded Z")  # |Z| ~ 1e-3
