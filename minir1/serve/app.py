"""`minir1 serve`: an OpenAI- and DeepSeek-compatible HTTP API over the continuous-batching scheduler, and
a web chat page at `/`.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (JSON or server-sent events), POST
/v1/completions. As in DeepSeek's API, the thinking is returned in `reasoning_content`, apart from
`content` (in the message, and in each streamed `delta`), and `usage.completion_tokens_details` counts
the reasoning tokens. Client input never causes a 5xx. With an API key set, /v1/* needs
`Authorization: Bearer KEY` (compared in constant time). Request bodies: minir1/serve/protocol.py.
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
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minir1.engine import Engine, SamplingParams, StreamEvent
from minir1.reasoning import ReasoningSplitter, opened_reasoning
from minir1.serve import guard
from minir1.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, _Sampling, error_body
from minir1.serve.scheduler import DONE, Scheduler, ServerShuttingDown
from minir1.tokenizer import END_THINK


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


def default_max_request_bytes(context: int) -> int:
    """Room for a prompt that fills the context even when every token is a JSON escape: 1 MiB at least."""
    return max(2**20, 64 * context)


def _sse(payload: dict[str, Any]) -> str:
    return "data: " + json.dumps(payload) + "\n\n"


class Service:
    """What the routes share: the model's engine and tokenizer, the scheduler, and the checks of a request."""

    def __init__(self, engine: Engine, served_model_name: str, api_key: str | None, max_batch: int) -> None:
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.name, self.api_key, self.max_batch = served_model_name, api_key, max_batch
        self.context = engine.model.config.max_position_embeddings
        # The longest token, in UTF-8 bytes: a text of L bytes has at least L / this many tokens, so an
        # over-long prompt is refused before it is tokenised.
        tok = self.tokenizer
        self.max_token_bytes = max(1, max(len(tok.decode([i]).encode("utf-8", "replace"))
                                          for i in range(tok.vocab_size)))
        self.end_think = tok.token_to_id(END_THINK)
        self.scheduler: Scheduler | None = None
        self._mailbox: _Mailbox | None = None

    # -- checks ----------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: pass it as 'Authorization: Bearer KEY'.",
                           "authentication_error", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.name}'.",
                           "not_found_error", "model", "model_not_found")

    def check_length(self, texts: Sequence[str], param: str) -> None:
        """Refuse, before tokenising, a text so long that its tokens cannot fit the context."""
        size = sum(len(t.encode("utf-8")) for t in texts)
        if size // self.max_token_bytes > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the {param} has "
                                f"{size:,} bytes, at least {size // self.max_token_bytes:,} tokens.", param=param,
                           code="context_length_exceeded")

    def sampling(self, body: _Sampling, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        context, room = self.context, self.context - prompt_len
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
        if body.n > self.max_batch:
            raise APIError(400, f"n ({body.n}) exceeds this server's max batch ({self.max_batch})", param="n")
        return SamplingParams(max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else
                              body.temperature, top_p=1.0 if body.top_p is None else body.top_p, n=body.n,
                              stop=[s for s in stop if s], seed=None if body.seed is None else body.seed % 2**63,
                              **_logprob_params(body))

    # -- the scheduler -------------------------------------------------------------------------------------
    async def submit(self, prompt: list[int], params: SamplingParams) -> tuple[Any, asyncio.Queue]:
        """-> (scheduler request, asyncio queue of its events)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        try:
            if self._mailbox is None or self._mailbox.loop is not loop:
                self._mailbox = _Mailbox(loop)
            mailbox = self._mailbox
            req = self.scheduler.submit(prompt, params, lambda item: mailbox.post(q, item))
        except ServerShuttingDown as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        return req, q

    async def events(self, request: Request, req: Any, q: asyncio.Queue,
                     watch: bool) -> AsyncIterator[list[StreamEvent]]:
        """The request's events, in lists of those already waiting (one write per list, not per token).
        Its rows leave the batch as soon as the client disconnects: a streaming response is cancelled by
        the server when that happens; for a plain response (`watch`), a watcher polls for it."""
        async def watcher() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            self.scheduler.cancel(req)
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
            self.scheduler.cancel(req)

    async def collect(self, request: Request, req: Any, q: asyncio.Queue) -> list[list[StreamEvent]]:
        """A whole (non-streamed) response's events, per sample."""
        evs: list[list[StreamEvent]] = [[] for _ in range(req.params.n)]
        try:
            async for batch in self.events(request, req, q, watch=True):
                for ev in batch:
                    evs[ev.sample_index].append(ev)
        except ServerShuttingDown as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from e
        return evs

    # -- log-probabilities ---------------------------------------------------------------------------------
    def token_entry(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def chat_logprobs(self, ev: StreamEvent) -> dict[str, Any]:
        entry = self.token_entry(ev.token_id, ev.logprob)
        entry["top_logprobs"] = [self.token_entry(i, v) for i, v in ev.top_logprobs or []]
        return entry

    def legacy_logprobs(self, evs: list[StreamEvent], offset: int = 0) -> dict[str, Any]:
        """/v1/completions' logprobs: tokens, their logprobs, the alternatives and each token's text offset."""
        offsets, at = [], offset
        for ev in evs:
            offsets.append(at)
            at += len(ev.text)
        decode = self.tokenizer.decode
        return {"tokens": [decode([ev.token_id]) for ev in evs], "token_logprobs": [ev.logprob for ev in evs],
                "top_logprobs": [{decode([i]): v for i, v in ev.top_logprobs or []} for ev in evs],
                "text_offset": offsets}


def _logprob_params(body: _Sampling) -> dict[str, Any]:
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return {"logprobs": body.logprobs, "top_logprobs": body.top_logprobs or 0}
    if isinstance(body, CompletionRequest) and body.logprobs is not None:
        return {"logprobs": True, "top_logprobs": body.logprobs}
    return {}


# --------------------------------------------------------------------------------------------------
# /v1/chat/completions
# --------------------------------------------------------------------------------------------------

class _ChatResponse:
    """One chat completion's state: the reasoning splitters and token counts of its samples."""

    def __init__(self, service: Service, prompt: list[int], params: SamplingParams, opened: bool) -> None:
        self.service, self.prompt, self.params = service, prompt, params
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        n = params.n
        self.splitters = [ReasoningSplitter(opened) for _ in range(n)]
        self.tokens, self.reasoning, self.thinking = [0] * n, [0] * n, [opened] * n

    def count(self, ev: StreamEvent) -> None:
        i = ev.sample_index
        self.tokens[i] += 1
        if self.thinking[i]:
            self.reasoning[i] += 1
            if ev.token_id == self.service.end_think:
                self.thinking[i] = False

    def usage(self) -> dict[str, Any]:
        done, p = sum(self.tokens), len(self.prompt)
        return {"prompt_tokens": p, "completion_tokens": done, "total_tokens": p + done,
                "completion_tokens_details": {"reasoning_tokens": sum(self.reasoning)}}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.service.name, "choices": choices, **extra})

    def event_chunks(self, ev: StreamEvent) -> list[str]:
        """A streamed token -> its chunks: a delta carries reasoning or content, never both."""
        self.count(ev)
        i = ev.sample_index
        parts = self.splitters[i].feed(ev.text)
        if ev.finish_reason:
            parts += self.splitters[i].flush()
        lp = {"logprobs": {"content": [self.service.chat_logprobs(ev)]}} if self.params.logprobs else {}
        out = []
        if lp and not parts:  # the token's text is held back: its logprob is not
            out.append(self.chunk([{"index": i, "delta": {}, "finish_reason": None, **lp}]))
        for kind, text in parts:
            key = "reasoning_content" if kind == "reasoning" else "content"
            out.append(self.chunk([{"index": i, "delta": {key: text}, "finish_reason": None, **lp}]))
            lp = {}
        if ev.finish_reason:
            out.append(self.chunk([{"index": i, "delta": {}, "finish_reason": ev.finish_reason}]))
        return out

    async def stream(self, request: Request, req: Any, q: asyncio.Queue, include_usage: bool) -> AsyncIterator[str]:
        try:
            for i in range(self.params.n):
                yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for batch in self.service.events(request, req, q, watch=False):
                out = [c for ev in batch for c in self.event_chunks(ev)]
                if out:
                    yield "".join(out)
            if include_usage:
                yield self.chunk([], usage=self.usage())
        except Exception as e:  # the scheduler failed or shut down mid-stream: end cleanly
            yield _sse(error_body(str(e), "server_error"))
        yield "data: [DONE]\n\n"

    def whole(self, evs: list[list[StreamEvent]]) -> dict[str, Any]:
        choices = []
        for i, sample in enumerate(evs):
            for ev in sample:
                self.count(ev)
            text = "".join(ev.text for ev in sample)
            parts = self.splitters[i].feed(text) + self.splitters[i].flush()
            reasoning = "".join(t for k, t in parts if k == "reasoning").strip()
            content = "".join(t for k, t in parts if k == "content").strip()
            finish = next((ev.finish_reason for ev in reversed(sample) if ev.finish_reason), None)
            choices.append({"index": i, "message": {"role": "assistant", "content": content,
                                                    "reasoning_content": reasoning or None},
                            "finish_reason": finish or "length",
                            "logprobs": {"content": [self.service.chat_logprobs(ev) for ev in sample]}
                            if self.params.logprobs else None})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.service.name,
                "choices": choices, "usage": self.usage()}


