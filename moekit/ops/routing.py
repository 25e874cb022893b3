"""Routing rules of the transformers MoE families, re-implemented from router logits as pure functions.

A `RoutingRule` states a router exactly: how logits become scores, whether scoring happens before or after the top-k,
group-limited selection, a selection-only score-correction bias, renormalisation and scaling, and the rarer steps some
families add: experts chosen by a token-id hash table (DeepSeek-V4), skip experts (Zaya), shared experts normalised with
the routed ones (Inkling), product-key selection (Doge), and an expert capacity that drops tokens (Switch Transformers,
NLLB-MoE). `route` applies it. Each numeric step mirrors the op order of the corresponding transformers router so
results agree bit for bit in float32 (tests/models/test_families.py compares against every supported family).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus", "sparsemixer")
GROUP_SCORES = ("max", "top2_sum")
CAPACITY_SCOPES = ("sequence", "batch")


@dataclass(frozen=True)
class RoutingRule:
    top_k: int
    scoring: str = "softmax"  # softmax | sigmoid | sqrtsoftplus (DeepSeek-V4, Inkling2) | sparsemixer (PhiMoE)
    score_after_topk: bool = False  # top-k on raw logits, then score only the K kept (Granite, GPT-OSS, Llama 4)
    renormalize: bool = False  # norm_topk_prob: divide the K weights by their sum
    renorm_eps: float = 0.0  # added to that sum (DeepSeek-V3 / GLM-4.5 use 1e-20)
    renorm_min: float = 0.0  # lower clamp of that sum (ERNIE 4.5 moe_norm_min)
    n_group: int = 1  # group-limited top-k: experts split into n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups are eligible
    group_score: str = "max"  # group rank: best expert (DeepSeek-V2) or sum of best two (DeepSeek-V3)
    group_mask_zero: bool = False  # experts outside the chosen groups compete with choice 0, not -inf (AXK2)
    correction_bias: bool = False  # selection-only bias on the scores (on the logits if score_after_topk: Kolibri1)
    router_bias: bool = False  # the router's linear layer has a bias (GPT-OSS)
    routed_scaling_factor: float = 1.0  # multiplies the final weights (DeepSeek, GLM)
    weight_on_input: bool = False  # Llama 4 multiplies the expert's input, not its output, by the weight
    jitter_eps: float = 0.0  # sparsemixer's relative threshold (router_jitter_noise)
    # Llama 4 scores a dense [T, E] tensor that is -inf off the top-k. Same values as scoring the K kept logits, but
    # torch's vectorised sigmoid rounds the tail of a tensor differently, so matching HF bit for bit needs its shape.
    score_dense: bool = False
    hashed: bool = False  # the experts come from a token-id table, not the scores (DeepSeek-V4's first layers)
    null_experts: int = 0  # trailing logit columns of experts that compute nothing (Zaya's skip expert)
    shared_logits: int = 0  # trailing logit columns of shared experts, normalised jointly with the K routed (Inkling)
    product_keys: int = 0  # > 0: product-key selection over 2 x product_keys half-logits (Doge CDMoE, PEER)
    second_on_logits: bool = False  # top-2 whose second choice is the arg-max of the logits without the first (NLLB)
    capacity: int = 0  # > 0: at most this many tokens per expert ... (Switch, NLLB-MoE)
    capacity_fraction: float = 0.0  # ... or ceil(fraction x tokens in scope) (NLLB-MoE at inference)
    capacity_scope: str = "sequence"  # capacity counted per sequence (Switch) or over the whole batch (NLLB-MoE)
    renormalize_after_drop: bool = True  # with capacity: renormalise the kept weights (NLLB's default order)

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {self.scoring!r}; known: {', '.join(SCORINGS)}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"unknown group_score {self.group_score!r}; known: {', '.join(GROUP_SCORES)}")
        if self.scoring == "sparsemixer" and (self.top_k != 2 or self.score_after_topk):
            raise ValueError("sparsemixer routing is defined for top-2 only")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"need 1 <= topk_group <= n_group, got {self.topk_group} and {self.n_group}")
        if self.capacity_scope not in CAPACITY_SCOPES:
            raise ValueError(f"unknown capacity_scope {self.capacity_scope!r}; known: {', '.join(CAPACITY_SCOPES)}")
        if self.second_on_logits and self.top_k != 2:
            raise ValueError("second_on_logits describes a top-2 router")
        if min(self.null_experts, self.shared_logits, self.product_keys, self.capacity) < 0:
            raise ValueError("null_experts, shared_logits, product_keys and capacity must be >= 0")

    @property
    def extra_logits(self) -> int:
        """Router columns after the E routed experts that are not routed experts (skip / shared experts)."""
        return self.null_experts + self.shared_logits

    @property
    def drops_tokens(self) -> bool:
        """Whether a selection can be dropped (weight 0, no expert computed) once experts are full."""
        return self.capacity > 0 or self.capacity_fraction > 0

    def describe(self) -> str:
        """One line a person can read, e.g. 'sigmoid(+bias for selection) -> group top-4/8 -> top-8 -> renorm x2.5'."""
        score = self.scoring + ("(+bias for selection)" if self.correction_bias and not self.score_after_topk else "")
        topk = f"top-{self.top_k}" + ("(logits+bias)" if self.correction_bias and self.score_after_topk else "")
        if self.product_keys:
            topk = f"product-key top-{self.top_k} ({self.product_keys}x{self.product_keys} keys)"
        if self.hashed:
            topk = f"top-{self.top_k} from a token-id hash table"
        steps = [topk, score] if self.score_after_topk or self.product_keys else [score, topk]
        if self.n_group > 1:
            steps.insert(-1, f"group top-{self.topk_group}/{self.n_group} ({self.group_score})")
        if self.null_experts:
            steps.append(f"{self.null_experts} skip expert(s) -> weight 0")
        if self.drops_tokens:
            limit = self.capacity or f"{self.capacity_fraction:g} x tokens"
            steps.append(f"capacity {limit} per expert per {self.capacity_scope}")
        if self.shared_logits:
            steps.append(f"normalised jointly with {self.shared_logits} shared expert(s)")
        if self.renormalize:
            steps.append("renormalise")
        if self.routed_scaling_factor != 1.0:
            steps.append(f"x{self.routed_scaling_factor:g}")
        if self.weight_on_input:
            steps.append("weight on input")
        return " -> ".join(steps)


def route(
    logits: torch.Tensor, rule: RoutingRule, correction_bias: torch.Tensor | None = None, *,
    ids: torch.Tensor | None = None, scale: torch.Tensor | None = None, sequences: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E (+ rule.extra_logits)] -> (weights [T, K] float32, ids [T, K] int64), ordered by weight,
    descending.

    `logits` already include the router bias when the rule has one (it is part of the router's linear layer).
    ids: [T, K] the experts a hash-routed layer's token table gives (rule.hashed). scale: a learned factor on the final
    weights (Inkling's global_scale). sequences: how many sequences the T rows hold, row-major (capacity per sequence).
    A dropped (over capacity) or skip-expert selection keeps its slot with weight 0: no expert computes it.
    """
    if rule.correction_bias and correction_bias is None:
        raise ValueError("this rule needs the router's score-correction bias")
    if rule.hashed and ids is None:
        raise ValueError("a hash-routed rule needs the expert ids its token table gives (ids=...)")
    logits = logits.float()  # every supported router computes its scores in float32
    if rule.shared_logits:
        weights, ids, _ = joint_shared_weights(logits, rule, correction_bias, scale)
        return _sort_by_weight(weights, ids)
    weights, ids = _select(logits, rule, correction_bias, ids)
    if rule.null_experts:  # Zaya: a skip selection becomes expert 0 at weight 0, exactly as its router returns it
        skip = ids >= logits.shape[1] - rule.null_experts
        weights, ids = weights.masked_fill(skip, 0.0), ids.masked_fill(skip, 0)
    if rule.drops_tokens:
        keep = within_capacity(ids, logits.shape[1], rule, sequences)  # [T, K]
        if rule.renormalize_after_drop:
            weights = _renormalise_and_scale(weights * keep, rule)
        else:
            weights = _renormalise_and_scale(weights, rule) * keep
    else:
        weights = _renormalise_and_scale(weights, rule)
    if scale is not None:
        weights = weights * scale.float()
    return _sort_by_weight(weights, ids)


