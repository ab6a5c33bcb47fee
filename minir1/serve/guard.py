"""Guards in front of the routes: the request size limit (413 before a body is read into memory) and the Host
check against DNS rebinding (a web page reaching a localhost server through a name it controls)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

from minir1.serve.protocol import error_body

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
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
            host = host_name(headers.get("host", ""))
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




def allowed_hosts(extra: Sequence[str] | None, api_key: str | None, bound_host: str | None) -> set[str] | None:
    """The Host header names served: without an API key, only this machine's (against DNS rebinding) plus
    `extra`; None (any) with a key, or when `extra` is None (e.g. behind a reverse proxy that checks it)."""
    if extra is None or api_key is not None:
        return None
    hosts = {*LOCAL_HOSTS, *(h.lower() for h in extra)}
    if bound_host and bound_host not in ("0.0.0.0", "::", ""):
        hosts.add(host_name(bound_host))
    return hosts
