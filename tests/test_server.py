"""`minir1 serve` as a real process: the official `openai` client, streaming and reasoning_content, errors as
the client's typed exceptions, continuous batching under 32 concurrent clients, disconnects, SIGTERM, the web
page in headless Chromium, and schemathesis fuzzing of the server's own OpenAPI schema."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from minir1 import ModelConfig, Transformer
from minir1.train import TrainConfig, train
from minir1.train.sft import SFTStage

KEY = "test-key-123"
ANSWER = "<think>\nadd the two\n</think>\n<answer>5</answer>"
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    """A tiny model taught (by a short SFT) to answer every question with a fixed <think>/<answer> reply."""
    out = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tiny_tokenizer.vocab_size, hidden_size=64,
                                                num_attention_heads=2, intermediate_size=128,
                                                moe_intermediate_size=32, max_position_embeddings=256))
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]
             for q in ("What is 2 + 3?", "2 + 3?", "hello", "Add 2 and 3")]
    stage = SFTStage(tiny_tokenizer, 64, 8, conversations=convs * 4)
    train(model, tiny_tokenizer, stage, TrainConfig(out=str(out), steps=80, batch_size=8, seq_len=64, lr=3e-3,
                                                    progress=False))
    return out


class Server:
    def __init__(self, ckpt: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "minir1", "serve", "--ckpt", str(ckpt), "--port",
                                      str(self.port), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--api-key", KEY, "--served-model-name", "tiny-r1", "--max-batch", "32")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-r1"]
    assert server.health()["status"] == "ok"


def test_chat_completion_splits_reasoning_from_content(client, tiny_tokenizer):
    r = client.chat.completions.create(model="tiny-r1", messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                       temperature=0, max_tokens=40, seed=1,
                                       extra_body={"some_future_option": True, "logit_bias": {}})
    msg = r.choices[0].message
    assert msg.reasoning_content == "add the two" and msg.content == "5"
    assert r.choices[0].finish_reason == "stop"
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}])
    completion = tiny_tokenizer.encode(ANSWER.removeprefix("<think>\n")) + [tiny_tokenizer.eos_id]
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(completion)
    assert r.usage.total_tokens == len(prompt) + len(completion)
    reasoning = len(tiny_tokenizer.encode("add the two\n</think>"))
    assert r.usage.completion_tokens_details.reasoning_tokens == reasoning


def test_streaming_chat_matches_the_whole_response(client):
    stream = client.chat.completions.create(model="tiny-r1", messages=[{"role": "user", "content": "2 + 3?"}],
                                            temperature=0, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True})
    reasoning, content, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta
            r, t = getattr(d, "reasoning_content", None), d.content
            assert not (r and t), "a delta carries reasoning or content, never both"
            reasoning += r or ""
            content += t or ""
            finish = c.finish_reason or finish
    assert (reasoning.strip(), content.strip(), finish) == ("add the two", "5", "stop")
    assert usage.completion_tokens > 0 and usage.completion_tokens_details.reasoning_tokens > 0


def test_completions_endpoint_and_n(client):
    r = client.completions.create(model="tiny-r1", prompt="1 + 1", max_tokens=5, temperature=1, n=3, seed=4)
    assert len(r.choices) == 3 and r.usage.completion_tokens <= 15
    again = client.completions.create(model="tiny-r1", prompt="1 + 1", max_tokens=5, temperature=1, n=3, seed=4)
    assert [c.text for c in again.choices] == [c.text for c in r.choices], "a seed gives the same tokens"


def test_errors_are_the_clients_typed_exceptions(server, client):
    import openai
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    missing = httpx.get(server.url + "/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=msgs)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-r1", messages=msgs, max_tokens=10_000)
    assert "maximum context length is 256" in e.value.message and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-r1", messages=msgs, temperature="hot")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-r1", messages=[])
    bad = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory, tiny_tokenizer):
    """An untrained model: greedy decoding runs the full max_tokens (no EOS), so requests stay in flight."""
    out = tmp_path_factory.mktemp("random")
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("tiny", vocab_size=tiny_tokenizer.vocab_size, hidden_size=64,
                                        num_attention_heads=2, intermediate_size=128, moe_intermediate_size=32,
                                        max_position_embeddings=512)).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def random_server(random_ckpt):
    s = Server(random_ckpt, "--max-batch", "32")
    yield s
    s.stop()


async def _stream_tokens(server, i: int) -> int:
    """One streaming completion request on its own connection, read with plain asyncio streams (a load
    generator should cost far less than the server it measures: an HTTP client library parsing every
    SSE line took as much CPU as the server on these 2 cores). Returns its completion tokens."""
    import asyncio

    body = json.dumps({"model": "minir1", "prompt": f"{i} + {i}", "max_tokens": 48, "temperature": 1.0, "seed": i,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(-1), 120)  # the server closes the connection after [DONE]
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    events = [x for x in payload.decode().split("\n") if x.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all('"error"' not in x for x in events), events
    usage = json.loads(events[-2][6:])["usage"]
    assert len(events) - 2 == usage["completion_tokens"], "one event per generated token"
    return usage["completion_tokens"]


def test_32_concurrent_streaming_clients_beat_sequential_by_3x(random_server):
    """The untrained model rarely ends early, so every request generates (about) its 48 tokens and the
    measure is of generation, not of connection set-up."""
    server = random_server
    import asyncio

    async def measure() -> tuple[int, float, list[int], float]:
        await _stream_tokens(server, 0)  # warm-up
        t = time.perf_counter()
        sequential = [await _stream_tokens(server, i) for i in range(32)]
        seq_s = time.perf_counter() - t
        t = time.perf_counter()
        concurrent = await asyncio.gather(*[_stream_tokens(server, i) for i in range(32)])
        return sum(sequential), seq_s, list(concurrent), time.perf_counter() - t

    sequential, seq_s, concurrent, con_s = asyncio.run(measure())
    assert len(concurrent) == 32 and all(n > 0 for n in concurrent)
    assert sum(concurrent) == sequential > 32 * 40, "seeded requests give the same tokens batched or alone"
    assert server.health()["max_rows"] >= 16, "the requests really shared the batch"
    seq_rate, con_rate = sequential / seq_s, sum(concurrent) / con_s
    assert con_rate >= 3 * seq_rate, (con_rate, seq_rate)


def test_disconnects_free_slots_and_sigterm_lets_requests_finish(random_ckpt):
    s = Server(random_ckpt)
    try:
        # A client that goes away: its row leaves the batch at once, long before its 400 tokens.
        body = {"model": "minir1", "prompt": "count", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            assert s.health()["running_rows"] == 1
        deadline = time.time() + 3
        while s.health()["running_rows"] and time.time() < deadline:
            time.sleep(0.05)
        health = s.health()
        assert health["running_rows"] == 0 and health["generated_tokens"] < 400

        # SIGTERM with a request in flight: it runs to its end, the stream closes cleanly, the process exits 0.
        got: list[str] = []
        body["max_tokens"] = 150

        def reader() -> None:
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
                got.extend(x for x in r.iter_lines() if x.startswith("data: "))

        th = threading.Thread(target=reader)
        th.start()
        deadline = time.time() + 10
        while not s.health().get("running_rows") and time.time() < deadline:
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        th.join(60)
        assert s.proc.wait(60) == 0
        assert got and got[-1] == "data: [DONE]"
        events = [json.loads(x[6:]) for x in got[:-1]]
        assert all("error" not in m for m in events)
        assert events[-1]["choices"][0]["finish_reason"] == "length" and len(events) == 150
    finally:
        s.stop()


def test_web_chat_in_headless_chromium(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "make install puts Debian's chromium and chromium-driver on the machine"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,700"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "temperature").clear()
        driver.find_element(By.ID, "temperature").send_keys("0")
        assert driver.find_element(By.ID, "max_tokens").get_attribute("value") == "128"  # half the context
        driver.find_element(By.ID, "input").send_keys("What is 2 + 3?")
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 30)
        try:
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant .answer").text.strip() == "5")
        finally:
            print(driver.find_element(By.ID, "log").text)  # shown when the test fails
        thinking = driver.find_element(By.CSS_SELECTOR, ".msg.assistant details.thinking")
        assert thinking.is_displayed()
        assert driver.find_element(By.CSS_SELECTOR, ".thinking-text").text.strip() == "add the two"
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "web_chat.png"))
        assert (ARTIFACTS / "web_chat.png").stat().st_size > 1000
    finally:
        driver.quit()


def test_schemathesis_finds_no_server_errors(server, tmp_path):
    exe = Path(sys.executable).parent / "schemathesis"
    res = subprocess.run([str(exe), "run", server.url + "/openapi.json", "--checks", "not_a_server_error",
                          "--max-examples", os.environ.get("MINIR1_FUZZ_EXAMPLES", "25"), "--header",
                          f"Authorization: Bearer {KEY}", "--request-timeout", "60",
                          "--generation-deterministic", "--suppress-health-check", "all"],
                         capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert server.proc.poll() is None


# ---- hostile requests (issue 14) ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def open_server(ckpt):
    """No API key, a small body limit, and a model name that is HTML."""
    s = Server(ckpt, "--served-model-name", "<b>x</b>", "--max-request-bytes", "20000", "--allowed-host", "mybox")
    yield s
    s.stop()


def test_lone_surrogates_are_a_400_and_the_connection_lives_on(open_server):
    with httpx.Client(base_url=open_server.url, timeout=30) as c:
        for body in ('{"model": "<b>x</b>", "messages": [{"role": "user", "content": "\\ud800"}]}',
                     '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
                     '{"model": "<b>x</b>", "prompt": "\\udfff"}'):
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            assert "surrogate" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200  # the same keep-alive connection still serves


def test_oversized_and_deeply_nested_bodies_are_refused_quickly(open_server):
    big = json.dumps({"model": "<b>x</b>", "messages": [{"role": "user", "content": "a" * 50_000}]})
    start = time.perf_counter()
    r = httpx.post(open_server.url + "/v1/chat/completions", content=big, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and "20,000 bytes" in r.json()["error"]["message"], r.text
    assert time.perf_counter() - start < 5

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(10):
            yield b" " * 4000
        yield big.encode()

    r = httpx.post(open_server.url + "/v1/chat/completions", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413, r.text
    nested = '{"model": "<b>x</b>", "messages": ' + "[" * 5000 + "]" * 5000 + "}"
    r = httpx.post(open_server.url + "/v1/chat/completions", content=nested,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code in (400, 422) or r.status_code == 413, r.text
    assert r.status_code < 500


def test_a_prompt_that_cannot_fit_is_refused_before_tokenising(open_server):
    # 256-token context: 19,000 bytes of text are more tokens than that whatever the tokenizer does.
    body = {"model": "<b>x</b>", "messages": [{"role": "user", "content": "word " * 3800}]}
    r = httpx.post(open_server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_only_this_machines_host_names_are_served_without_a_key(open_server):
    for host, status in (("evil.example", 421), ("127.0.0.1", 200), ("localhost:1234", 200), ("mybox", 200),
                         ("[::1]:80", 200)):
        r = httpx.get(open_server.url + "/v1/models", headers={"host": host}, timeout=10)
        assert r.status_code == status, (host, r.text)
    page = httpx.get(open_server.url + "/", timeout=10).text
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page


def test_logprobs_and_top_logprobs(open_server):
    from openai import OpenAI
    c = OpenAI(base_url=open_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = c.chat.completions.create(model="<b>x</b>", messages=[{"role": "user", "content": "2 + 3?"}], max_tokens=6,
                                    temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-5  # greedy: the chosen token is the top one
    stream = c.chat.completions.create(model="<b>x</b>", messages=[{"role": "user", "content": "2 + 3?"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for chunk in stream for ch in chunk.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    legacy = c.completions.create(model="<b>x</b>", prompt="2 + 3", max_tokens=4, temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.token_logprobs) == 4
    assert all(len(t) == 2 for t in legacy.choices[0].logprobs.top_logprobs)
    r = httpx.post(open_server.url + "/v1/chat/completions", timeout=30, json={
        "model": "<b>x</b>", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert r.status_code == 400 and "needs logprobs" in r.text
