"""Routing rules of the transformers MoE families, re-implemented from router logits as pure functions.

A `RoutingRule` states a router exactly: how logits become scores, whether scoring happens before or after the top-k,
group-limited selection, a selection-only score-correction bias, renormalisation and scaling. `route` applies it.
Each numeric step mirrors the op order of the corresponding transformers router so results agree bit for bit in float32
(tests/ops/test_routing_vs_hf.py compares against every supported family).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus", "sparsemixer")
GROUP_SCORES = ("max", "top2_sum")


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

    def describe(self) -> str:
        """One line a person can read, e.g. 'sigmoid(+bias for selection) -> group top-4/8 -> top-8 -> renorm x2.5'."""
        score = self.scoring + ("(+bias for selection)" if self.correction_bias and not self.score_after_topk else "")
        topk = f"top-{self.top_k}" + ("(logits+bias)" if self.correction_bias and self.score_after_topk else "")
        steps = [topk, score] if self.score_after_topk else [score, topk]
        if self.n_group > 1:
            steps.insert(-1, f"group top-{self.topk_group}/{self.n_group} ({self.group_score})")
        if self.renormalize:
            steps.append("renormalise")
        if self.routed_scaling_factor != 1.0:
            steps.append(f"x{self.routed_scaling_factor:g}")
        if self.weight_on_input:
            steps.append("weight on input")
        return " -> ".join(steps)


def route(
    logits: torch.Tensor, rule: RoutingRule, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, K] float32, ids [T, K] int64), ordered by weight, descending.

    `logits` already include the router bias when the rule has one (it is part of the router's linear layer).
    """
    if rule.correction_bias and correction_bias is None:
        raise ValueError("this rule needs the router's score-correction bias")
    logits = logits.float()  # every supported router computes its scores in float32
    if rule.scoring == "sparsemixer":
        weights, ids = _sparsemixer(logits, rule.jitter_eps)
    elif rule.score_after_topk:
        weights, ids = _topk_then_score(logits, rule, correction_bias)
    else:
        weights, ids = _score_then_topk(logits, rule, correction_bias)
    weights = _renormalise_and_scale(weights, rule)
    return _sort_by_weight(weights, ids)


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
    """Sort each token's selections by expert id: routers differ in the order they return (DeepSeek's top-k is unsorted),
    so comparisons go through this."""
    order = torch.argsort(ids, dim=-1)
    return weights.gather(-1, order), ids.gather(-1, order)
