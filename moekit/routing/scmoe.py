"""Self-contrast decoding (SCMoE: Shi et al., "Unchosen Experts Can Contribute Too", arXiv 2405.14507; released code
DavidFanzz/SCMoE `decodingmethod/moe_utils.py` `scmoe`).

Each step runs the model twice, with separate KV caches: a strong routing (the model's own top-k, or any --routing)
and a weak one (one expert per token, the r-th ranked: policy rank=r). Next-token scores:
    score(v) = (1 + beta) * z_s(v) - beta * z_w(v),   set to -inf where z_s(v) < max z_s + log(alpha)
(the plausibility mask: keep tokens with p_s(v) >= alpha * max p_s), then greedy argmax. z are log-probabilities
(log_softmax; raw logits differ by a row constant: the same argmax). moekit runs both passes as one batch of two rows
per request, the weak rows routed by rank=r through the per-row routing of moekit/routing/apply.py (one forward per
step, two caches: one per batch row). Defaults: alpha 0.1, beta 0.5 (the code's), weak rank 2 (the README's
`--student_routed_tok 2`: the third-ranked expert, 0-based). Deviation: EOS is not forced to -inf (the released
code does so unless --early_stop); generation stops at EOS or max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.errors import UserError
from moekit.routing.apply import batch_spans
from moekit.routing.policies import Rank, Routing


@dataclass(frozen=True)
class Contrast:
    alpha: float = 0.1
    beta: float = 0.5
    rank: int = 2

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise UserError(f"scmoe alpha={self.alpha}: must be in (0, 1]")
        if self.beta < 0:
            raise UserError(f"scmoe beta={self.beta}: must be >= 0")
        if self.rank < 0:
            raise UserError(f"scmoe rank={self.rank}: the weak expert's rank is 0-based, >= 0")

    def weak(self) -> Routing:
        return Routing([Rank(self.rank)])


def parse_contrast(text: str | None) -> Contrast | None:
    """`--scmoe "alpha=0.1,beta=0.5,rank=2"` ("default" or "" for the defaults) -> Contrast (None: not given)."""
    if text is None:
        return None
    values = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item == "default":
            continue
        key, eq, val = item.partition("=")
        if key not in ("alpha", "beta", "rank") or not eq:
            raise UserError(f"--scmoe {text!r}: {item!r} is not alpha=A, beta=B or rank=R")
        try:
            values[key] = int(val) if key == "rank" else float(val)
        except ValueError:
            raise UserError(f"--scmoe {text!r}: {key} must be a number, got {val!r}") from None
    return Contrast(**values)


def contrast_scores(strong: torch.Tensor, weak: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """SCMoE's next-token scores [..., V] from the strong and weak logits [..., V]."""
    zs, zw = torch.log_softmax(strong.float(), dim=-1), torch.log_softmax(weak.float(), dim=-1)
    score = (1 + beta) * zs - beta * zw
    cutoff = zs.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(alpha))
    return score.masked_fill(zs < cutoff, float("-inf"))


def paired_logits(model, hooks, ids: torch.Tensor, strong: Routing | None, weak: Routing, **kwargs):
    """One forward of [2B, S]: rows 0..B-1 strong, B..2B-1 weak (same tokens) -> (strong, weak) logits [B, S, V]."""
    B, S = ids.shape
    spans = batch_spans([strong] * B + [weak] * B, S)
    with hooks.use(spans):
        out = model(input_ids=torch.cat([ids, ids]), **kwargs)
    return out.logits[:B], out.logits[B:], out


@torch.inference_mode()
def generate(model, hooks, input_ids: torch.Tensor, contrast: Contrast, strong: Routing | None = None,
             max_new_tokens: int = 64, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy SCMoE decoding of one prompt [1, S] -> [1, S + n]. `hooks`: moekit.routing.attach(view)."""
    from transformers import DynamicCache

    if input_ids.shape[0] != 1:
        raise ValueError("SCMoE generation takes one prompt at a time")
    cache = DynamicCache(config=model.config)
    weak, out_ids, step = contrast.weak(), input_ids, input_ids
    for _ in range(max_new_tokens):
        zs, zw, out = paired_logits(model, hooks, step, strong, weak, cache=cache, use_cache=True)
        cache = out.past_key_values
        nxt = contrast_scores(zs[:, -1], zw[:, -1], contrast.alpha, contrast.beta).argmax(dim=-1, keepdim=True)
        out_ids = torch.cat([out_ids, nxt], dim=1)
        if eos_token_id is not None and int(nxt) == eos_token_id:
            break
        step = nxt
    return out_ids


@torch.inference_mode()
def accuracy(model, hooks, windows, contrast: Contrast, strong: Routing | None = None, batch_size: int = 8) -> dict:
    """Teacher-forced next-token accuracy of SCMoE's argmax and of the strong model's own greedy argmax over
    windows (token arrays); one paired forward per batch."""
    from moekit.compress.evaluate import batches  # equal-length windows -> [B, S]

    tokens = hits = greedy_hits = 0
    weak = contrast.weak()
    for ids in batches(windows, batch_size):
        zs, zw, _ = paired_logits(model, hooks, ids, strong, weak, use_cache=False)
        target = ids[:, 1:]
        score = contrast_scores(zs[:, :-1], zw[:, :-1], contrast.alpha, contrast.beta)
        hits += int((score.argmax(-1) == target).sum())
        greedy_hits += int((zs[:, :-1].argmax(-1) == target).sum())
        tokens += target.numel()
    return {"tokens": tokens, "accuracy": hits / max(tokens, 1), "greedy_accuracy": greedy_hits / max(tokens, 1)}


def evaluate_path(path, data: list[str], contrast: Contrast, strong: Routing | None = None, seq_len: int = 256,
                  max_tokens: int | None = 16384, batch_size: int = 8) -> dict:
    """`moekit eval --scmoe`: per-domain next-token accuracy of SCMoE's argmax next to the strong routing's greedy
    argmax (SCMoE's scores are no distribution: no perplexity)."""
    import moekit.models
    from moekit.compress.evaluate import domain_windows, load_for_eval
    from moekit.routing.apply import attach
    from moekit.trace.data import encoder, resolve_data

    sources = resolve_data(data)
    model, tokenizer = load_for_eval(path)
    view = moekit.models.load(model)
    windows = domain_windows(sources, encoder(tokenizer), seq_len, max_tokens)
    hooks = attach(view)
    try:
        rows = {d: accuracy(model, hooks, ws, contrast, strong, batch_size) for d, ws in windows.items()}
    finally:
        hooks.remove()
    return {"model": str(path), "decoding": f"scmoe alpha={contrast.alpha:g} beta={contrast.beta:g} "
            f"weak=rank={contrast.rank}", "routing": strong.spec() if strong else "stock", "domains": rows}