def _select(logits, rule, correction_bias, ids):
    """(weights [T, K], ids [T, K]) before renormalisation, in the router's selection order."""
    if rule.scoring == "sparsemixer":
        return _sparsemixer(logits, rule.jitter_eps)
    if rule.hashed:  # DeepSeek-V4 hash layers: fixed experts per token id, weighted by the learned scores
        return _score(logits, rule.scoring).gather(1, ids), ids
    if rule.product_keys:
        return _product_keys(logits, rule)
    if rule.second_on_logits:
        return _top2_second_on_logits(logits)
    if rule.score_after_topk:
        return _topk_then_score(logits, rule, correction_bias)
    return _score_then_topk(logits, rule, correction_bias)


def joint_shared_weights(logits: torch.Tensor, rule: RoutingRule, correction_bias: torch.Tensor,
                         scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inkling: logits [T, E + S], the last S the shared experts'. Selection: top-k of sigmoid(routed) + bias; weights:
    sigmoid of the K kept and the S shared logits normalised together, in log space (exp(log s - logsumexp log s)),
    x routed_scaling_factor x scale. -> (routed weights [T, K], ids [T, K], shared weights [T, S]), HF's op order."""
    E = logits.shape[1] - rule.shared_logits
    scores = logits.sigmoid()  # [T, E + S]: the whole row, as the router scores it
    ids = torch.topk(scores[..., :E] + correction_bias.float(), rule.top_k, dim=-1, sorted=False).indices  # [T, K]
    kept = torch.cat([logits[..., :E].gather(-1, ids), logits[..., E:]], dim=-1)  # [T, K + S]
    log_scores = F.logsigmoid(kept)
    weights = torch.exp(log_scores - torch.logsumexp(log_scores, dim=-1, keepdim=True)) * rule.routed_scaling_factor
    weights = weights * scale.float() if scale is not None else weights
    return weights[..., : rule.top_k], ids, weights[..., rule.top_k:]


def _product_keys(logits: torch.Tensor, rule: RoutingRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-key selection (Lample et al., arXiv 1907.05242; PEER, arXiv 2407.04153) as Doge's CDMoE computes it:
    the [T, 2n] logits are viewed as two [T, n] halves, each half's top-n is taken, their n x n sums rank the n^2
    experts (id = i * n + j), and the best K are scored by a softmax over the K. Doge views the flat [T, 2n] logits as
    [2, T, n], so a token's two halves are rows of other tokens (HF keeps it for checkpoint compatibility; its note:
    routing is not causal in a full forward); this reproduces that, so it needs the T tokens of the same forward."""
    n, T = rule.product_keys, logits.shape[0]
    (score_x, score_y), (index_x, index_y) = logits.reshape(2, T, n).topk(n, dim=-1)  # [T, n] each
    scores = (score_x.unsqueeze(-1) + score_y.unsqueeze(-2)).view(T, n * n)
    index = (index_x.unsqueeze(-1) * n + index_y.unsqueeze(-2)).view(T, n * n)
    top, position = scores.topk(rule.top_k, dim=-1)  # [T, K]
    return torch.softmax(top, dim=-1), index.gather(-1, position)


def _top2_second_on_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLLB-MoE: the first choice is the arg-max probability, the second the arg-max logit among the others."""
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    first = probs.argmax(dim=-1)  # [T]
    rest = logits.masked_fill(F.one_hot(first, logits.shape[1]).bool(), float("-inf"))
    ids = torch.stack([first, rest.argmax(dim=-1)], dim=-1)  # [T, 2]
    return probs.gather(1, ids), ids


def within_capacity(ids: torch.Tensor, num_experts: int, rule: RoutingRule, sequences: int = 1) -> torch.Tensor:
    """[T, K] bool: which selections an expert still takes, each expert taking at most its capacity of tokens in
    token order, all first choices before any second choice (Switch Transformers, arXiv 2101.03961 section 2.2;
    NLLB-MoE / fairseq `top2gating`). The capacity is counted per sequence or over the whole batch (rule.scope)."""
    T, K = ids.shape
    groups = sequences if rule.capacity_scope == "sequence" else 1
    if T % groups:
        raise ValueError(f"{T} tokens do not split into {groups} sequences")
    tokens = T // groups
    limit = rule.capacity if rule.capacity else math.ceil(rule.capacity_fraction * tokens)
    onehot = F.one_hot(ids, num_experts).view(groups, tokens, K, num_experts)
    queue = onehot.permute(0, 2, 1, 3).reshape(groups, K * tokens, num_experts)  # slot-major: first choices first
    position = ((queue.cumsum(dim=1) - 1) * queue).sum(dim=-1)  # [G, K*tokens]: place in its expert's queue
    return (position < limit).view(groups, K, tokens).permute(0, 2, 1).reshape(T, K)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): the logit soft-cap some routers apply before scoring (Laguna
    `moe_router_logit_softcapping`; Gemma 2 introduced it for attention and final logits)."""
    return torch.tanh(logits / cap) * cap


def _score(x: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "softmax":
        return torch.softmax(x, dim=-1)
    if scoring == "sqrtsoftplus":  # sqrt(softplus(x)): transformers' ACT2FN["sqrtsoftplus"], DeepSeek-V4's router score
        return F.softplus(x).sqrt()
    return torch.sigmoid(x)


def _topk_then_score(logits, rule, correction_bias):
    if rule.correction_bias:  # Kolibri1: bias on the logits for selection; the kept raw logits are scored
        ids = torch.topk(logits + correction_bias.float(), rule.top_k, dim=-1).indices  # [T, K]
        top_logits = logits.gather(1, ids)
    else:
        top_logits, ids = torch.topk(logits, rule.top_k, dim=-1)  # [T, K]
    if rule.score_dense:
        dense = torch.full_like(logits, float("-inf")).scatter_(1, ids, top_logits)  # [T, E]
        return _score(dense, rule.scoring).gather(1, ids), ids
    return _score(top_logits, rule.scoring), ids


def _score_then_topk(logits, rule, correction_bias):
    scores = _score(logits, rule.scoring)  # [T, E]
    choice = scores + correction_bias.float() if rule.correction_bias else scores
    if rule.n_group > 1:
        scores, choice = _limit_to_groups(scores, choice, rule)
    ids = torch.topk(choice, rule.top_k, dim=-1).indices  # [T, K]
    return scores.gather(1, ids), ids


def _limit_to_groups(scores, choice, rule):
    """Group-limited top-k. DeepSeek-V2 ranks groups by their best expert and zeroes the scores outside the chosen
    groups; DeepSeek-V3 ranks them by the sum of their best two (bias included) and excludes the rest from selection.
    AXK2 (and Mistral 4's reference) gives the excluded experts a choice of 0 instead of -inf: with a negative
    score-correction bias an excluded expert can then still win over an eligible one."""
    T, E = choice.shape
    grouped = choice.view(T, rule.n_group, E // rule.n_group)  # [T, G, E/G]
    if rule.group_score == "max":
        group_scores = grouped.max(dim=-1).values  # [T, G]
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    group_idx = torch.topk(group_scores, rule.topk_group, dim=-1).indices  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()  # [T, G]
    expert_mask = group_mask.repeat_interleave(E // rule.n_group, dim=1)  # [T, E]
    if rule.group_score == "max":
        scores = scores.masked_fill(~expert_mask, 0.0)
        return scores, scores
    return scores, choice.masked_fill(~expert_mask, 0.0 if rule.group_mask_zero else float("-inf"))


def _sparsemixer(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer at inference (arXiv 2409.12136): the best expert, then the best of the rest, each weighted by
    a softmax over the logits within a relative distance 2*eps of it."""
    top1 = logits.max(dim=-1, keepdim=True).indices  # [T, 1]
    w1 = _sparsemixer_gate(logits, logits, eps).gather(-1, top1)
    rest = logits.scatter(-1, top1, float("-inf"))  # [T, E]
    top2 = rest.max(dim=-1, keepdim=True).indices
    w2 = _sparsemixer_gate(logits, rest, eps).gather(-1, top2)
    return torch.cat((w1, w2), dim=-1), torch.cat((top1, top2), dim=-1)


def _sparsemixer_gate(logits, candidates, eps):
    threshold = candidates.max(dim=-1, keepdim=True).values  # [T, 1]
    factor = logits.abs().clamp(min=threshold)
    too_far = ((threshold - logits) / factor) > (2 * eps)
    return torch.softmax(candidates.masked_fill(too_far, float("-inf")), dim=-1)  # [T, E]


def _renormalise_and_scale(weights: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    if rule.renormalize:
        denominator = weights.sum(dim=-1, keepdim=True) + rule.renorm_eps
        weights = weights / denominator.clamp(min=rule.renorm_min)
    if rule.routed_scaling_factor != 1.0:
        weights = weights * rule.routed_scaling_factor
    return weights


def _sort_by_weight(weights, ids):
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)
    return weights.gather(-1, order), ids.gather(-1, order)


def canonical_order(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each token's selections by expert id, equal ids by weight: routers differ in the order they return
    (DeepSeek's top-k is unsorted), so comparisons go through this. Ids repeat where a skip or dropped selection
    reads as expert 0 at weight 0 (Zaya)."""
    weights, ids = _sort_by_weight(weights, ids)
    order = torch.argsort(ids, dim=-1, stable=True)
    return weights.gather(-1, order), ids.gather(-1, order)
