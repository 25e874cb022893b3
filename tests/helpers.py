"""Helpers shared by the test modules."""

from __future__ import annotations

import pytest
import torch

import moekit.models
from moekit.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `moekit ARGS` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def token_ids(model, n: int = 2, s: int = 16, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids [n, s] within the model's vocabulary (a wrapper's: its language model's)."""
    vocab = moekit.models.text_config(model.config).vocab_size
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits on text ids [B, S], through the view (wrappers whose own forward cannot take
    text alone, encoder-decoder models teacher-forced on the ids)."""
    with torch.no_grad():
        return moekit.models.load(model).forward(ids).logits


def reload(path, **kwargs):
    """A saved checkpoint loaded back with plain from_pretrained of its class (moekit.models.model_class: the
    wrapper's, AutoModelForCausalLM for causal LMs), float32, eager experts."""
    config = moekit.models.load_config(path)
    model = moekit.models.model_class(config).from_pretrained(path, dtype=torch.float32, experts_implementation="eager",
                                                              **kwargs)
    return model.eval()


def module_calls(view, module_of, ids: torch.Tensor) -> dict[int, list[tuple]]:
    """One forward of the view's model on ids: (args, kwargs, output) of module_of(layer) per MoE layer, for every
    call (a loop layer's module is called once per pass)."""
    seen, handles = {}, []
    for layer in view.layers:
        def hook(mod, args, kwargs, out, i=layer.index):
            seen.setdefault(i, []).append((args, kwargs, out))

        handles.append(module_of(layer).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            view.forward(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


RTOL = 1e-6  # of the largest |expected|: float32 reference paths land within 2e-7 of it (tests/models/test_families.py)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """max |actual - expected| <= rtol x max |expected|: a bound relative to the output's own scale (tiny random models'
    outputs range from 1e-4 to 2, so no absolute tolerance fits them all), reporting max and mean difference."""
    diff, scale = (actual - expected).abs(), expected.abs().max()
    assert scale > 0, f"{what}: the expected output is all zero, nothing to compare"
    assert diff.max() <= rtol * scale, (f"{what}: max diff {diff.max():.3g} = {diff.max() / scale:.3g} x max "
                                        f"|expected| {scale:.3g}, mean diff {diff.mean():.3g} (rtol {rtol})")
