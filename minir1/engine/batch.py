"""DecodeBatch: the running batch every generating caller drives — `Engine.generate` and `Engine.stream`, the
server's continuous-batching scheduler, GRPO's rollouts (through `Engine.generate`).

    batch = DecodeBatch(model, tokenizer)
    batch.add(prompts, params)          # prefill: each prompt once, its n rows share the cached prefix
    while batch.rows:
        events = batch.step()           # every row one token (or two, speculative), [(row, StreamEvent)]
        batch.retire()                  # finished and cancelled rows leave; the cache is compacted

Rows may be added while others run (continuous batching): the new rows are prefilled on their own, then
their cache rows join the batch. Consecutive rows with the same SamplingParams object and generator sample
as one group (minir1/engine/sampling.py), so a seeded request gives the same tokens whatever shares the
batch. Speculative decoding (MTP drafts, minir1/engine/speculative.py) needs one SamplingParams for all rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from minir1.engine import speculative
from minir1.engine.cache import LatentCache, new_cache
from minir1.engine.sampling import (
    Group,
    SamplingParams,
    categorical,
    process_logits,
    sample_groups,
    top_logprobs,
    untruncated,
)
from minir1.models.base import ModelOutput


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int]              # generated tokens, the terminating stop token included
    text: str                         # decoded, without the stop token, cut before a stop string
    logprobs: list[float] | None      # per generated token, float32 (see minir1/engine/sampling.py)
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


@dataclass(eq=False)
class Row:
    """One sequence being generated: a prompt's sample."""
    prompt_index: int
    sample_index: int
    params: SamplingParams
    generator: torch.Generator
    stop_ids: set[int]
    owner: Any = None                 # the caller's handle for the row (the server's request)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    text_sent: int = 0                # characters of text already streamed
    stop_at: int = -1                 # character index where a stop string begins
    decoded: str = ""                 # the text of tokens[:read_offset], decoded incrementally
    prefix_offset: int = 0            # tokens[prefix_offset:read_offset] are decoded again as context
    read_offset: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def cancel(self) -> None:
        """The row leaves the batch at the next `retire`, whatever it was doing."""
        self.cancelled = True


Emitted = list[tuple[Row, StreamEvent]]


@dataclass
class _Prefill:
    cache: LatentCache
    logits: Tensor        # [rows, V]: the next-token logits of each row (prompt × sample)
    pos: Tensor           # [rows]: the next position each row writes
    fan_out: Tensor       # [rows]: the prompt of each row
    ids: Tensor           # [P, T] the padded prompts, and their positions (for the first MTP draft)
    positions: Tensor
    hidden: Tensor | None


