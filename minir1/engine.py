"""Inference engine: batched generation on MLA's latent KV cache, sampling, streaming, and MTP
self-speculative decoding.

What is here:
  SamplingParams, Completion, StreamEvent   the public data types
  LatentCache                                per layer and token only c_KV and k_R (DeepSeek-V2 §2.1.2),
                                             attended with the up-projections absorbed into q and o
  process_logits / sample                    temperature, top-k, top-p, min-p; log-probabilities
  Engine                                     prefill, decode steps, speculative steps, compaction

Log-probabilities. `Completion.logprobs[i]` is log softmax(logits / temperature) of the chosen token:
temperature-scaled, *not* truncated by top-k / top-p / min-p (temperature 0 gives the raw
log-softmax). A GRPO trainer that divides its logits by the same temperature computes the same
quantity for the new policy, so the ratio of the two is exactly the importance ratio.

Shape legend: B rows (prompt × sample) in the running batch, T new tokens this step, S cached
positions, H heads, C kv_lora_rank, R qk_rope_head_dim, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minir1.fused_decode import FusedDecoder, native_sample, native_sampling
from minir1.model import MLAttention, ModelOutput, Transformer

# --------------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------------


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


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int]              # generated tokens, the terminating stop token included
    text: str                         # decoded, without the stop token, cut before a stop string
    logprobs: list[float] | None      # per generated token, float32 (see the module docstring)
    finish_reason: str                # "stop" or "length"


@dataclass
class StreamEvent:
    prompt_index: int
    sample_index: int
    token_id: int
    logprob: float | None
    text: str                         # new text since the previous event of this row ("" if held back)
    finish_reason: str | None         # set on the row's last event
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log-probability), most likely first


# --------------------------------------------------------------------------------------------------
# The latent cache
# --------------------------------------------------------------------------------------------------


class LatentCache:
    """MLA's KV cache: for each layer and position, the normalised latent c_KV (C values) and the
    rotated shared rope key k_R (R values), in one buffer `kv` [layers, B, S, C + R].

    Positions are absolute: a row writes position p at index p, so a rejected speculative token or a
    padded prompt tail is simply overwritten later; attention only reads indices <= the query's
    position. The engine sets `positions` [B, T] before each forward.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.kv_rank = kv_rank
        self.kv = torch.zeros(n_layers, batch, max_len, kv_rank + rope_dim, dtype=dtype, device=device)
        self.positions: Tensor | None = None
        self._mask: Tensor | None = None
        self._span = 0

    def set_positions(self, positions: Tensor) -> None:
        """positions [B, T]: where this forward's tokens go; builds the attention mask once per step."""
        self.positions = positions
        B, T = positions.shape
        self._rows = torch.arange(B, device=positions.device)[:, None].expand(B, T)  # shared by every layer
        self._span = int(positions.max()) + 1
        keys = torch.arange(self._span, device=positions.device)
        hidden = keys > positions[..., None]                                      # [B, T, S]
        mask = torch.zeros(hidden.shape, dtype=self.kv.dtype, device=positions.device)
        self._mask = mask.masked_fill_(hidden, -math.inf)[:, :, None]             # [B, T, 1, S]

    def select(self, rows: Tensor) -> None:
        """Keep (or replicate) batch rows: compaction when rows finish, fan-out to n samples."""
        self.kv = self.kv.index_select(1, rows)

    def extend(self, other: LatentCache) -> None:
        """Append another cache's rows (continuous batching: newly prefilled requests join the batch);
        the shorter of the two is padded along the position axis."""
        S = max(self.kv.shape[2], other.kv.shape[2])
        pad = [F.pad(c, (0, 0, 0, S - c.shape[2])) for c in (self.kv, other.kv)]
        self.kv = torch.cat(pad, dim=1)

    def attend(self, attn: MLAttention, layer: int, q_nope: Tensor, q_rope: Tensor, latent: Tensor,
               rope_key: Tensor, scale: float) -> Tensor:
        """Write this step's latents, then attend over the cache with absorbed projections.

        DeepSeek-V2 §2.1.2: q_nope·k_nope = q_nope·(W_UK c) = (W_UK^T q_nope)·c, and the value
        up-projection W_UV moves after the attention-weighted sum of latents. Each query head thus
        attends directly over the C + R cached values, like multi-query attention with one shared head.
        """
        B, T, H, _ = q_nope.shape
        kv = self.kv[layer]
        kv[self._rows, self.positions] = torch.cat((latent, rope_key), dim=-1).to(kv.dtype)
        w = attn.kv_b_proj.weight.view(H, attn.nope_dim + attn.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, :attn.nope_dim], w[:, attn.nope_dim:]                  # [H, nope, C], [H, v, C]
        q_latent = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1), w_uk)  # [H, B*T, C]
        q = torch.cat((q_latent.transpose(0, 1).reshape(B, T, H, -1), q_rope), dim=-1)  # [B, T, H, C + R]
        keys = kv[:, :self._span]                                                 # [B, S, C + R]
        # One shared latent "head" for all query heads: a single batched matmul per step.
        scores = torch.bmm(q.view(B, T * H, -1), keys.transpose(1, 2)).view(B, T, H, -1)
        probs = torch.softmax(scores * scale + self._mask, dim=-1, dtype=torch.float32).to(q.dtype)
        out_latent = torch.bmm(probs.view(B, T * H, -1), keys[..., :self.kv_rank])  # [B, T*H, C]
        out = torch.bmm(out_latent.view(B * T, H, -1).transpose(0, 1), w_uv.transpose(1, 2))  # [H, B*T, v]
        return out.transpose(0, 1).reshape(B, T, H, -1)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    prompt_index: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    text_sent: int = 0    # characters of text already streamed
    stop_at: int = -1     # character index where a stop string begins


