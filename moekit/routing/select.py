"""Routing under a policy: the family's own RoutingRule (scoring, selection bias, groups, renormalisation, scaling)
with the constraints a policy adds, as one pure function of the router logits.

A `Plan` collects what the policies of moekit/routing/policies.py decided for one router call; `execute` applies it in
the family's op order (moekit/ops/routing.py), so that an empty plan is exactly `route()`, which tests/models prove
bit-identical to every transformers router. A selection policy (top-p, skip, rank, replay) names the kept experts per
token; K then varies per token, and the dropped slots get the sentinel id (E; E + zero experts for LongCat-Flash; a
Zaya skip expert's column is that id) and weight 0, which transformers' eager experts loops and moekit's offloaded
engine skip. Dimension legend: T tokens, E experts (the router's choices: the logits' width, Zaya's skip expert and
LongCat's zero experts included), K selected, S shared experts (Inkling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moekit.ops.routing import RoutingRule, _limit_to_groups, _renormalise_and_scale, _score, _sparsemixer

# keep(choice [T, E], probs [T, E], top_k) -> bool [T, E]: the experts a selection policy keeps for each token
KeepFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
_FINITE_MIN = torch.finfo(torch.float32).min


@dataclass
class Plan:
    """One router call's routing decisions. Policies edit it in spec order; `execute` applies it."""

    logits: torch.Tensor  # [T, E] router logits, float32 (steering edits them)
    top_k: int  # K of the fixed-K selection (the rule's, or topk=K)
    keep: KeepFn | None = None  # a selection policy: which experts each token keeps (K varies per token)
    allow: torch.Tensor | None = None  # bool [E]: eligible experts (mask: the others are never selected)
    force: torch.Tensor | None = None  # bool [E]: experts selected for every token (force)
    raw: bool = False  # weights not renormalised over the kept set (top-p's default, arXiv 2403.07652)
    scale: torch.Tensor | None = None  # [E] factors on the weights of selected experts (RICE)
    override: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows [r], probs [r, E]): C3PO's replaced ω
    shared: torch.Tensor | None = None  # [T, S] shared experts' logits, normalised with the kept routed ones (Inkling)

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.keep, self.allow, self.force, self.scale, self.override)) \
            and not self.raw


