"""Splitting streamed R1 output into reasoning and answer, as DeepSeek's API does (`reasoning_content`
apart from `content`): the text inside <think>…</think> is reasoning, the rest is the answer, and the
format tags themselves are dropped. Tags may arrive split across chunks, so text that could still start
one is held back until it cannot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from minir1.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK

TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)


def opened_reasoning(tokenizer: Any, prompt: Sequence[int]) -> str:
    """Does the generation prompt open a reasoning block? -> the part of the response it already wrote:
    "<think>\n", "<think>" or "" (DeepSeek-R1's chat template ends its generation prompt with "<think>\n",
    so the model's text starts inside the thinking). The one place that answers this question, for the
    CLI, the chat, the server, SFT's targets, and the responses that rewards and evaluation score."""
    text = tokenizer.decode(list(prompt[-4:]))
    if text.endswith(THINK + "\n"):
        return THINK + "\n"
    return THINK if text.endswith(THINK) else ""


class ReasoningSplitter:
    def __init__(self, thinking: bool = False) -> None:
        self.thinking = thinking   # True when the prompt already opened <think> (see opened_reasoning)
        self.pending = ""
        self._after_think = False

    def feed(self, text: str) -> list[tuple[str, str]]:
        """-> [(kind, text)] with kind "reasoning" or "content", in order; empty texts are left out."""
        out: list[tuple[str, str]] = []
        self.pending += text
        while self.pending:
            if self._after_think:  # the new line(s) between </think> and the answer are not content
                self.pending = self.pending.lstrip("\n")
                if not self.pending:
                    break
                self._after_think = False
            hits = [(self.pending.find(t), t) for t in TAGS if t in self.pending]
            if hits:
                i, tag = min(hits)
                self._emit(out, self.pending[:i])
                self.pending = self.pending[i + len(tag):]
                if tag == THINK:
                    self.thinking = True
                elif tag == END_THINK:
                    self.thinking = False
                    self._after_think = True
                continue
            keep = max((k for t in TAGS for k in range(1, len(t)) if self.pending.endswith(t[:k])), default=0)
            self._emit(out, self.pending[:len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep:]
            break
        return out

    def flush(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._emit(out, self.pending)
        self.pending = ""
        return out

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        if text:
            out.append(("reasoning" if self.thinking else "content", text))