async def chat_completions(service: Service, body: ChatCompletionRequest, request: Request) -> Any:
    service.check_model(body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages if m.role != "tool"]
    if not messages:
        raise APIError(400, "messages: no system, user or assistant message", param="messages")
    service.check_length([m["content"] for m in messages], "messages")
    # Off the event loop: a long prompt must not stall /health and the other clients' streams.
    try:
        prompt = await asyncio.to_thread(service.tokenizer.apply_chat_template, messages, add_generation_prompt=True)
    except ValueError as e:  # the checkpoint's template refused the conversation (raise_exception)
        raise APIError(400, str(e), param="messages") from e
    opened = bool(opened_reasoning(service.tokenizer, prompt))
    params = service.sampling(body, len(prompt), body.max_completion_tokens or body.max_tokens)
    req, q = await service.submit(prompt, params)
    response = _ChatResponse(service, prompt, params, opened)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(response.stream(request, req, q, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return response.whole(await service.collect(request, req, q))


# --------------------------------------------------------------------------------------------------
# /v1/completions
# --------------------------------------------------------------------------------------------------

async def completions(service: Service, body: CompletionRequest, request: Request) -> Any:
    service.check_model(body.model)
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise APIError(400, "prompt: this server takes one prompt per request", param="prompt")
        text = body.prompt[0]
    else:
        text = body.prompt
    service.check_length([text], "prompt")
    prompt = await asyncio.to_thread(service.tokenizer.encode_prompt, text)
    context = service.context
    params = service.sampling(body, len(prompt), body.max_tokens or min(16, max(context - len(prompt), 1)))
    req, q = await service.submit(prompt, params)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": service.name}

    def usage(tokens: int) -> dict[str, Any]:
        return {"prompt_tokens": len(prompt), "completion_tokens": tokens, "total_tokens": len(prompt) + tokens}

    def logprobs(evs: list[StreamEvent], offset: int = 0) -> dict[str, Any] | None:
        return service.legacy_logprobs(evs, offset) if params.logprobs else None

    if body.stream:
        async def sse() -> AsyncIterator[str]:
            tokens, sent = 0, [0] * params.n
            try:
                async for batch in service.events(request, req, q, watch=False):
                    out = []
                    for ev in batch:
                        tokens += 1
                        i = ev.sample_index
                        out.append(_sse({**head, "choices": [{"index": i, "text": ev.text, "finish_reason":
                                                              ev.finish_reason, "logprobs": logprobs([ev], sent[i])}]}))
                        sent[ev.sample_index] += len(ev.text)
                    yield "".join(out)
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(tokens)})
            except Exception as e:
                yield _sse(error_body(str(e), "server_error"))
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    evs = await service.collect(request, req, q)
    choices = [{"index": i, "text": "".join(ev.text for ev in sample), "logprobs": logprobs(sample),
                "finish_reason": next((ev.finish_reason for ev in reversed(sample) if ev.finish_reason), "length")}
               for i, sample in enumerate(evs)]
    return {**head, "choices": choices, "usage": usage(sum(len(s) for s in evs))}


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------