def normalised_scores(logits: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """The routing distribution p [T, E] that top-p accumulates and skip compares: softmax(z) for softmax routers
    (score-after-top-k ones included: their K weights are p renormalised over the K); for sigmoid-type scores, the
    scores divided by their sum (an adaptation: the papers use softmax routers)."""
    if rule.scoring in ("softmax", "sparsemixer"):
        return torch.softmax(logits, dim=-1)
    s = _score(logits, rule.scoring)
    return s / s.sum(dim=-1, keepdim=True)


def execute(plan: Plan, rule: RoutingRule, correction_bias: torch.Tensor | None, sentinel: int,
            router_ids: torch.Tensor | None = None, router_scale: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Plan -> (weights [T, K'] float32, ids [T, K'] int64, shared weights [T, S] float32 or None) in the selection's
    rank order (as transformers' sorted top-k); dropped slots come last and hold `sentinel` with weight 0 (K' = the
    most experts any token keeps). A skip expert's selection (Zaya, rule.null_experts) is such a slot: it runs nothing.
    router_ids [T, K]: the router's own selection; tokens the plan selects the same experts for keep its slot order,
    so that renormalisation sums in the router's order and the experts loops gather tokens in it (bit-identical).
    router_scale: the router's learned factor on the final weights (Inkling's global_scale)."""
    z = plan.logits.float()
    if rule.scoring == "sparsemixer":
        return (*_execute_sparsemixer(plan, z, rule, sentinel), None)
    bias = correction_bias.float() if rule.correction_bias else None
    scores = pre_group = None
    if rule.score_after_topk:
        choice = z + bias if bias is not None else z
    else:
        scores = pre_group = _scores(z, plan.shared, rule)  # [T, E]
        choice = scores + bias if bias is not None else scores
        if rule.n_group > 1:
            scores, choice = _limit_to_groups(scores, choice, rule)
    if plan.override is not None:
        z, choice, scores = _override(plan.override, z, choice, scores, rule)
    if plan.allow is not None:
        choice = choice.masked_fill(~plan.allow, float("-inf"))
    if plan.force is not None:
        choice = choice.masked_fill(plan.force, float("inf"))
    valid = None
    if plan.keep is None:
        ids = torch.topk(choice, plan.top_k, dim=-1).indices  # [T, K]
    else:
        keep = plan.keep(choice, _eligible_probs(z, choice, rule), plan.top_k)  # [T, E]
        k = max(1, int(keep.sum(dim=-1).max()))
        # kept experts outrank every other one, even those a group limit set to -inf
        ranked = torch.where(keep, choice.nan_to_num(neginf=_FINITE_MIN), float("-inf"))
        ids = torch.topk(ranked, k, dim=-1).indices  # [T, K']
        valid = keep.gather(1, ids)
    if router_ids is not None:
        ids, valid = _router_order(ids, valid, router_ids)
    if rule.null_experts:  # Zaya's skip expert: selected like any expert, computed by none (weight 0, the sentinel)
        real = ids < z.shape[1] - rule.null_experts
        valid = real if valid is None else valid & real
    shared = None
    if rule.shared_logits:
        weights, shared = _joint_weights(plan, z, ids, valid, rule, router_scale)
    else:
        weights = _weights(plan, z, scores, pre_group, ids, valid, rule)
    if plan.scale is not None:
        weights = weights * plan.scale[ids]
    if valid is not None:
        ids = ids.masked_fill(~valid, sentinel)
    return weights, ids, shared


def _scores(z, shared, rule) -> torch.Tensor:
    """The routed experts' scores [T, E]. Inkling scores its whole row, shared experts included, and slices: torch's
    vectorised sigmoid can round a tensor's tail differently, so bit-equality needs the same shape."""
    if shared is None:
        return _score(z, rule.scoring)
    return _score(torch.cat([z, shared.float()], dim=-1), rule.scoring)[:, : z.shape[1]]


def _router_order(ids, valid, router_ids):
    """Tokens whose selected set equals the router's get the router's slot order ([T, K] each). Routers differ in
    their order (MiniMax-M3 and the DeepSeek-V3 copies take an unsorted top-k), and float sums follow it."""
    if ids.shape != router_ids.shape:
        return ids, valid
    match = ids[:, :, None] == router_ids[:, None, :]  # [T, K, K]: slot i holds the router's slot j's expert
    # both ways: Zaya's router lists a skip selection as expert 0, which may also be a real selection of the token
    same = match.any(dim=1).all(dim=-1) & match.any(dim=2).all(dim=-1)  # [T]
    if valid is not None:
        same &= valid.all(dim=-1)
    if not bool(same.any()):
        return ids, valid
    return torch.where(same[:, None], router_ids, ids), valid


def _weights(plan, z, scores, pre_group, ids, valid, rule) -> torch.Tensor:
    if rule.score_after_topk:
        if plan.raw and rule.scoring == "softmax":  # raw = p over all experts, not the softmax over the kept
            w = torch.softmax(z, dim=-1).gather(1, ids)
            w = w.masked_fill(~valid, 0.0) if valid is not None else w
        else:
            top = z.gather(1, ids)  # [T, K]
            top = top.masked_fill(~valid, float("-inf")) if valid is not None else top  # exp / sigmoid -> 0
            if rule.score_dense:  # Llama 4 scores a dense tensor (see RoutingRule.score_dense)
                dense = torch.full_like(z, float("-inf")).scatter_(1, ids, top)
                w = _score(dense, rule.scoring).gather(1, ids)
            else:
                w = _score(top, rule.scoring)
    else:
        w = scores.gather(1, ids)  # [T, K]
        if plan.force is not None and pre_group is not scores:  # a forced expert outside the chosen groups keeps
            w = torch.where(plan.force[ids], pre_group.gather(1, ids), w)  # its own score (V2 zeroes the others)
        w = w.masked_fill(~valid, 0.0) if valid is not None else w
    if plan.raw:
        return w * rule.routed_scaling_factor if rule.routed_scaling_factor != 1.0 else w
    return _renormalise_and_scale(w, rule)


def _joint_weights(plan, z, ids, valid, rule, router_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Inkling (moekit.ops.routing.joint_shared_weights): the kept routed experts' and the S shared experts' sigmoid
    scores normalised together in log space, x routed_scaling_factor x the router's scale -> (routed [T, K'], shared
    [T, S]). Dropped slots enter as -inf logits (weight 0). raw (top-p's default): the normaliser runs over every
    routed expert and the shared ones, the analogue of p over all experts (not renormalised over the kept set)."""
    kept = z.gather(1, ids)  # [T, K']
    kept = kept.masked_fill(~valid, float("-inf")) if valid is not None else kept
    log_scores = F.logsigmoid(torch.cat([kept, plan.shared.float()], dim=-1))  # [T, K' + S]
    pool = F.logsigmoid(torch.cat([z, plan.shared.float()], dim=-1)) if plan.raw else log_scores
    weights = torch.exp(log_scores - torch.logsumexp(pool, dim=-1, keepdim=True)) * rule.routed_scaling_factor
    weights = weights * router_scale.float() if router_scale is not None else weights
    return weights[:, : ids.shape[1]], weights[:, ids.shape[1]:]


def _eligible_probs(z, choice, rule) -> torch.Tensor:
    """p restricted to the experts the rule may select (group limit, mask) and renormalised over them."""
    p = normalised_scores(z, rule)
    eligible = choice > float("-inf")
    if bool(eligible.all()):
        return p
    p = p * eligible
    return p / p.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)


def _override(override, z, choice, scores, rule):
    """C3PO (arXiv 2504.07964, released code): the rows' routing distribution is replaced by ω̂ and the top-k taken on
    it, ignoring bias and groups. Score-first rules keep each row's total score mass (1 for softmax); score-after-top-k
    rules get log ω̂ as logits, so the softmax over the K kept is ω̂ renormalised."""
    rows, probs = override
    z, choice = z.clone(), choice.clone()
    if rule.score_after_topk:
        z[rows] = probs.clamp(min=1e-10).log()
        choice[rows] = z[rows]
        return z, choice, scores
    scores = scores.clone()
    scores[rows] = probs * scores[rows].sum(dim=-1, keepdim=True)
    choice[rows] = scores[rows]
    return z, choice, scores


def _execute_sparsemixer(plan: Plan, z, rule, sentinel):
    """PhiMoE's sparsemixer is defined for top-2 only: masks enter as -inf logits, and a selection policy can only drop
    one of the two (skip); its weights are kept as they are (sparsemixer does not renormalise)."""
    if plan.allow is not None:
        z = z.masked_fill(~plan.allow, float("-inf"))
    weights, ids = _sparsemixer(z, rule.jitter_eps)  # [T, 2]
    if plan.scale is not None:
        weights = weights * plan.scale[ids]
    if plan.keep is not None:
        valid = plan.keep(z, torch.softmax(z, dim=-1), 2).gather(1, ids)
        weights, ids = weights.masked_fill(~valid, 0.0), ids.masked_fill(~valid, sentinel)
    return weights, ids
