"""Shared helpers for runtime tests: an offloaded tiny model next to its in-memory twin, seeded prompts."""

from __future__ import annotations

import torch

import moekit.models
import moekit.runtime as rt
from tests.conftest import tiny_model


def offloaded(family: str, store_dir, *, budget=None, policy="lru", prefetch=True, record=False, seed=0, **options):
    """(in-memory model, offloaded twin, OffloadedModel). budget None = the minimum."""
    ref, model = tiny_model(family, seed), tiny_model(family, seed)
    view = moekit.models.load(model)
    rt.build_store(view, store_dir)
    if budget is None:
        budget = rt.min_budget(view, rt.ExpertStore(store_dir).expert_bytes)
    return ref, model, rt.offload(view, store_dir, budget, policy=policy, prefetch=prefetch, record=record, **options)


def prompt_ids(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (1, n), generator=g)


def random_predictor(view, seed: int = 0, width: int = 8):
    """A routing predictor for `view`'s model with random weights, small enough that its forecasts vary from step to
    step instead of saturating."""
    import numpy as np

    from moekit.runtime import predictor as pr

    spec = pr.PredictorSpec(view.model_type, pr.model_hash(view.config), tuple(m.index for m in view.layers),
                            view.num_experts, view.top_k, view.config.hidden_size, width=width)
    rng = np.random.default_rng(seed)
    return pr.RoutingPredictor(spec, {k: rng.normal(scale=0.2, size=shape) for k, shape in pr.shapes(spec).items()})