class DecodeBatch:
    """Rows decoded together on one cache. `rows` are the active ones, in batch order."""

    def __init__(self, model: Any, tokenizer: Any = None, *, fused: Any = None, speculative: bool = False,
                 stream_text: bool = False) -> None:
        self.model, self.tokenizer, self.fused = model, tokenizer, fused
        self.speculative = speculative
        self.stream_text = stream_text and tokenizer is not None  # text per event, not only at the end
        self.rows: list[Row] = []
        self.stats = {"generated_tokens": 0, "steps": 0, "proposed": 0, "accepted": 0}
        self.device = model.device
        self._cache: LatentCache | None = None
        self._tokens = torch.zeros(0, dtype=torch.long, device=self.device)  # each row's last token ...
        self._pos = torch.zeros(0, dtype=torch.long, device=self.device)     # ... and the position it goes to
        self._draft: Tensor | None = None          # speculative: each row's MTP draft and its log-distribution
        self._draft_logp: Tensor | None = None
        self._groups: list[Group] = []             # of `rows`, recomputed when rows join or leave
        self._want_top = False                     # does any row want top_logprobs?

    def __len__(self) -> int:
        return len(self.rows)

    def stop_ids(self, params: SamplingParams) -> set[int]:
        if params.stop_token_ids is not None:
            return set(params.stop_token_ids)
        # The tokenizer's EOS; a config that lists several (Llama-3's end-of-turn ids) adds them all.
        eos = getattr(self.tokenizer, "eos_id", None)
        configured = self.model.config.eos_token_id
        ids = set(configured) if isinstance(configured, list) else set()
        if eos is None:
            eos = None if isinstance(configured, list) else configured
        return ids | ({eos} if eos is not None else set())

    # -- add rows --------------------------------------------------------------------------------------
    def add(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
            generators: torch.Generator | Sequence[torch.Generator] | None = None,
            owners: Sequence[Any] | None = None) -> Emitted:
        """Prefill `prompts` (prompt i with params[i]: params[i].n rows) and sample each new row's first token.
        One SamplingParams and generator may be given for all prompts. -> the first tokens' events."""
        P = len(prompts)
        if not P:
            return []
        V = self.model.config.vocab_size
        for i, pr in enumerate(prompts):  # Engine.check_prompt says more; this guards direct callers
            if not pr or any(not 0 <= t < V for t in pr):
                raise ValueError(f"prompt {i}: empty, or a token id outside the vocabulary [0, {V})")
        plist = [params] * P if isinstance(params, SamplingParams) else list(params)
        if len(plist) != P:
            raise ValueError(f"{P} prompts but {len(plist)} SamplingParams")
        if generators is None:
            generators = [p.generator(self.device) for p in plist]
        gens = [generators] * P if isinstance(generators, torch.Generator) else list(generators)
        if self.speculative and any(p is not plist[0] for p in plist + [r.params for r in self.rows]):
            raise ValueError("speculative decoding needs one SamplingParams for every row of the batch")
        rows = [Row(i, s, p, g, self.stop_ids(p), None if owners is None else owners[i])
                for i, (p, g) in enumerate(zip(plist, gens)) for s in range(p.n)]
        max_len = max(len(pr) + p.max_new_tokens for pr, p in zip(prompts, plist)) + 2
        with torch.inference_mode():
            pre = self._prefill(prompts, [p.n for p in plist], max_len)
            cache, pos = pre.cache, pre.pos
            groups = _groups(rows)
            tokens, logps = sample_groups(pre.logits, groups)
            tops = top_logprobs(pre.logits, groups) if any(_wants_top(g) for g in groups) else [None] * len(rows)
            if self.speculative:
                draft, draft_logp = self._first_draft(pre, tokens, plist[0], gens[0])
        if self._cache is None or not self.rows:
            self._cache = cache
        else:
            self._cache.extend(cache)
        self.rows += rows
        self._regroup()
        self._tokens, self._pos = torch.cat((self._tokens, tokens)), torch.cat((self._pos, pos))
        if self.speculative:
            self._draft = draft if self._draft is None else torch.cat((self._draft, draft))
            self._draft_logp = draft_logp if self._draft_logp is None else torch.cat((self._draft_logp, draft_logp))
        self.stats["steps"] += 1
        return self._emit(rows, [[t] for t in tokens.tolist()], [[x] for x in logps.tolist()], tops)

    # -- step ------------------------------------------------------------------------------------------
    def step(self) -> Emitted:
        """Every active row one decode step (speculative: one or two tokens) -> the new tokens' events."""
        if not self.rows:
            return []
        with torch.inference_mode():
            if self.speculative:
                new_tokens, new_logps = self._speculative_step()
                tops: list[Any] = [None] * len(self.rows)
            else:
                out = self._forward(self._tokens[:, None], self._pos[:, None])
                self._tokens, logps = sample_groups(out.logits[:, 0], self._groups)
                tops = top_logprobs(out.logits[:, 0], self._groups) if self._want_top else [None] * len(self.rows)
                self._pos = self._pos + 1
                new_tokens, new_logps = [[t] for t in self._tokens.tolist()], [[x] for x in logps.tolist()]
        self.stats["steps"] += 1
        return self._emit(self.rows, new_tokens, new_logps, tops)

    def finish(self) -> bool:
        """Every row decoded to its end in one native call, where the batch allows it: the native decoder, one
        group of rows sampling untruncated, no stop strings, top_logprobs, speculation or per-token text.
        The tokens, log-probabilities and finish reasons are the step loop's; the rows then leave the batch.
        The sampler's draws come from the rows' generator up front (minir1/engine/native/fused.py: generate),
        so that generator must not serve later work. -> False, changing nothing, where it does not apply:
        drive step/retire instead."""
        if not self.rows or self.speculative or self.stream_text or len(self._groups) != 1 or self._want_top:
            return False
        group, rows = self._groups[0], self.rows
        params = group.params
        if (not self._fused_ok(self._cache) or not untruncated(params) or params.stop
                or any(r.cancelled for r in rows)):
            return False
        with torch.inference_mode():
            tokens, logps, lengths, stopped, steps = self.fused.generate(
                self._cache.kv, [r.tokens for r in rows], [r.finish_reason == "stop" for r in rows], self._pos,
                params.max_new_tokens, sorted(rows[0].stop_ids), params.temperature, group.generator)
        generated = 0
        for i, (row, n) in enumerate(zip(rows, lengths.tolist())):
            before = len(row.tokens)
            if n > before:
                row.tokens += tokens[i, before:n].tolist()
                row.logprobs += logps[i, before:n].tolist()
                generated += n - before
            if row.finish_reason is None:
                row.finish_reason = "stop" if bool(stopped[i]) else "length"
        self.stats["generated_tokens"] += generated
        self.stats["steps"] += steps
        self.retire()
        return True

    def retire(self) -> list[Row]:
        """Finished and cancelled rows leave the batch (they stop costing compute) -> those rows."""
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return []
        gone = [r for r in self.rows if r.done]
        if not keep:
            self.rows, self._cache = [], None
            self._tokens, self._pos = self._tokens[:0], self._pos[:0]
            self._draft = self._draft_logp = None
            self._regroup()
            return gone
        index = torch.tensor(keep, device=self.device)
        self._cache.select(index)
        self._tokens, self._pos = self._tokens.index_select(0, index), self._pos.index_select(0, index)
        if self._draft is not None:
            self._draft, self._draft_logp = self._draft.index_select(0, index), self._draft_logp.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]
        self._regroup()
        return gone

    # -- reading rows -------------------------------------------------------------------------------------
    def completion(self, row: Row) -> Completion:
        return Completion(row.prompt_index, row.sample_index, list(row.tokens), self.text(row),
                          list(row.logprobs) if row.params.logprobs else None, row.finish_reason or "length")

    def text(self, row: Row) -> str:
        """The row's text so far: without a final stop token, cut before a stop string."""
        ids = row.tokens[:-1] if row.finish_reason == "stop" and row.tokens and row.tokens[-1] in row.stop_ids \
            else row.tokens
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
        return text[:row.stop_at] if row.stop_at >= 0 else text

    # -- internals ------------------------------------------------------------------------------------------
    def _regroup(self) -> None:
        self._groups = _groups(self.rows)
        self._want_top = any(_wants_top(g) for g in self._groups)

    def _emit(self, rows: list[Row], tokens: list[list[int]], logps: list[list[float]], tops: list[Any]) -> Emitted:
        """Record each row's new tokens; finish rows on a stop token, a stop string or the length limit."""
        events: Emitted = []
        generated = 0
        for row, toks, lps, top in zip(rows, tokens, logps, tops):
            params = row.params
            for tok, lp in zip(toks, lps):
                if row.finish_reason is not None or row.cancelled:
                    break
                generated += 1
                row.tokens.append(tok)
                row.logprobs.append(lp)
                if tok in row.stop_ids:
                    row.finish_reason = "stop"
                elif len(row.tokens) >= params.max_new_tokens:
                    row.finish_reason = "length"
                text = self._advance_text(row) if self.stream_text or params.stop else ""
                events.append((row, StreamEvent(row.prompt_index, row.sample_index, tok,
                                                lp if params.logprobs else None, text, row.finish_reason, top)))
        self.stats["generated_tokens"] += generated
        return events

    def _decode_new(self, row: Row) -> str:
        """The row's text so far, without re-decoding the whole row: only its new tokens, with a few before
        them as context (the prefix/read-offset method: a tokenizer that drops a word's leading space at
        the start of a decode gets it right). Tokens that end inside a multi-byte character wait until it
        is complete — unless the row has finished, when they are decoded as they are."""
        ids = row.tokens
        end = len(ids) - 1 if row.finish_reason == "stop" and ids and ids[-1] in row.stop_ids else len(ids)
        if end > row.read_offset:
            prefix = self.tokenizer.decode(ids[row.prefix_offset:row.read_offset])
            new = self.tokenizer.decode(ids[row.prefix_offset:end])
            if row.finish_reason or (len(new) > len(prefix) and not new.endswith("\ufffd")):
                row.decoded += new[len(prefix):]
                row.prefix_offset, row.read_offset = row.read_offset, end
        return row.decoded

    def _advance_text(self, row: Row) -> str:
        """The row's new text since the last call; finds stop strings. Text that may still turn into a stop
        string, or that ends in an incomplete UTF-8 sequence, is held back until it cannot."""
        full, stop = self._decode_new(row), row.params.stop
        if stop and row.finish_reason != "stop":
            longest = max(len(s) for s in stop)
            hits = [i for s in stop if (i := full.find(s, max(0, row.text_sent - longest))) >= 0]
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

    def _prefill(self, prompts: Sequence[Sequence[int]], samples: Sequence[int], max_len: int) -> _Prefill:
        """One forward over the right-padded prompts into a new cache, then fan-out: prompt i gets samples[i]
        rows, which share its cached prefix."""
        if self.fused is not None:
            self.fused.refresh()  # the weights may have changed since the last call (e.g. a GRPO update)
        device = self.device
        lengths = [len(p) for p in prompts]
        P, T = len(prompts), max(lengths)
        ids = torch.zeros(P, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        ids = ids.to(device)
        last = torch.tensor(lengths, device=device) - 1
        positions = torch.arange(T, device=device).expand(P, T)
        native = self.fused is not None and not self.model.training
        cache = new_cache(self.model, P, max_len, extra_layers=1 if self.speculative else 0,
                          dtype=torch.float32 if native else None)
        if self._fused_ok(cache) and not self.speculative:
            # Unpadded; with speculation (an MTP cache layer) the padded forward below gives hidden states.
            logits = self.fused.prefill(cache.kv, [list(p) for p in prompts])
            out = ModelOutput(logits=logits[:, None], hidden=None)
        else:
            out = self._forward(ids, positions, logits_at=last, cache=cache)
        fan_out = torch.arange(P, device=device).repeat_interleave(torch.tensor(samples, device=device))
        cache.select(fan_out)
        return _Prefill(cache, out.logits[:, 0].index_select(0, fan_out), (last + 1).index_select(0, fan_out),
                        fan_out, ids, positions, out.hidden)

    def _fused_ok(self, cache: LatentCache) -> bool:
        return self.fused is not None and not self.model.training and self.fused.supports(cache.kv)

    def _forward(self, ids: Tensor, positions: Tensor, logits_at: Tensor | None = None,
                 cache: LatentCache | None = None) -> ModelOutput:
        cache = cache or self._cache
        if self._fused_ok(cache):
            return self.fused.forward(cache.kv, ids, positions, logits_at)
        cache.set_positions(positions)
        return self.model(ids, positions=positions, cache=cache, return_dict=True, logits_at=logits_at)

    def _mtp(self, hidden: Tensor, next_ids: Tensor, positions: Tensor, cache: LatentCache | None = None) -> Tensor:
        cache = cache or self._cache
        if self._fused_ok(cache):
            return self.fused.mtp(cache.kv, hidden, next_ids, positions)
        cache.set_positions(positions)
        return self.model.mtp_draft(hidden, next_ids, positions, cache)

    def _first_draft(self, pre: _Prefill, tokens: Tensor, params: SamplingParams,
                     gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """The MTP draft after each new row's first token, from the prompt's hidden states."""
        next_ids = torch.cat((pre.ids[:, 1:], pre.ids[:, :1]), dim=1).index_select(0, pre.fan_out)
        rows = torch.arange(len(pre.fan_out))
        next_ids[rows, pre.pos - 1] = tokens
        mtp_logits = self._mtp(pre.hidden.index_select(0, pre.fan_out), next_ids,
                               pre.positions.index_select(0, pre.fan_out), pre.cache)
        draft_logp = process_logits(mtp_logits[rows, pre.pos - 1], params)
        draft = draft_logp.argmax(-1) if params.temperature == 0 else categorical(draft_logp.exp(), gen)
        return draft, draft_logp

    def _speculative_step(self) -> tuple[list[list[int]], list[list[float]]]:
        row = self.rows[0]
        step = speculative.step(self._forward, self._mtp, self._tokens, self._draft, self._draft_logp, self._pos,
                                row.params, row.generator)
        self._tokens, self._draft, self._draft_logp, self._pos = step.tokens, step.draft, step.draft_logp, step.pos
        self.stats["proposed"] += len(self.rows)
        self.stats["accepted"] += step.accepted
        return step.emitted, step.emitted_logprobs


def _wants_top(g: Group) -> bool:
    return g.params.logprobs and g.params.top_logprobs > 0


def _groups(rows: Sequence[Row]) -> list[Group]:
    """Runs of consecutive rows that share SamplingParams and generator."""
    groups: list[Group] = []
    for r in rows:
        if groups and groups[-1].params is r.params and groups[-1].generator is r.generator:
            groups[-1].rows += 1
        else:
            groups.append(Group(r.params, r.generator, 1))
    return groups
