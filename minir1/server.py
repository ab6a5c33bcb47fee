"""`minir1 serve`: an OpenAI- and DeepSeek-compatible HTTP API over the continuous-batching scheduler, and
a web chat page at `/`.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (JSON or server-sent events), POST
/v1/completions. As in DeepSeek's API, the thinking is returned in `reasoning_content`, apart from
`content` (in the message, and in each streamed `delta`), and `usage.completion_tokens_details` counts
the reasoning tokens. Unknown optional request fields are ignored, as OpenAI's server ignores them.
Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}; client input never causes
a 5xx. With an API key set, /v1/* needs `Authorization: Bearer KEY` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from html import escape
from importlib import resources
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from minir1.engine import Engine, SamplingParams, StreamEvent
from minir1.model import Transformer
from minir1.reasoning import ReasoningSplitter
from minir1.scheduler import DONE, Scheduler, ServerShuttingDown
from minir1.tokenizer import END_THINK, THINK, Tokenizer

MAX_SEED = 2**63 - 1


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


class _Mailbox:
    """Events from the scheduler thread to the event loop, with one wake-up of the loop per burst (a
    decode step's events for every client) instead of one per token: each wake-up is a write to the
    loop's self-pipe and a pass of the loop, and 32 of them per step cost more than the step."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._pending = False

    def post(self, q: asyncio.Queue, item: Any) -> None:
        with self._lock:
            self._items.append((q, item))
            if self._pending:
                return
            self._pending = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._items, self._pending = self._items, collections.deque(), False
        for q, item in items:
            q.put_nowait(item)


def _printable(text: str | None) -> str | None:
    """Text that is safe to send back: what the client sent may not be valid Unicode."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _printable(message), "type": type, "param": _printable(param),
                      "code": _printable(code)}}


# --------------------------------------------------------------------------------------------------
# Request bodies (extra fields ignored)
# --------------------------------------------------------------------------------------------------

def _lone_surrogate(value: Any, depth: int = 0) -> bool:
    """Does a parsed JSON value hold a string that cannot be UTF-8 (a lone surrogate such as "\\ud800")?"""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if depth > 64:
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k, depth + 1) or _lone_surrogate(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate(v, depth + 1) for v in value)
    return False


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _utf8_only(cls, data: Any) -> Any:
        if _lone_surrogate(data):
            raise ValueError("a string holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode text")
        return data


class ContentPart(_Body):
    type: str = "text"
    text: str = ""


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None)
    seed: int | None = Field(None, ge=-MAX_SEED, le=MAX_SEED)
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)   # the legacy API: this many alternatives per token


# --------------------------------------------------------------------------------------------------
# Guards in front of the routes: request size, Host header
# --------------------------------------------------------------------------------------------------

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def _host_name(header: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _reject(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, "invalid_request_error", code=code), status_code=status)


class Guard:
    """ASGI middleware: refuses request bodies over `max_body_bytes` (413) before they are read into memory,
    and, when `allowed_hosts` is given, requests whose Host header names another host (a web page reaching a
    localhost server through DNS rebinding sends its own host name)."""

    def __init__(self, app: Any, max_body_bytes: int, allowed_hosts: set[str] | None) -> None:
        self.app, self.max_body_bytes, self.allowed_hosts = app, max_body_bytes, allowed_hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None:
            host = _host_name(headers.get("host", ""))
            if host not in self.allowed_hosts:
                return await _reject(421, f"Host {host!r} is not served here; start the server with --allowed-host "
                                          f"{host or 'NAME'} to accept it", "host_not_allowed")(scope, receive, send)
        limit = self.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _reject(413, f"the request body is over this server's limit of {limit:,} bytes "
                                      "(--max-request-bytes)", "request_too_large")(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body without Content-Length
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await _reject(413, f"the request body is over this server's limit of {limit:,} bytes "
                               "(--max-request-bytes)", "request_too_large")(scope, receive, send)


class _BodyTooLarge(BaseException):
    """A BaseException so that FastAPI's body parsing (which turns any Exception into a 400) lets it reach
    the Guard, which answers 413."""


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------

def default_max_request_bytes(context: int) -> int:
    """Room for a prompt that fills the context even when every token is a JSON escape: 1 MiB at least."""
    return max(2**20, 64 * context)


def create_app(model: Transformer, tokenizer: Tokenizer, *, served_model_name: str = "minir1",
               api_key: str | None = None, max_batch: int = 32, shutdown_timeout: float = 30.0,
               max_request_bytes: int | None = None, allowed_hosts: Sequence[str] | None = (),
               bound_host: str | None = None) -> Any:
    """The ASGI app. `allowed_hosts`: host names accepted beyond localhost's when no API key is set (None:
    any Host header, e.g. behind a reverse proxy that checks it)."""
    engine = Engine(model.eval(), tokenizer)
    context = model.config.max_position_embeddings
    # The longest token, in UTF-8 bytes: a text of L bytes has at least L / this many tokens, so an over-long
    # prompt is refused before it is tokenised.
    max_token_bytes = max(1, max(len(tokenizer.decode([i]).encode("utf-8", "replace"))
                                 for i in range(tokenizer.vocab_size)))
    end_think = tokenizer.token_to_id(END_THINK)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["scheduler"] = Scheduler(engine, max_batch=max_batch)
        try:
            yield
        finally:
            # In-flight requests finish (or end with a clean error after the timeout).
            await asyncio.to_thread(state["scheduler"].close, shutdown_timeout)

    app = FastAPI(title="minir1", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI- and DeepSeek-compatible API for a minir1 checkpoint.")

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, plus what this server accepts: its one model name, and n up to its batch."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                props = schema["components"]["schemas"][name]["properties"]
                props["model"]["enum"] = [served_model_name]
                props["n"]["maximum"] = max_batch
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    # ---- errors in OpenAI's shape --------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: "
                            f"{er.get('msg', 'invalid')}" for er in errs[:5]) or "invalid request"
        return JSONResponse(error_body(message, "invalid_request_error", ".".join(loc) or None,
                                       first.get("type")), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):  # a bug of ours: still OpenAI's shape
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: pass it as 'Authorization: Bearer KEY'.",
                           "authentication_error", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != served_model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{served_model_name}'.",
                           "not_found_error", "model", "model_not_found")

    def check_length(texts: Sequence[str], param: str) -> None:
        """Refuse, before tokenising, a text so long that its tokens cannot fit the context."""
        size = sum(len(t.encode("utf-8")) for t in texts)
        if size // max_token_bytes > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the {param} has "
                                f"{size:,} bytes, at least {size // max_token_bytes:,} tokens.", param=param,
                           code="context_length_exceeded")

    def token_entry(token_id: int, logprob: float | None) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def chat_logprobs(ev: StreamEvent) -> dict[str, Any]:
        entry = token_entry(ev.token_id, ev.logprob)
        entry["top_logprobs"] = [token_entry(i, v) for i, v in ev.top_logprobs or []]
        return entry

    def sampling(body: _Sampling, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        room = context - prompt_len
        if max_tokens is None:
            if room < 1:
                raise APIError(400, f"This model's maximum context length is {context} tokens, and the prompt "
                                    f"has {prompt_len}.", param="messages", code="context_length_exceeded")
            max_tokens = room
        elif prompt_len + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                                f"{prompt_len} tokens and max_tokens is {max_tokens} ({prompt_len + max_tokens} in "
                                "all). Shorten the prompt or lower max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop: at most 4 sequences", param="stop")
        if body.n > max_batch:
            raise APIError(400, f"n ({body.n}) exceeds this server's max batch ({max_batch})", param="n")
        return SamplingParams(max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else
                              body.temperature, top_p=1.0 if body.top_p is None else body.top_p, n=body.n,
                              stop=[s for s in stop if s], seed=None if body.seed is None else body.seed % 2**63,
                              **logprob_params(body))

    def logprob_params(body: _Sampling) -> dict[str, Any]:
        if isinstance(body, ChatCompletionRequest):
            if body.top_logprobs and not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return {"logprobs": body.logprobs, "top_logprobs": body.top_logprobs or 0}
        if isinstance(body, CompletionRequest) and body.logprobs is not None:
            return {"logprobs": True, "top_logprobs": body.logprobs}
        return {}

    async def submit(request: Request, prompt: list[int], params: SamplingParams):
        """-> (scheduler request, asyncio queue of its events)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        try:
            mailbox = state.get("mailbox")
            if mailbox is None or mailbox.loop is not loop:
                mailbox = state["mailbox"] = _Mailbox(loop)
            req = state["scheduler"].submit(prompt, params, lambda item: mailbox.post(q, item))
        except ServerShuttingDown as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        return req, q

    async def events(request: Request, req, q: asyncio.Queue, watch: bool) -> AsyncIterator[list[StreamEvent]]:
        """The request's events, in lists of those already waiting (one write per list, not per token).
        Its rows leave the batch as soon as the client disconnects: a streaming response is cancelled by
        the server when that happens; for a plain response (`watch`), a watcher polls for it."""
        async def watcher() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            state["scheduler"].cancel(req)
            q.put_nowait(DONE)

        task = asyncio.create_task(watcher()) if watch else None
        try:
            while True:
                items = [await q.get()]
                while not q.empty():
                    items.append(q.get_nowait())
                batch = []
                for item in items:
                    if item is DONE:
                        if batch:
                            yield batch
                        return
                    if isinstance(item, Exception):
                        raise item
                    batch.append(item)
                yield batch
        finally:
            if task is not None:
                task.cancel()
            state["scheduler"].cancel(req)

    # ---- routes ---------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = state.get("scheduler")
        return {"status": "ok", "model": served_model_name, "running_rows": s.running if s else 0,
                "max_batch": max_batch, **(s.stats if s else {})}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "minir1", "max_model_len": context}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages if m.role != "tool"]
        if not messages:
            raise APIError(400, "messages: no system, user or assistant message", param="messages")
        check_length([m["content"] for m in messages], "messages")
        # Off the event loop: a long prompt must not stall /health and the other clients' streams.
        prompt = await asyncio.to_thread(tokenizer.apply_chat_template, messages, add_generation_prompt=True)
        opened = tokenizer.decode(prompt[-4:]).endswith(THINK + "\n")
        params = sampling(body, len(prompt), body.max_completion_tokens or body.max_tokens)
        req, q = await submit(request, prompt, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        splitters = [ReasoningSplitter(opened) for _ in range(params.n)]
        counts = {"tokens": [0] * params.n, "reasoning": [0] * params.n, "thinking": [opened] * params.n}

        def count(ev: StreamEvent) -> None:
            i = ev.sample_index
            counts["tokens"][i] += 1
            if counts["thinking"][i]:
                counts["reasoning"][i] += 1
                if ev.token_id == end_think:
                    counts["thinking"][i] = False

        def usage() -> dict[str, Any]:
            done = sum(counts["tokens"])
            return {"prompt_tokens": len(prompt), "completion_tokens": done, "total_tokens": len(prompt) + done,
                    "completion_tokens_details": {"reasoning_tokens": sum(counts["reasoning"])}}

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                          "model": served_model_name, "choices": choices, **extra}) + "\n\n"

        if body.stream:
            async def sse() -> AsyncIterator[str]:
                try:
                    for i in range(params.n):
                        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}])
                    async for batch in events(request, req, q, watch=False):
                        out = []
                        for ev in batch:
                            count(ev)
                            parts = splitters[ev.sample_index].feed(ev.text)
                            if ev.finish_reason:
                                parts += splitters[ev.sample_index].flush()
                            lp = {"logprobs": {"content": [chat_logprobs(ev)]}} if params.logprobs else {}
                            if lp and not parts:  # the token's text is held back: its logprob is not
                                out.append(chunk([{"index": ev.sample_index, "delta": {}, "finish_reason": None,
                                                   **lp}]))
                            for kind, text in parts:  # a delta carries reasoning or content, never both
                                key = "reasoning_content" if kind == "reasoning" else "content"
                                out.append(chunk([{"index": ev.sample_index, "delta": {key: text},
                                                   "finish_reason": None, **lp}]))
                                lp = {}
                            if ev.finish_reason:
                                out.append(chunk([{"index": ev.sample_index, "delta": {},
                                                   "finish_reason": ev.finish_reason}]))
                        if out:
                            yield "".join(out)
                    if body.stream_options and body.stream_options.include_usage:
                        yield chunk([], usage=usage())
                except Exception as e:  # the scheduler failed or shut down mid-stream: end cleanly
                    yield "data: " + json.dumps(error_body(str(e), "server_error")) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        texts = [""] * params.n
        finish: list[str | None] = [None] * params.n
        logprobs: list[list[dict[str, Any]]] = [[] for _ in range(params.n)]
        try:
            async for batch in events(request, req, q, watch=True):
                for ev in batch:
                    count(ev)
                    texts[ev.sample_index] += ev.text
                    if params.logprobs:
                        logprobs[ev.sample_index].append(chat_logprobs(ev))
                    finish[ev.sample_index] = ev.finish_reason or finish[ev.sample_index]
        except ServerShuttingDown as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from e
        choices = []
        for i in range(params.n):
            parts = splitters[i].feed(texts[i]) + splitters[i].flush()
            reasoning = "".join(t for k, t in parts if k == "reasoning").strip()
            content = "".join(t for k, t in parts if k == "content").strip()
            choices.append({"index": i, "message": {"role": "assistant", "content": content,
                                                    "reasoning_content": reasoning or None},
                            "finish_reason": finish[i] or "length",
                            "logprobs": {"content": logprobs[i]} if params.logprobs else None})
        return {"id": rid, "object": "chat.completion", "created": created, "model": served_model_name,
                "choices": choices, "usage": usage()}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise APIError(400, "prompt: this server takes one prompt per request", param="prompt")
            text = body.prompt[0]
        else:
            text = body.prompt
        check_length([text], "prompt")
        prompt = await asyncio.to_thread(tokenizer.encode, text, add_bos=True)
        params = sampling(body, len(prompt), body.max_tokens or min(16, max(context - len(prompt), 1)))

        def legacy_logprobs(evs: list[StreamEvent], offset: int = 0) -> dict[str, Any] | None:
            if not params.logprobs:
                return None
            tokens = [tokenizer.decode([ev.token_id]) for ev in evs]
            offsets, at = [], offset
            for ev in evs:
                offsets.append(at)
                at += len(ev.text)
            return {"tokens": tokens, "token_logprobs": [ev.logprob for ev in evs],
                    "top_logprobs": [{tokenizer.decode([i]): v for i, v in ev.top_logprobs or []} for ev in evs],
                    "text_offset": offsets}
        req, q = await submit(request, prompt, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        tokens = [0] * params.n
        sent = [0] * params.n

        def usage() -> dict[str, Any]:
            return {"prompt_tokens": len(prompt), "completion_tokens": sum(tokens),
                    "total_tokens": len(prompt) + sum(tokens)}

        if body.stream:
            async def sse() -> AsyncIterator[str]:
                try:
                    async for batch in events(request, req, q, watch=False):
                        out = []
                        for ev in batch:
                            tokens[ev.sample_index] += 1
                            out.append("data: " + json.dumps({
                                "id": rid, "object": "text_completion", "created": created,
                                "model": served_model_name, "choices": [{
                                    "index": ev.sample_index, "text": ev.text,
                                    "logprobs": legacy_logprobs([ev], sent[ev.sample_index]),
                                    "finish_reason": ev.finish_reason}]}) + "\n\n")
                            sent[ev.sample_index] += len(ev.text)
                        yield "".join(out)
                    if body.stream_options and body.stream_options.include_usage:
                        yield "data: " + json.dumps({"id": rid, "object": "text_completion", "created": created,
                                                     "model": served_model_name, "choices": [],
                                                     "usage": usage()}) + "\n\n"
                except Exception as e:
                    yield "data: " + json.dumps(error_body(str(e), "server_error")) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        texts, finish = [""] * params.n, ["length"] * params.n
        evs: list[list[StreamEvent]] = [[] for _ in range(params.n)]
        try:
            async for batch in events(request, req, q, watch=True):
                for ev in batch:
                    tokens[ev.sample_index] += 1
                    texts[ev.sample_index] += ev.text
                    evs[ev.sample_index].append(ev)
                    finish[ev.sample_index] = ev.finish_reason or finish[ev.sample_index]
        except ServerShuttingDown as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from e
        return {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                "choices": [{"index": i, "text": texts[i], "logprobs": legacy_logprobs(evs[i]),
                             "finish_reason": finish[i]}
                            for i in range(params.n)], "usage": usage()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("minir1").joinpath("static/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", escape(served_model_name))
                            .replace("{{MAX_TOKENS}}", str(min(256, context // 2))))

    if allowed_hosts is not None and api_key is None:  # without a key, only this machine's names (DNS rebinding)
        hosts = {*LOCAL_HOSTS, *(h.lower() for h in allowed_hosts)}
        if bound_host and bound_host not in ("0.0.0.0", "::", ""):
            hosts.add(_host_name(bound_host))
        return Guard(app, max_request_bytes or default_max_request_bytes(context), hosts)
    return Guard(app, max_request_bytes or default_max_request_bytes(context), None)


def serve(ckpt: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 32, served_model_name: str | None = None, device: str | None = None,
          max_request_bytes: int | None = None, allowed_hosts: Sequence[str] | None = ()) -> None:
    import uvicorn

    from minir1.cli import load_for_inference
    _GracefulServer = _graceful_server_class()
    model, tokenizer = load_for_inference(ckpt, device)
    name = served_model_name or "minir1"
    app = create_app(model, tokenizer, served_model_name=name, api_key=api_key, max_batch=max_batch,
                     max_request_bytes=max_request_bytes, allowed_hosts=allowed_hosts, bound_host=host)
    print(f"serving {ckpt} as '{name}' on http://{host}:{port} (web chat at /, API at /v1)", flush=True)
    # SIGTERM and Ctrl-C shut down gracefully: no new connections, in-flight requests finish (up to the
    # timeout), the lifespan closes the scheduler, and the process exits 0.
    _GracefulServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=30)).run()


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, minus re-raising the signal after its graceful shutdown (which would end the
        process as killed by SIGTERM rather than with status 0)."""

        @contextlib.contextmanager
        def capture_signals(self):
            sigs = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return GracefulServer
