"""The one sampler of `moekit run`, `moekit serve` and the Python API: temperature, top-k, top-p, a per-sequence seed.

Each sequence draws from its own `torch.Generator`, seeded from its request's seed, one draw per token, from its own
logits row: the same seed and prompt give the same tokens whatever else shares the batch (a batch-wide RNG, as in
transformers' continuous batching, makes every request's draws depend on its neighbours). Order of the warpers:
temperature, then top-k, then top-p, as transformers' `generate` applies them (TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper). Temperature 0 is greedy: argmax of the raw logits, no draw.
Log-probabilities are those of the raw model distribution (log-softmax of the logits before any warper), what vLLM
returns by default (`logprobs_mode=raw_logprobs`), so they do not change with the sampling parameters.

Dimension legend: B sequences in the step, V vocabulary.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from moekit.errors import UserError

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): off
    seed: int | None = None  # None: a random one per sequence
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the k most likely ones'

    def __post_init__(self):
        if not (0.0 <= self.temperature <= 100.0):
            raise UserError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise UserError(f"top_k must be >= 1, or 0 / -1 for off, got {self.top_k}")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise UserError(f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if self.seed is not None and not (-(2**63) <= self.seed < 2**64):
            raise UserError(f"seed must fit in 64 bits, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """One sequence's sampling state. `choice` separates the n choices of one request: choice i draws from
    seed + i, so n > 1 gives n different samples and choice 0 of a seeded request equals the same request with n=1."""

    def __init__(self, params: SamplingParams, choice: int = 0):
        self.params = params
        self.generator = None
        if not params.greedy:
            seed = secrets.randbits(63) if params.seed is None else params.seed + choice
            self.generator = torch.Generator().manual_seed(seed % 2**64)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] float32 -> the warped logits a draw is made from (-inf outside top-k / top-p)."""
        p = self.params
        x = logits / p.temperature
        if 0 < p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:  # smallest set whose probability reaches top_p (the top token is always kept)
            sorted_x, order = torch.sort(x, descending=True)
            cum = torch.softmax(sorted_x, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_x, -1) >= p.top_p  # mass before this token already reaches top_p
            x = x.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        return x

    def choose(self, logits: torch.Tensor) -> int:
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(self.warp(logits), -1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass
class TokenLogprobs:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob), most likely first


def sample_step(logits: torch.Tensor, samplers: list[Sampler]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits [B, V] (any float dtype) -> one token per row, and its log-probabilities where the row asks for them."""
    logits = logits.float()
    tokens = [0] * len(samplers)
    greedy = [i for i, s in enumerate(samplers) if s.generator is None]
    if greedy:
        for i, t in zip(greedy, torch.argmax(logits[greedy], -1).tolist()):
            tokens[i] = t
    for i, s in enumerate(samplers):
        if s.generator is not None:
            tokens[i] = s.choose(logits[i])
    out: list[TokenLogprobs | None] = [None] * len(samplers)
    want = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
    if want:
        lp = torch.log_softmax(logits[want], -1)  # [b, V]
        k = max(samplers[i].params.logprobs for i in want)
        top_v, top_i = torch.topk(lp, k, -1) if k else (lp[:, :0], lp[:, :0].long())
        for row, i in enumerate(want):
            n = samplers[i].params.logprobs
            out[i] = TokenLogprobs(tokens[i], float(lp[row, tokens[i]]),
                                   list(zip(top_i[row, :n].tolist(), top_v[row, :n].tolist())))
    return tokens, out


class SamplerLogitsProcessor:
    """The sampler inside transformers' `generate` (used by `moekit run`): with do_sample=False, generate takes the
    argmax of what this returns, and it returns a row where only the sampler's choice is finite."""

    def __init__(self, params: SamplingParams):
        self.samplers: list[Sampler] | None = None
        self.params = params

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.samplers is None:
            self.samplers = [Sampler(self.params, choice=i) for i in range(scores.shape[0])]
        tokens, _ = sample_step(scores, self.samplers)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0]), torch.tensor(tokens)] = 0.0
        return out
