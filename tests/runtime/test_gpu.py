"""GPU tier (experts cached in GPU memory) and Fiddler's CPU compute of misses. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import moekit.models
import moekit.runtime as rt
from tests.conftest import tiny_model
from tests.runtime.helpers import prompt_ids

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("fiddler", [False, True])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_gpu_tier_matches_in_memory_gpu_model(family, fiddler, tmp_path):
    ref = tiny_model(family).cuda()
    view = moekit.models.load(tiny_model(family))
    rt.build_store(view, tmp_path)
    om = rt.offload(view, tmp_path, rt.min_budget(view, rt.ExpertStore(tmp_path).expert_bytes), device="cuda",
                    fiddler=fiddler)
    x = prompt_ids(128, 9).cuda()
    with torch.no_grad():
        torch.testing.assert_close(view.model(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(view.model.generate(x, max_new_tokens=6, do_sample=False),
                           ref.generate(x, max_new_tokens=6, do_sample=False))
    om.close()