def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape."""
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


def _openapi(app: FastAPI, service: Service) -> None:
    """FastAPI's schema, plus what this server accepts: its one model name, and n up to its batch."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                props = schema["components"]["schemas"][name]["properties"]
                props["model"]["enum"] = [service.name]
                props["n"]["maximum"] = service.max_batch
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(model: Any, tokenizer: Any, *, served_model_name: str = "minir1", api_key: str | None = None,
               max_batch: int = 32, shutdown_timeout: float = 30.0, max_request_bytes: int | None = None,
               allowed_hosts: Sequence[str] | None = (), bound_host: str | None = None) -> Any:
    """The ASGI app. `allowed_hosts`: host names accepted beyond localhost's when no API key is set (None:
    any Host header, e.g. behind a reverse proxy that checks it)."""
    service = Service(Engine(model.eval(), tokenizer), served_model_name, api_key, max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.scheduler = Scheduler(service.engine, max_batch=max_batch)
        try:
            yield
        finally:
            # In-flight requests finish (or end with a clean error after the timeout).
            await asyncio.to_thread(service.scheduler.close, shutdown_timeout)

    app = FastAPI(title="minir1", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI- and DeepSeek-compatible API for a minir1 checkpoint.")
    _openapi(app, service)
    _error_handlers(app)
    auth = [Depends(service.authorize)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = service.scheduler
        return {"status": "ok", "model": service.name, "running_rows": s.running if s else 0,
                "max_batch": max_batch, **(s.stats if s else {})}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "minir1", "max_model_len": service.context}]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatCompletionRequest, request: Request):
        return await chat_completions(service, body, request)

    @app.post("/v1/completions", dependencies=auth)
    async def complete(body: CompletionRequest, request: Request):
        return await completions(service, body, request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("minir1.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", escape(service.name))
                            .replace("{{MAX_TOKENS}}", str(min(256, service.context // 2))))

    limit = max_request_bytes or default_max_request_bytes(service.context)
    return guard.Guard(app, limit, guard.allowed_hosts(allowed_hosts, api_key, bound_host))


def serve(ckpt: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 32, served_model_name: str | None = None, device: str | None = None,
          max_request_bytes: int | None = None, allowed_hosts: Sequence[str] | None = ()) -> None:
    import uvicorn

    from minir1.checkpoint import load
    model, tokenizer = load(ckpt, device=device)
    name = served_model_name or "minir1"
    app = create_app(model, tokenizer, served_model_name=name, api_key=api_key, max_batch=max_batch,
                     max_request_bytes=max_request_bytes, allowed_hosts=allowed_hosts, bound_host=host)
    print(f"serving {ckpt} as '{name}' on http://{host}:{port} (web chat at /, API at /v1)", flush=True)
    # SIGTERM and Ctrl-C shut down gracefully: no new connections, in-flight requests finish (up to the
    # timeout), the lifespan closes the scheduler, and the process exits 0.
    _GracefulServer = _graceful_server_class()
    _GracefulServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=30)).run()


def _graceful_server_class() -> type:
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
