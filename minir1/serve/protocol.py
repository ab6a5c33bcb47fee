"""The OpenAI / DeepSeek request bodies this server accepts, and its error shape.

Unknown optional request fields are ignored, as OpenAI's server ignores them. Errors have OpenAI's shape,
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SEED = 2**63 - 1


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


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


