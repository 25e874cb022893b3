"""The bundled demo model (demo/model) and its held-out corpus: plain transformers loading, fine-grained MoE config."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "demo" / "model"
DOMAINS = ["prose", "code", "math", "german", "french", "russian", "japanese", "dialogue"]



def test_demo_model_loads_with_auto_classes_and_generates():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    cfg = model.config
    assert cfg.model_type == "qwen3_moe"
    assert cfg.num_experts >= 32 and cfg.num_experts_per_tok >= 4
    assert cfg.num_hidden_layers >= 4 and cfg.decoder_sparse_step == 1 and not cfg.mlp_only_layers
    assert tok.eos_token is not None and tok.eos_token_id == cfg.eos_token_id
    ids = tok("def main():\n    ", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "def main():\n    "  # byte-level BPE round-trips
    with torch.no_grad():
        out = model(input_ids=ids)
    assert out.logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(out.logits.float()).all()


def test_demo_model_fits_the_size_budget():
    total = sum(f.stat().st_size for f in MODEL.iterdir() if f.is_file())
    assert total <= 40 * 2**20, f"demo/model is {total / 2**20:.1f} MiB"


@pytest.mark.parametrize("domain", DOMAINS)
def test_heldout_split_exists_per_domain(domain):
    path = ROOT / "demo" / "corpus" / "heldout" / f"{domain}.txt"
    assert path.exists(), path
    text = path.read_text(encoding="utf-8")
    assert len(text) > 50_000
    assert "<|endoftext|>" in text  # whole documents, separated as in training
