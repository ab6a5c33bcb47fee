"""Continuous batching for serving: requests from many clients share one running batch on the latent cache.

A request joins at the next step (its prompt is prefilled, then its rows are appended to the batch); a
row that finishes, or whose client went away, leaves the batch at once. One background thread owns the
model and drives the engine's DecodeBatch step after step; clients receive StreamEvents through a
callback (thread-safe queues for threads, `call_soon_threadsafe` for asyncio).

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

from minir1.engine import Engine, Row, SamplingParams, StreamEvent
from minir1.engine.batch import Emitted

DONE = None  # the last thing a request's callback receives (or an Exception)


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    deliver: Callable[[StreamEvent | Exception | None], None]
    id: int = 0
    cancelled: bool = False
    rows: list[Row] = field(default_factory=list)
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
        self._batch = engine.batch(stream_text=True)
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closing = False
        self._abort = False
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
        return len(self._batch.rows)

    def _requests_in_flight(self) -> list[Request]:
        return list({id(row.owner): row.owner for row in self._batch.rows}.values())

    # -- the loop ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._batch.rows and not self._waiting and not self._closing:
                    self._cond.wait()
                if self._abort:
                    for r in self._requests_in_flight() + list(self._waiting):
                        r.cancelled = True
                        r.deliver(ServerShuttingDown("the server shut down before this request finished"))
                    self._waiting.clear()
                    self._batch = self.engine.batch(stream_text=True)
                    return
                if self._closing and not self._batch.rows and not self._waiting:
                    return
                admit = self._admit()
            try:
                self._cancel_rows()
                if admit:
                    self._prefill(admit)
                self._batch.retire()
                if self._batch.rows:
                    self._deliver(self._batch.step())
                    self.stats["steps"] += 1
                    self._batch.retire()
            except Exception as e:  # a bug or out-of-memory: fail the requests in flight, keep serving
                for req in {id(r): r for r in self._requests_in_flight() + admit}.values():
                    req.cancelled = True
                    req.deliver(e)
                self._batch = self.engine.batch(stream_text=True)

    def _admit(self) -> list[Request]:
        """The waiting requests that fit in the batch now (one at least when it is empty)."""
        admit = []
        rows = len(self._batch.rows)
        while self._waiting and (rows + self._waiting[0].params.n <= self.max_batch or not rows):
            req = self._waiting.popleft()
            if req.cancelled:
                continue
            admit.append(req)
            rows += req.params.n
        return admit

    def _cancel_rows(self) -> None:
        """The rows of requests whose client went away leave the batch at the next retire."""
        for row in self._batch.rows:
            if row.owner.cancelled:
                row.cancel()

    def _prefill(self, reqs: list[Request]) -> None:
        self.stats["requests"] += len(reqs)
        events = self._batch.add([r.prompt for r in reqs], [r.params for r in reqs], owners=reqs)
        for row, _ in events:
            row.owner.rows.append(row)
        self._deliver(events)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._batch.rows))

    def _deliver(self, events: Emitted) -> None:
        for row, ev in events:
            req = row.owner
            if req.cancelled:
                continue
            self.stats["generated_tokens"] += 1
            req.deliver(StreamEvent(0, ev.sample_index, ev.token_id, ev.logprob, ev.text, ev.finish_reason,
                                    ev.top_logprobs))
            if row.finish_reason:
                req.finished_rows += 1
                if req.finished_rows == req.params.n:
                    req.deliver(DONE)
