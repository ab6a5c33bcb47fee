"""The terminal chat behind `minir1 chat`: streaming, the thinking shown dimmed and apart from the
answer, history kept through the chat template, /reset and /exit, Ctrl-C stops the current answer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from minir1.engine import Engine, SamplingParams
from minir1.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = "Type a message. /reset clears the conversation, /exit quits. Ctrl-C stops an answer."


class ThinkingRenderer:
    """Writes streamed text, dimming what lies between <think> and </think> and dropping the format
    tags themselves. Tags may arrive split across events, so text that could start one is held back."""

    TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)

    def __init__(self, out: TextIO, color: bool, thinking: bool) -> None:
        self.out, self.color, self.thinking = out, color, thinking
        self.pending = ""
        if thinking:
            self._style(True)

    def _style(self, dim: bool) -> None:
        if self.color:
            self.out.write(DIM if dim else RESET)

    def feed(self, text: str) -> None:
        self.pending += text
        while self.pending:
            hits = [(self.pending.find(t), t) for t in self.TAGS if t in self.pending]
            if hits:
                i, tag = min(hits)
                self.out.write(self.pending[:i])
                self.pending = self.pending[i + len(tag):]
                if tag == THINK:
                    self.thinking = True
                    self._style(True)
                elif tag == END_THINK:
                    self.thinking = False
                    self._style(False)
                    self.out.write("\n")
                    self.pending = self.pending.lstrip("\n")
                continue
            keep = max((k for t in self.TAGS for k in range(1, len(t)) if self.pending.endswith(t[:k])), default=0)
            self.out.write(self.pending[:len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep:]
            break
        self.out.flush()

    def close(self) -> None:
        self.out.write(self.pending)
        self.pending = ""
        self._style(False)
        self.out.write("\n")
        self.out.flush()


def run_chat(engine: Engine, params: SamplingParams, *, system: str | None = None,
             read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    tok = engine.tokenizer
    color = out.isatty()
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    out.write(HELP + "\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history = history[:1] if system else []
            out.write("(conversation cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        prompt = tok.apply_chat_template(history, add_generation_prompt=True)
        opened = tok.decode(prompt).endswith(THINK + "\n")  # the template already opened the thinking
        limit = engine.model.config.max_position_embeddings - 1
        if len(prompt) >= limit:
            out.write(f"(the conversation is {len(prompt)} tokens, beyond the model's context of {limit}: "
                      "/reset to start over)\n")
            history.pop()
            continue
        run = SamplingParams(**{**params.__dict__, "max_new_tokens": min(params.max_new_tokens,
                                                                         limit - len(prompt))})
        renderer = ThinkingRenderer(out, color, thinking=opened)
        reply = THINK + "\n" if opened else ""
        stream = engine.stream([prompt], run)
        try:
            for event in stream:
                reply += event.text
                renderer.feed(event.text)
        except KeyboardInterrupt:
            renderer.feed("")
            out.write(" [stopped]")
        finally:
            stream.close()
            renderer.close()
        history.append({"role": "assistant", "content": reply})
