"""Continuous batching (minir1/scheduler.py) without HTTP: requests that join a running batch get the same
tokens as the engine gives them alone; a cancelled request leaves the batch; bad requests are refused."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from minir1 import Engine, ModelConfig, SamplingParams, Transformer
from minir1.serve.scheduler import DONE, Scheduler


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(Transformer(ModelConfig.from_preset("tiny", vocab_size=120, max_position_embeddings=128)).eval())


def collect(s: Scheduler, prompt, params) -> list[int]:
    return [e.token_id for e in s.stream(prompt, params)]


def test_requests_joining_at_different_steps_match_the_engine(engine):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16]]
    greedy = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[])
    seeded = [SamplingParams(max_new_tokens=20, temperature=1.0, seed=i, stop_token_ids=[]) for i in range(4)]
    want_greedy = [c.token_ids for c in engine.generate(prompts, greedy)]
    want_seeded = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, seeded)]
    s = Scheduler(engine, max_batch=8)
    got: dict[tuple[str, int], list[int]] = {}

    def client(kind: str, i: int) -> None:
        time.sleep(0.003 * i)  # arrive while the others are decoding
        got[kind, i] = collect(s, prompts[i], greedy if kind == "greedy" else seeded[i])

    threads = [threading.Thread(target=client, args=(k, i)) for k in ("greedy", "seeded") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    assert [got["greedy", i] for i in range(4)] == want_greedy
    assert [got["seeded", i] for i in range(4)] == want_seeded
    assert s.stats["max_rows"] > 1 and s.stats["requests"] == 8


def test_n_samples_and_cancellation(engine):
    s = Scheduler(engine, max_batch=4)
    q: queue.Queue = queue.Queue()
    req = s.submit([1, 2, 3], SamplingParams(max_new_tokens=100, temperature=1.0, n=2, stop_token_ids=[]), q.put)
    first = q.get(timeout=10)
    assert first is not DONE and s.running == 2
    s.cancel(req)
    deadline = time.time() + 5
    while s.running and time.time() < deadline:
        time.sleep(0.01)
    assert s.running == 0 and s.stats["generated_tokens"] < 200
    s.close()


def test_bad_requests_are_refused_before_queueing(engine):
    s = Scheduler(engine, max_batch=2)
    with pytest.raises(ValueError, match="empty prompt"):
        s.submit([], SamplingParams(max_new_tokens=4), lambda _: None)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        s.submit([1] * 100, SamplingParams(max_new_tokens=40), lambda _: None)
    with pytest.raises(ValueError, match="max batch"):
        s.submit([1], SamplingParams(max_new_tokens=4, n=3), lambda _: None)
    with pytest.raises(ValueError, match="speculative"):
        s.submit([1], SamplingParams(max_new_tokens=4, speculative=True), lambda _: None)
    assert collect(s, [1, 2], SamplingParams(max_new_tokens=3, temperature=0, stop_token_ids=[]))  # still serving
    s.close()