@dataclass
class _Prefill:
    cache: LatentCache
    logits: Tensor        # [rows, V]: the next-token logits of each row (prompt × sample)
    pos: Tensor           # [rows]: the next position each row writes
    fan_out: Tensor       # [rows]: the prompt of each row
    ids: Tensor           # [P, T] the padded prompts, and their positions
    positions: Tensor
    out: Any              # the model's output (hidden states, for the MTP draft)


class Engine:
    """Batched generation for a Transformer (and optionally a Tokenizer, for text and stop strings).

    `generate` returns whole completions; `stream` yields one event per generated token. Both run
    the same step function. `last_stats` describes the last run (tokens, time, speculative acceptance).
    """

    def __init__(self, model: Transformer, tokenizer: Any = None, fused: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.last_stats: dict[str, float] = {}
        # Every forward on the cache (prefill, decode, speculative verification, MTP draft) in one native
        # call when the model and machine allow it (minir1/fused_decode.py); the PyTorch path below stays
        # the reference, and runs everything otherwise.
        self.fused = FusedDecoder.for_model(model) if fused else None

    # -- validation ------------------------------------------------------------------------------------
    def check_prompt(self, index: int, prompt: Sequence[int], params: SamplingParams) -> str | None:
        """The problem with one prompt, or None: the scheduler of a server rejects one bad request
        without touching the others."""
        cfg = self.model.config
        if not isinstance(prompt, (list, tuple)) and not (isinstance(prompt, Tensor) and prompt.dim() == 1):
            return f"prompt {index}: expected a list of token ids, got {type(prompt).__name__}"
        ids = prompt.tolist() if isinstance(prompt, Tensor) else list(prompt)
        if not ids:
            return f"prompt {index}: empty prompt (it needs at least one token)"
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < cfg.vocab_size]
        if bad:
            return f"prompt {index}: token id {bad[0]!r} is outside the vocabulary [0, {cfg.vocab_size})"
        total = len(ids) + params.max_new_tokens + (1 if params.speculative else 0)
        if total > cfg.max_position_embeddings:
            return (f"prompt {index}: {len(ids)} prompt tokens + max_new_tokens {params.max_new_tokens} = {total} "
                    f"exceeds max_position_embeddings {cfg.max_position_embeddings}")
        return None

    def _validate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        params.validate()
        if params.speculative and not len(self.model.mtp):
            raise ValueError("speculative=True needs a model with MTP modules (num_nextn_predict_layers > 0)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an Engine with a tokenizer")
        if params.top_logprobs:
            raise ValueError("top_logprobs is returned by the server's scheduler (minir1.scheduler), not by "
                             "Engine.generate / Engine.stream")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of token-id lists")
        errors = [e for i, p in enumerate(prompts) if (e := self.check_prompt(i, p, params))]
        if errors:
            raise ValueError("; ".join(errors))
        return [p.tolist() if isinstance(p, Tensor) else list(p) for p in prompts]

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        if params.stop_token_ids is not None:
            return set(params.stop_token_ids)
        eos = getattr(self.tokenizer, "eos_id", None)
        eos = self.model.config.eos_token_id if eos is None else eos
        return set() if eos is None else {eos}

    # -- public API --------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Generate `params.n` completions for each prompt; ordered by (prompt, sample)."""
        params = params or SamplingParams()
        rows: list[_Row] = []
        for snapshot in self._run(prompts, params, stream=False):
            rows = snapshot
        return [self._completion(r, params) for r in rows]

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Yield one StreamEvent per generated token, as soon as its step finishes."""
        params = params or SamplingParams()
        for events in self._run(prompts, params, stream=True):
            yield from events

    # -- helpers -----------------------------------------------------------------------------------------
    def _text(self, row: _Row, stop_ids: set[int]) -> str:
        ids = row.tokens[:-1] if row.finish_reason == "stop" and row.tokens and row.tokens[-1] in stop_ids \
            else row.tokens
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
        return text[:row.stop_at] if row.stop_at >= 0 else text

    def _advance_text(self, row: _Row, params: SamplingParams, stop_ids: set[int]) -> str:
        """The row's new text since the last call; finds stop strings. Text that may still turn into
        a stop string, or that ends in an incomplete UTF-8 sequence, is held back until it cannot."""
        full = self._text(row, stop_ids)
        if params.stop and row.finish_reason != "stop":
            longest = max(len(s) for s in params.stop)
            hits = [i for s in params.stop if (i := full.find(s, max(0, row.text_sent - longest))) >= 0]
            if hits:
                row.stop_at, row.finish_reason = min(hits), "stop"
                full = full[:row.stop_at]
            elif not row.finish_reason:
                full = full[:max(row.text_sent, len(full) - longest + 1)]
        if not row.finish_reason and full.endswith("\ufffd"):
            full = full[:row.text_sent]
        text = full[row.text_sent:]
        row.text_sent = max(row.text_sent, len(full))
        return text

    def _completion(self, row: _Row, params: SamplingParams) -> Completion:
        return Completion(row.prompt_index, row.sample_index, list(row.tokens),
                          self._text(row, self._stop_ids(params)),
                          list(row.logprobs) if params.logprobs else None, row.finish_reason or "length")

    def _append(self, row: _Row, tok: int, lp: float, params: SamplingParams, stop_ids: set[int],
                need_text: bool) -> str:
        """Record one generated token; finish the row on a stop token, a stop string or the length
        limit; returns the row's new text (when text is needed)."""
        row.tokens.append(tok)
        row.logprobs.append(lp)
        if tok in stop_ids:
            row.finish_reason = "stop"
        elif len(row.tokens) >= params.max_new_tokens:
            row.finish_reason = "length"
        return self._advance_text(row, params, stop_ids) if need_text else ""

    def _prefill(self, prompts: Sequence[Sequence[int]], samples: Sequence[int], max_len: int,
                 n_layers: int) -> _Prefill:
        """One forward over the right-padded prompts into a new cache, then fan-out: prompt i gets
        samples[i] rows, which share its cached prefix."""
        cfg = self.model.config
        device = next(self.model.parameters()).device
        if self.fused is not None:
            self.fused.refresh()  # the weights may have changed since the last call (e.g. a GRPO update)
        lengths = [len(p) for p in prompts]
        P, T = len(prompts), max(lengths)
        ids = torch.zeros(P, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        ids = ids.to(device)
        last = torch.tensor(lengths, device=device) - 1
        positions = torch.arange(T, device=device).expand(P, T)
        cache = LatentCache(n_layers, P, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                            self.model.embed_tokens.weight.dtype, device)
        if self._fused_ok(cache) and n_layers == cfg.num_hidden_layers:
            # Unpadded; with speculation (an MTP cache layer) the padded forward below gives hidden states.
            logits = self.fused.prefill(cache.kv, [list(p) for p in prompts])
            out = ModelOutput(logits=logits[:, None], hidden=None)
        else:
            out = self._forward(cache, ids, positions, logits_at=last)
        fan_out = torch.arange(P, device=device).repeat_interleave(torch.tensor(samples, device=device))
        cache.select(fan_out)
        return _Prefill(cache, out.logits[:, 0].index_select(0, fan_out), (last + 1).index_select(0, fan_out),
                        fan_out, ids, positions, out)

    def _fused_ok(self, cache: LatentCache) -> bool:
        return self.fused is not None and not self.model.training and self.fused.supports(cache.kv)

    def _forward(self, cache: LatentCache, ids: Tensor, positions: Tensor, logits_at: Tensor | None = None):
        if self._fused_ok(cache):
            return self.fused.forward(cache.kv, ids, positions, logits_at)
        cache.set_positions(positions)
        return self.model(ids, positions=positions, cache=cache, return_dict=True, logits_at=logits_at)

    def _mtp(self, cache: LatentCache, hidden: Tensor, next_ids: Tensor, positions: Tensor) -> Tensor:
        """MTP depth 1 over the given positions: hidden h_i and token t_{i+1} -> logits for t_{i+2}."""
        if self._fused_ok(cache):
            return self.fused.mtp(cache.kv, hidden, next_ids, positions)
        model, module = self.model, self.model.mtp[0]
        cache.set_positions(positions)
        cos, sin = model.rotary(positions, hidden.dtype)
        h = module(hidden, model.embed_tokens(next_ids), cos, sin, model.rotary.softmax_scale, cache)
        return model.lm_head(module.norm(h))

    # -- the loop --------------------------------------------------------------------------------------------
    def _run(self, prompts: Sequence[Sequence[int]], params: SamplingParams, stream: bool):
        """Yields, after each step, the stream events of that step (stream=True) or the rows."""
        prompts = self._validate(prompts, params)
        model, cfg = self.model, self.model.config
        stop_ids = self._stop_ids(params)
        spec = params.speculative
        device = next(model.parameters()).device
        gen = torch.Generator(device=device)
        gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        n, P = params.n, len(prompts)
        rows = [_Row(p, s) for p in range(P) for s in range(n)]
        active = list(range(len(rows)))        # batch slot -> row
        lengths = [len(p) for p in prompts]
        max_len = max(lengths) + params.max_new_tokens + 2
        n_layers = cfg.num_hidden_layers + (1 if spec else 0)
        was_training = model.training
        model.eval()
        stats = dict(prompt_tokens=sum(lengths), generated_tokens=0, steps=0, proposed=0, accepted=0)
        start = time.perf_counter()

        need_text = bool(params.stop) or (stream and self.tokenizer is not None)

        def emit(slot_tokens: list[list[int]], slot_logprobs: list[list[float]]) -> list[StreamEvent]:
            """Record each slot's new tokens; finish rows on a stop token, stop string or length."""
            events = []
            for slot, (toks, lps) in enumerate(zip(slot_tokens, slot_logprobs)):
                row = rows[active[slot]]
                for tok, lp in zip(toks, lps):
                    if row.finish_reason:
                        break
                    stats["generated_tokens"] += 1
                    text = self._append(row, tok, lp, params, stop_ids, need_text)
                    if stream:
                        events.append(StreamEvent(row.prompt_index, row.sample_index, tok,
                                                  lp if params.logprobs else None, text, row.finish_reason))
            return events

        try:
            # ---- prefill: each prompt once, right-padded; its n samples then share the cache ----------
            with torch.inference_mode():
                pre = self._prefill(prompts, [n] * P, max_len, n_layers)
                cache, fan_out, ids, positions, out = pre.cache, pre.fan_out, pre.ids, pre.positions, pre.out
                tokens, logps = sample(pre.logits, params, gen)
                pos = pre.pos
                if spec:
                    next_ids = torch.cat((ids[:, 1:], ids[:, :1]), dim=1).index_select(0, fan_out)
                    next_ids[torch.arange(len(rows)), pos - 1] = tokens
                    mtp_logits = self._mtp(cache, out.hidden.index_select(0, fan_out), next_ids,
                                           positions.index_select(0, fan_out))
                    draft_logits = mtp_logits[torch.arange(len(rows)), pos - 1]
                    draft_logp = process_logits(draft_logits, params)
                    draft = draft_logp.argmax(-1) if params.temperature == 0 else categorical(draft_logp.exp(), gen)
            stats["steps"] += 1
            events = emit([[t] for t in tokens.tolist()], [[x] for x in logps.tolist()])
            yield events if stream else rows

            # ---- decode -------------------------------------------------------------------------------------
            while True:
                keep = [slot for slot, r in enumerate(active) if not rows[r].finish_reason]
                if not keep:
                    break
                if len(keep) < len(active):  # compaction: finished rows stop costing compute
                    index = torch.tensor(keep, device=device)
                    cache.select(index)
                    tokens, pos = tokens.index_select(0, index), pos.index_select(0, index)
                    if spec:
                        draft, draft_logp = draft.index_select(0, index), draft_logp.index_select(0, index)
                    active = [active[s] for s in keep]
                with torch.inference_mode():
                    if not spec:
                        out = self._forward(cache, tokens[:, None], pos[:, None])
                        tokens, logps = sample(out.logits[:, 0], params, gen)
                        pos = pos + 1
                        new_tokens, new_logps = [[t] for t in tokens.tolist()], [[x] for x in logps.tolist()]
                    else:
                        (tokens, draft, draft_logp, pos, new_tokens, new_logps) = self._speculative_step(
                            cache, tokens, draft, draft_logp, pos, params, gen, stats)
                stats["steps"] += 1
                events = emit(new_tokens, new_logps)
                yield events if stream else rows
        finally:
            model.train(was_training)
            stats["seconds"] = time.perf_counter() - start
            stats["tokens_per_s"] = stats["generated_tokens"] / max(stats["seconds"], 1e-9)
            if spec:
                stats["acceptance_rate"] = stats["accepted"] / max(stats["proposed"], 1)
            self.last_stats = stats

    def _speculative_step(self, cache: LatentCache, tokens: Tensor, draft: Tensor, draft_logp: Tensor, pos: Tensor,
                          params: SamplingParams, gen: torch.Generator, stats: dict):
        """Verify one MTP draft with one forward of the main model over [current token, draft].

        Speculative rejection sampling (Leviathan et al., 2023): accept the draft d with probability
        min(1, p(d)/q(d)), else resample from normalise(max(0, p - q)); on acceptance the main model's
        next distribution gives one more token for free. With temperature 0 both p and q are one-hot,
        so this is exactly greedy decoding.
        """
        B = tokens.shape[0]
        arange = torch.arange(B, device=tokens.device)
        ids = torch.stack((tokens, draft), dim=1)                                # [B, 2]
        positions = torch.stack((pos, pos + 1), dim=1)
        out = self._forward(cache, ids, positions)
        target0 = process_logits(out.logits[:, 0], params)                       # log p for the draft's slot
        p_d, q_d = target0[arange, draft].exp(), draft_logp[arange, draft].exp()
        if params.temperature == 0:
            accept = p_d > 0
        else:
            accept = torch.rand(B, generator=gen, device=tokens.device) * q_d < p_d
        residual = (target0.exp() - draft_logp.exp()).clamp_min(0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target0.exp())
        if params.temperature == 0:
            correction = target0.argmax(-1)
        else:
            correction = categorical(residual, gen)
        bonus, bonus_lp = sample(out.logits[:, 1], params, gen)
        first = torch.where(accept, draft, correction)
        first_lp = token_logprobs(out.logits[:, 0], first, params.temperature)
        stats["proposed"] += B
        stats["accepted"] += int(accept.sum())
        # MTP over the two new positions: [h_p, t_{p+1}] always valid, [h_{p+1}, t_{p+2}] only if accepted
        # (otherwise it is overwritten next step). The next draft comes from the last valid one.
        next_ids = torch.stack((first, torch.where(accept, bonus, first)), dim=1)
        mtp_logits = self._mtp(cache, out.hidden, next_ids, positions)
        a = accept.long()
        new_draft_logp = process_logits(mtp_logits[arange, a], params)
        new_draft = (new_draft_logp.argmax(-1) if params.temperature == 0 else
                     categorical(new_draft_logp.exp(), gen))
        new_tokens = torch.where(accept, bonus, first)
        acc, f, fl, b, bl = accept.tolist(), first.tolist(), first_lp.tolist(), bonus.tolist(), bonus_lp.tolist()
        emitted = [[f[i], b[i]] if acc[i] else [f[i]] for i in range(B)]
        emitted_lp = [[fl[i], bl[i]] if acc[i] else [fl[i]] for i in range(B)]
        return new_tokens, new_draft, new_draft_logp, pos + 1 + a, emitted, emitted_lp
