"""Calibration a routing needs before it runs: NAEE's per-layer skip thresholds (skip=auto).

NAEE (arXiv 2402.14800; Lucky-Lance/Expert_Sparsity `method/dynamic_skipping.py`) runs the stock model over
unlabeled text and sets beta_l = median over tokens of w_(2) / w_(1), the ratio of the two largest routing weights of
layer l (the mean is only logged there). The released code uses 128 sequences of 2048 C4 tokens; moekit defaults to
the demo corpus's held-out text (every domain, 4,096 tokens each) or `--calib` data.
"""

from __future__ import annotations


import numpy as np
import torch

from moekit.routing.policies import Routing, Skip
from moekit.trace.capture import RouterCapture

DEFAULT_CALIB = ["prose,code,math,german,french,russian,japanese,dialogue"]
CALIB_TOKENS = 4096  # per source
CALIB_SEQ = 256


def skip_betas(view, windows: list[np.ndarray]) -> dict[int, float]:
    """{decoder layer: median of w_(2) / w_(1)} over every token of `windows` (token-id arrays), stock routing."""
    ratios: dict[int, list[np.ndarray]] = {m.index: [] for m in view.layers}
    with RouterCapture(view) as cap, torch.inference_mode():
        layer_of = {i: m.index for i, m, *_ in cap.runs}  # a loop layer's passes pool into its decoder layer
        for w in windows:  # one window a call: no padding to mask out
            ids = torch.from_numpy(np.asarray(w, np.int64))[None]  # [1, S]
            view.forward(ids, use_cache=False)
            for index, (_, weights, _) in cap.take(torch.ones(ids.numel(), dtype=torch.bool)).items():
                ratio = weights[:, 1] / np.maximum(weights[:, 0], np.finfo(np.float32).tiny)
                ratios[layer_of[index]].append(ratio)
    return {index: float(np.median(np.concatenate(r))) for index, r in ratios.items()}


def prepare(routing: Routing | None, view, tokenizer=None, calib: list[str] | None = None,
            tokens: int = CALIB_TOKENS, per_prompt: bool = True) -> Routing | None:
    """Bind `routing` to the model and run the calibration its policies need (skip=auto); returns it.
    per_prompt=False: the caller routes whole batches, so a policy that adapts to each prompt (C3PO) is refused."""
    if routing is None:
        return None
    if not per_prompt:
        batch_routing(routing)
    skip = routing.find(Skip)
    if skip is not None and skip.beta is None and not skip.betas:
        if view.top_k < 2:
            from moekit.errors import UserError

            raise UserError("skip drops experts after the first: the model routes each token to one expert")
        skip.betas = skip_betas(view, calib_windows(tokenizer, calib or DEFAULT_CALIB, tokens))
    return routing.bind(view)


def batch_routing(routing: Routing | None) -> Routing | None:
    """`routing`, checked for use on whole batches (eval, trace): a policy that adapts to each prompt (C3PO) is
    refused in one line, before any weight is read."""
    if routing is not None and routing.needs_prompt():
        from moekit.errors import UserError

        raise UserError(f"{routing.spec()} adapts each prompt's last position: use it with `moekit run` or the "
                        f"Python API (benchmarks/routing.py measures it), not on whole evaluation or trace batches")
    return routing


def calib_windows(tokenizer, data: list[str], tokens: int) -> list[np.ndarray]:
    from moekit.trace.data import encoder, resolve_data, sequences

    if tokenizer is None:
        raise ValueError("calibration needs the model's tokenizer")
    encode = encoder(tokenizer)
    return [s.token_ids for source in resolve_data(data) for s in sequences([source], encode, CALIB_SEQ, tokens)
            if len(s.token_ids) >= 2]
