"""Sampling: temperature, top-k, top-p, min-p, seeded per request; log-probabilities.

Log-probabilities. `Completion.logprobs[i]` is log softmax(logits / temperature) of the chosen token:
temperature-scaled, *not* truncated by top-k / top-p / min-p (temperature 0 gives the raw
log-softmax). A GRPO trainer that divides its logits by the same temperature computes the same
quantity for the new policy, so the ratio of the two is exactly the importance ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from minir1.engine.native import native_sample, native_sampling


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    min_p: float = 0.0                # 0 = off; keep tokens with p >= min_p * p_max
    n: int = 1                        # samples per prompt (sharing one prefill)
    stop_token_ids: list[int] | None = None  # None = the tokenizer's / config's EOS
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0             # with logprobs: the most likely alternatives per token (the server's)
    speculative: bool = False         # MTP self-speculative decoding

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer (got {self.max_new_tokens!r})")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature!r})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (got {self.top_k!r})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (got {self.min_p!r})")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive integer (got {self.n!r})")
        if not math.isfinite(self.temperature) or not math.isfinite(self.top_p) or not math.isfinite(self.min_p):
            raise ValueError("temperature, top_p and min_p must be finite numbers")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(x, str) and x for x in self.stop):
            raise ValueError(f"stop strings must be non-empty strings (got {self.stop!r})")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be an integer in [0, 20] (got {self.top_logprobs!r})")

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The random generator of a run with these parameters (seeded by `seed`, else at random)."""
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        return gen


def process_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits [B, V] -> the sampling distribution's log-probabilities (-inf outside its support):
    temperature, then top-k, then top-p (on the top-k distribution), then min-p."""
    logits = logits.float()
    if params.temperature == 0:
        out = torch.full_like(logits, -math.inf)
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # mass before this token already reaches top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), -math.inf)
    return logits.log_softmax(-1)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """-> (tokens [B], their log-probabilities under softmax(logits / temperature) [B])."""
    if untruncated(params) and native_sampling(logits):  # one native call, the same random draws
        B = logits.shape[0]
        u = torch.rand(B, generator=generator) if params.temperature > 0 else torch.zeros(B)
        return native_sample(logits, torch.full((B,), float(params.temperature)), u)
    logp = process_logits(logits, params)
    tokens = logp.argmax(-1) if params.temperature == 0 else categorical(logp.exp(), generator)
    return tokens, token_logprobs(logits, tokens, params.temperature)


@dataclass(eq=False)
class Group:
    """Consecutive rows of a batch that sample with one SamplingParams and one generator (a request)."""
    params: SamplingParams
    generator: torch.Generator
    rows: int


def sample_groups(logits: Tensor, groups: Sequence[Group]) -> tuple[Tensor, Tensor]:
    """`sample` for a batch whose consecutive row groups each have their own parameters and generator; each
    group draws from its own generator exactly what `sample` would draw for it alone, so a seeded request
    gives the same tokens whatever else shares the batch. In one native call when no group truncates."""
    if len(groups) == 1:
        return sample(logits, groups[0].params, groups[0].generator)
    if native_sampling(logits) and all(untruncated(g.params) for g in groups):
        temps = torch.cat([torch.full((g.rows,), float(g.params.temperature)) for g in groups])
        draws = [torch.rand(g.rows, generator=g.generator) if g.params.temperature > 0 else torch.zeros(g.rows)
                 for g in groups]
        return native_sample(logits, temps, torch.cat(draws))
    tokens, logps, at = [], [], 0
    for g in groups:
        t, lp = sample(logits[at:at + g.rows], g.params, g.generator)
        tokens.append(t)
        logps.append(lp)
        at += g.rows
    return torch.cat(tokens), torch.cat(logps)


def top_logprobs(logits: Tensor, groups: Sequence[Group]) -> list[list[tuple[int, float]] | None]:
    """For the rows whose group asked for top_logprobs: the most likely tokens under softmax(logits / T), the
    distribution the chosen token's logprob is reported under (None for the other rows)."""
    tops: list[list[tuple[int, float]] | None] = []
    want, temps, ks = [], [], []
    for g in groups:
        on = g.params.logprobs and g.params.top_logprobs > 0
        for _ in range(g.rows):
            if on:
                want.append(len(tops))
                temps.append(g.params.temperature or 1.0)
                ks.append(g.params.top_logprobs)
            tops.append(None)
    if not want:
        return tops
    at = torch.tensor(want, device=logits.device)
    logp = (logits.index_select(0, at).float() / torch.tensor(temps, device=logits.device)[:, None]).log_softmax(-1)
    values, ids = logp.topk(min(max(ks), logp.shape[-1]), dim=-1)
    for j, (i, k) in enumerate(zip(want, ks)):
        tops[i] = list(zip(ids[j, :k].tolist(), values[j, :k].tolist()))
    return tops


def untruncated(params: SamplingParams) -> bool:
    """Sampling from the whole temperature-scaled distribution (what the native sampler covers)."""
    return params.top_k == 0 and params.top_p >= 1.0 and params.min_p <= 0


def categorical(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of probs [B, V] (rows need not sum to 1), by inverting the CDF at a uniform
    draw: one cumsum, far cheaper on the CPU than torch.multinomial."""
    cdf = probs.float().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    index = (cdf <= u).sum(-1)
    # Never land on a zero-probability token at the top end (u == total after rounding).
    return torch.minimum(index, (probs > 0).long().cumsum(-1).argmax(-1))


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return scaled.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
