"""Continuous batching for serving: requests from many clients share one running batch on the latent cache.

A request joins at the next step (its prompt is prefilled, then its rows are appended to the batch); a
row that finishes, or whose client went away, leaves the batch at once. One background thread owns the
model and runs the engine's own forward and sampling functions step after step; clients receive
StreamEvents through a callback (thread-safe queues for threads, `call_soon_threadsafe` for asyncio).

Each request keeps its own sampling parameters and random generator, so a seeded request gives the same
tokens whatever else shares the batch. MTP speculative decoding is not used here (rows would advance by
different numbers of tokens per step); `speculative=True` is refused.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from minir1.engine import Engine, LatentCache, SamplingParams, StreamEvent, _Row, sample, untruncated
from minir1.fused_decode import native_sample, native_sampling

DONE = None  # the last thing a request's callback receives (or an Exception)


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    deliver: Callable[[StreamEvent | Exception | None], None]
    id: int = 0
    cancelled: bool = False
    rows: list[_Row] = field(default_factory=list)
    generator: torch.Generator | None = None
    stop_ids: set[int] = field(default_factory=set)
    finished_rows: int = 0


class ServerShuttingDown(RuntimeError):
    pass


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch ({max_batch}) must be >= 1")
        self.engine, self.max_batch = engine, max_batch
        if engine.fused is not None:  # one core stays with the HTTP side (see FusedDecoder.threads)
            engine.fused.threads = max(1, torch.get_num_threads() - 1)
        model = engine.model
        self.device = next(model.parameters()).device
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closing = False
        self._abort = False
        self._slots: list[tuple[Request, _Row]] = []
        self._cache: LatentCache | None = None
        self._tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self.stats = {"steps": 0, "generated_tokens": 0, "max_rows": 0, "requests": 0}
        self._thread = threading.Thread(target=self._loop, name="minir1-scheduler", daemon=True)
        self._thread.start()

    # -- client side ---------------------------------------------------------------------------------------
    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError for a request the engine cannot serve (nothing is queued)."""
        params.validate()
        if params.speculative:
            raise ValueError("speculative decoding is not available in the continuous-batching server")
        if params.n > self.max_batch:
            raise ValueError(f"n ({params.n}) exceeds the server's max batch ({self.max_batch})")
        if params.stop and self.engine.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        problem = self.engine.check_prompt(0, prompt, params)
        if problem:
            raise ValueError(problem.removeprefix("prompt 0: "))

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               deliver: Callable[[StreamEvent | Exception | None], None]) -> Request:
        self.check(prompt, params)
        req = Request(list(prompt), params, deliver, id=next(self._ids))
        with self._cond:
            if self._closing:
                raise ServerShuttingDown("the server is shutting down")
            self._waiting.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: its rows leave the batch before the next step."""
        req.cancelled = True
        with self._cond:
            self._cond.notify()

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[StreamEvent]:
        """Blocking iterator over one request's events (for threads and tests)."""
        q: queue.Queue = queue.Queue()
        req = self.submit(prompt, params, q.put)
        try:
            while (item := q.get()) is not DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.cancel(req)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests; let those in flight finish (up to `timeout` seconds), then end the rest
        with ServerShuttingDown."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify()
            self._thread.join()

    @property
    def running(self) -> int:
        return len(self._slots)

    def _requests_in_flight(self) -> list[Request]:
        return list({id(r): r for r, _ in self._slots}.values())

    # -- the loop ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._slots and not self._waiting and not self._closing:
                    self._cond.wait()
                if self._abort:
                    for r in self._requests_in_flight() + list(self._waiting):
                        r.cancelled = True
                        r.deliver(ServerShuttingDown("the server shut down before this request finished"))
                    self._waiting.clear()
                    self._slots = []
                    return
                if self._closing and not self._slots and not self._waiting:
                    return
                admit = []
                rows = len(self._slots)
                while self._waiting and (rows + self._waiting[0].params.n <= self.max_batch or not rows):
                    req = self._waiting.popleft()
                    if req.cancelled:
                        continue
                    admit.append(req)
                    rows += req.params.n
            try:
                with torch.inference_mode():
                    if admit:
                        self._prefill(admit)
                    self._drop_finished()
                    if self._slots:
                        self._step()
                        self._drop_finished()
            except Exception as e:  # a bug or out-of-memory: fail the requests in flight, keep serving
                for req in {id(r): r for r in self._requests_in_flight() + admit}.values():
                    req.cancelled = True
                    req.deliver(e)
                self._slots, self._cache = [], None
                self._tokens, self._pos = self._tokens[:0], self._pos[:0]

    def _prefill(self, reqs: list[Request]) -> None:
        engine = self.engine
        max_len = max(len(r.prompt) + r.params.max_new_tokens for r in reqs) + 2
        pre = engine._prefill([r.prompt for r in reqs], [r.params.n for r in reqs], max_len,
                              engine.model.config.num_hidden_layers)
        new_slots: list[tuple[Request, _Row]] = []
        for r in reqs:
            r.generator = torch.Generator(device=self.device)
            r.generator.manual_seed(r.params.seed if r.params.seed is not None
                                    else int(torch.randint(0, 2**62, (1,)).item()))
            r.stop_ids = engine._stop_ids(r.params)
            r.rows = [_Row(0, s) for s in range(r.params.n)]
            new_slots += [(r, row) for row in r.rows]
            self.stats["requests"] += 1
        tokens, logps = self._sample(pre.logits, new_slots)
        tops = self._top_logprobs(pre.logits, new_slots)
        if self._cache is None or not self._slots:
            self._cache = pre.cache
        else:
            self._cache.extend(pre.cache)
        self._slots += new_slots
        self._tokens = torch.cat((self._tokens, tokens))
        self._pos = torch.cat((self._pos, pre.pos))
        self._emit(new_slots, tokens.tolist(), logps, tops)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._slots))

    def _step(self) -> None:
        out = self.engine._forward(self._cache, self._tokens[:, None], self._pos[:, None])
        tokens, logps = self._sample(out.logits[:, 0], self._slots)
        tops = self._top_logprobs(out.logits[:, 0], self._slots)
        self._pos = self._pos + 1
        self._tokens = tokens
        self._emit(self._slots, tokens.tolist(), logps, tops)
        self.stats["steps"] += 1

    def _sample(self, logits: Tensor, slots: list[tuple[Request, _Row]]) -> tuple[Tensor, list[float]]:
        """Each request's rows with its own parameters and generator: in one native call when no request
        truncates its distribution (each draws its uniforms from its own generator, as `sample` would)."""
        if native_sampling(logits) and all(untruncated(r.params) for r, _ in slots):
            temps = torch.tensor([r.params.temperature for r, _ in slots])
            draws = [torch.rand(count, generator=r.generator) if r.params.temperature > 0 else torch.zeros(count)
                     for r, count in self._row_counts(slots)]
            tokens, logps = native_sample(logits, temps, torch.cat(draws))
            return tokens, logps.tolist()
        tokens = torch.empty(len(slots), dtype=torch.long, device=logits.device)
        logps = torch.empty(len(slots), device=logits.device)
        by_request: dict[int, list[int]] = {}
        for i, (r, _) in enumerate(slots):
            by_request.setdefault(id(r), []).append(i)
        for index in by_request.values():
            r = slots[index[0]][0]
            at = torch.tensor(index, device=logits.device)
            t, lp = sample(logits.index_select(0, at), r.params, r.generator)
            tokens[at], logps[at] = t, lp
        return tokens, logps.tolist()

    @staticmethod
    def _row_counts(slots: list[tuple[Request, _Row]]) -> list[tuple[Request, int]]:
        """Consecutive runs of one request's rows (a request's rows are always adjacent in the batch)."""
        runs: list[tuple[Request, int]] = []
        for r, _ in slots:
            if runs and runs[-1][0] is r:
                runs[-1] = (r, runs[-1][1] + 1)
            else:
                runs.append((r, 1))
        return runs

    @staticmethod
    def _top_logprobs(logits: Tensor, slots: list[tuple[Request, _Row]]) -> list[list[tuple[int, float]] | None]:
        """For the rows whose request asked for top_logprobs: the most likely tokens under softmax(logits / T),
        the distribution the chosen token's logprob is reported under."""
        tops: list[list[tuple[int, float]] | None] = [None] * len(slots)
        want = [i for i, (r, _) in enumerate(slots) if r.params.logprobs and r.params.top_logprobs > 0]
        if not want:
            return tops
        at = torch.tensor(want, device=logits.device)
        temps = torch.tensor([slots[i][0].params.temperature or 1.0 for i in want], device=logits.device)
        logp = (logits.index_select(0, at).float() / temps[:, None]).log_softmax(-1)
        k = max(slots[i][0].params.top_logprobs for i in want)
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        for j, i in enumerate(want):
            n = slots[i][0].params.top_logprobs
            tops[i] = list(zip(ids[j, :n].tolist(), values[j, :n].tolist()))
        return tops

    def _emit(self, slots: list[tuple[Request, _Row]], tokens: list[int], logps: list[float],
              tops: list[list[tuple[int, float]] | None]) -> None:
        for (r, row), tok, lp, top in zip(slots, tokens, logps, tops):
            if row.finish_reason or r.cancelled:
                continue
            self.stats["generated_tokens"] += 1
            text = self.engine._append(row, tok, lp, r.params, r.stop_ids, self.engine.tokenizer is not None)
            r.deliver(StreamEvent(0, row.sample_index, tok, lp if r.params.logprobs else None, text,
                                  row.finish_reason, top))
            if row.finish_reason:
                r.finished_rows += 1
                if r.finished_rows == len(r.rows):
                    r.deliver(DONE)

    def _drop_finished(self) -> None:
        keep = [i for i, (r, row) in enumerate(self._slots) if not row.finish_reason and not r.cancelled]
        if len(keep) == len(self._slots):
            return
        if not keep:
            self._slots, self._cache = [], None
            self._tokens, self._pos = self._tokens[:0], self._pos[:0]
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.select(index)
        self._tokens, self._pos = self._tokens.index_select(0, index), self._pos.index_select(0, index)
        self._slots = [self._slots[i] for i in keep]

