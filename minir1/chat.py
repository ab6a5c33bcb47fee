"""The terminal chat behind `minir1 chat`: streaming, the thinking shown dimmed and apart from the
answer, history kept through the chat template, /reset and /exit, Ctrl-C stops the current answer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from minir1.engine import Engine, SamplingParams
from minir1.reasoning import ReasoningSplitter, opened_reasoning

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = "Type a message. /reset clears the conversation, /exit quits. Ctrl-C stops an answer."


class ThinkingRenderer:
    """Writes streamed text, dimming the reasoning (between <think> and </think>) and dropping the format
    tags themselves (the splitting is ReasoningSplitter's, shared with the server)."""

    def __init__(self, out: TextIO, color: bool, thinking: bool) -> None:
        self.out, self.color = out, color
        self.splitter = ReasoningSplitter(thinking)
        self.dim = False

    def _write(self, parts: list[tuple[str, str]]) -> None:
        for kind, text in parts:
            dim = kind == "reasoning"
            if self.color and dim != self.dim:
                self.out.write(DIM if dim else RESET)
            if not dim and self.dim:
                self.out.write("\n")  # the answer starts on its own line
            self.dim = dim
            self.out.write(text)

    def feed(self, text: str) -> None:
        self._write(self.splitter.feed(text))
        self.out.flush()

    def close(self) -> None:
        self._write(self.splitter.flush())
        if self.color:
            self.out.write(RESET)
        self.dim = False
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
        opened = opened_reasoning(tok, prompt)  # the template may have opened the thinking
        limit = engine.model.config.max_position_embeddings - 1
        if len(prompt) >= limit:
            out.write(f"(the conversation is {len(prompt)} tokens, beyond the model's context of {limit}: "
                      "/reset to start over)\n")
            history.pop()
            continue
        run = SamplingParams(**{**params.__dict__, "max_new_tokens": min(params.max_new_tokens,
                                                                         limit - len(prompt))})
        renderer = ThinkingRenderer(out, color, thinking=bool(opened))
        reply = opened
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
