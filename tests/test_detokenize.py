"""Streaming detokenization: incremental (no re-decode of the whole row per token), and a multi-byte
character split across tokens is never emitted half. A scripted model makes the engine generate exactly the
byte tokens of a text full of such characters."""

from __future__ import annotations

import torch

from minir1 import Engine, SamplingParams
from minir1.models.base import ModelOutput
from minir1.models.dense import DenseConfig, DenseTransformer

TEXT = "héllo 😀 数学 ✓ ünï 🧮!"


def byte_tokens(tokenizer, text: str) -> list[int]:
    """The byte-level alphabet's one-byte tokens for each UTF-8 byte of `text` (GPT-2's byte-to-unicode map)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    char = dict(zip(bs, map(chr, cs)))
    ids = [tokenizer.token_to_id(char[b]) for b in text.encode("utf-8")]
    assert None not in ids
    return ids


class Scripted(DenseTransformer):
    """Whatever the input, the token after position p is script[p - start]."""

    def __init__(self, config: DenseConfig, script: list[int], start: int) -> None:
        super().__init__(config)
        self.script, self.start = torch.tensor(script), start

    def forward(self, input_ids, *, positions=None, cache=None, logits_at=None, return_dict=False, **_):
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        if logits_at is not None:
            positions = positions.gather(1, logits_at.view(B, -1))
        nxt = self.script[(positions - self.start).clamp(0, len(self.script) - 1)]
        logits = torch.full((*nxt.shape, self.config.vocab_size), -1e4).scatter_(-1, nxt[..., None], 0.0)
        return ModelOutput(logits=logits, hidden=None) if return_dict else logits


def scripted_engine(tokenizer, prompt: list[int]) -> tuple[Engine, list[int]]:
    script = byte_tokens(tokenizer, TEXT)
    cfg = DenseConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=None, bos_token_id=None)
    return Engine(Scripted(cfg, script, start=len(prompt) - 1), tokenizer), script


def test_split_characters_are_never_streamed_half_and_the_stream_joins_to_the_text(tiny_tokenizer):
    prompt = tiny_tokenizer.encode("1 + 2 =")
    engine, script = scripted_engine(tiny_tokenizer, prompt)
    params = SamplingParams(max_new_tokens=len(script), temperature=0, stop_token_ids=[])
    events = list(engine.stream([prompt], params))
    assert [e.token_id for e in events] == script
    assert all("\ufffd" not in e.text for e in events)
    assert sum(1 for e in events if e.text == "") > 5     # the bytes of a character wait for the last one
    assert "".join(e.text for e in events) == TEXT == engine.generate([prompt], params)[0].text


def test_streaming_decodes_only_the_new_tokens(tiny_tokenizer, monkeypatch):
    prompt = tiny_tokenizer.encode("1 + 2 =")
    engine, script = scripted_engine(tiny_tokenizer, prompt)
    lengths: list[int] = []
    real = tiny_tokenizer.decode

    def counting(ids, **kw):
        lengths.append(len(ids))
        return real(ids, **kw)

    monkeypatch.setattr(tiny_tokenizer, "decode", counting)
    text = "".join(e.text for e in engine.stream([prompt], SamplingParams(max_new_tokens=len(script),
                                                                           temperature=0, stop_token_ids=[])))
    assert text == TEXT and len(script) > 30
    assert max(lengths) <= 8, "each step decodes a few tokens, never the whole row"
