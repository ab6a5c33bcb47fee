"""Engine: batched generation for a model (and optionally a Tokenizer, for text and stop strings).

`generate` returns whole completions; `stream` yields one event per generated token. Both drive one
DecodeBatch (minir1/engine/batch.py), as the server's scheduler does. `last_stats` describes the last run
(tokens, time, speculative acceptance).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor

from minir1.engine.batch import Completion, DecodeBatch, Emitted, StreamEvent
from minir1.engine.native import decoder_for
from minir1.engine.sampling import SamplingParams


class Engine:
    def __init__(self, model: Any, tokenizer: Any = None, fused: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.last_stats: dict[str, float] = {}
        # Every forward on the cache (prefill, decode, speculative verification, MTP draft) in one native
        # call when the model and machine allow it (minir1/engine/native/); the PyTorch path stays the
        # reference, and runs everything otherwise.
        self.fused = decoder_for(model) if fused else None

    def batch(self, *, speculative: bool = False, stream_text: bool = False) -> DecodeBatch:
        """An empty DecodeBatch on this engine's model, tokenizer and native decoder."""
        return DecodeBatch(self.model, self.tokenizer, fused=self.fused, speculative=speculative,
                           stream_text=stream_text)

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
        if params.speculative and not self.model.num_mtp_modules:
            raise ValueError("speculative=True needs a model with MTP modules (num_nextn_predict_layers > 0)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an Engine with a tokenizer")
        if params.top_logprobs:
            raise ValueError("top_logprobs is returned by the server's scheduler (minir1.serve.scheduler), not by "
                             "Engine.generate / Engine.stream")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of token-id lists")
        errors = [e for i, p in enumerate(prompts) if (e := self.check_prompt(i, p, params))]
        if errors:
            raise ValueError("; ".join(errors))
        return [p.tolist() if isinstance(p, Tensor) else list(p) for p in prompts]

    # -- public API --------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Generate `params.n` completions for each prompt; ordered by (prompt, sample)."""
        params = params or SamplingParams()
        runs = self._run(prompts, params, stream=False)
        batch, rows = next(runs)
        for _ in runs:
            pass
        return [batch.completion(r) for r in rows]

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Yield one StreamEvent per generated token, as soon as its step finishes."""
        params = params or SamplingParams()
        runs = self._run(prompts, params, stream=True)
        next(runs)
        for events in runs:
            for _, ev in events:
                yield ev

    # -- the loop --------------------------------------------------------------------------------------------
    def _run(self, prompts: Sequence[Sequence[int]], params: SamplingParams, stream: bool) -> Iterator[Any]:
        """Yields (batch, its rows) once, then each step's events: the prefill's first tokens, then a decode step's."""
        prompts = self._validate(prompts, params)
        model = self.model
        batch = self.batch(speculative=params.speculative, stream_text=stream)
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            events: Emitted = batch.add(prompts, params, params.generator(batch.device))
            yield batch, [row for row, _ in events]
            yield events
            if not stream and batch.finish():  # the whole decode in one native call, where it applies
                return
            while True:
                batch.retire()
                if not batch.rows:
                    break
                yield batch.step()
        finally:
            model.train(was_training)
            stats: dict[str, float] = dict(prompt_tokens=sum(len(p) for p in prompts), **batch.stats)
            stats["seconds"] = time.perf_counter() - start
            stats["tokens_per_s"] = stats["generated_tokens"] / max(stats["seconds"], 1e-9)
            if params.speculative:
                stats["acceptance_rate"] = stats["accepted"] / max(stats["proposed"], 1)
            self.last_stats = stats
