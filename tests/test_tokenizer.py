"""Tokenizer: training, round trips, special tokens, chat template parity with transformers."""

from __future__ import annotations

import json
import random

import pytest

from minir1 import Tokenizer
from minir1.tokenizer import ANSWER, ASSISTANT, BOS, END_THINK, EOS, PAD, THINK, USER, TokenizerError

CONVERSATION = [
    {"role": "system", "content": "You are a careful solver."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "<think>\n12 + 30 = 42\n</think>\n<answer>42</answer>"},
    {"role": "user", "content": "And 7 × 6? ✓"},
]


def random_text(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0xA0, 0x2FF), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F), (0x0, 0x1F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_round_trips_arbitrary_unicode(tiny_tokenizer):
    rng = random.Random(0)
    for _ in range(300):
        text = random_text(rng, rng.randint(0, 60))
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_special_tokens_are_single_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    for t in (BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK, ANSWER, "</answer>"):
        ids = tok.encode(t)
        assert ids == [tok.token_to_id(t)], t
    assert 300 < tok.vocab_size <= 400  # at most vocab_size: a tiny corpus runs out of merges
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    # The thinking markers survive skip_special_tokens; the turn markers do not.
    ids = tok.encode(f"{BOS}{USER}hi{ASSISTANT}{THINK}x{END_THINK}")
    assert tok.decode(ids, skip_special_tokens=True) == f"hi{THINK}x{END_THINK}"


def test_digits_are_split(tiny_tokenizer):
    ids = tiny_tokenizer.encode("12345")
    assert len(ids) == 5


def test_chat_template_renders_like_deepseek_r1(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (f"{BOS}You are a careful solver.{USER}What is 12 + 30?{ASSISTANT}\n<answer>42</answer>{EOS}"
                    f"{USER}And 7 × 6? ✓{ASSISTANT}<think>\n")
    bad = [{"role": "robot", "content": "x"}]
    with pytest.raises(Exception, match="unknown role robot"):
        tiny_tokenizer.apply_chat_template(bad)
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        tiny_tokenizer.apply_chat_template([{"role": "user"}])


def test_transformers_reads_ours_with_identical_ids(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    rng = random.Random(1)
    for text in ["3 + 4 = 7", "<think>\nab</think><answer>9</answer>", *(random_text(rng, 40) for _ in range(50))]:
        assert hf.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)
        assert hf.encode(text) == tiny_tokenizer.encode_prompt(text) == [tiny_tokenizer.bos_id, *hf.encode(text)[1:]]
        ids = tiny_tokenizer.encode(text)
        assert hf.decode(ids) == tiny_tokenizer.decode(ids)
    for gen in (True, False):
        theirs = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=gen)
        if isinstance(theirs, dict) or hasattr(theirs, "input_ids"):
            theirs = theirs["input_ids"]
        assert list(theirs) == tiny_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=gen)
    assert hf.bos_token == BOS and hf.eos_token == EOS and hf.pad_token == PAD


def test_reads_a_directory_written_by_transformers(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path / "ours")
    hf = AutoTokenizer.from_pretrained(tmp_path / "ours")
    hf.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    hf.save_pretrained(tmp_path / "theirs")
    back = Tokenizer.from_pretrained(tmp_path / "theirs")
    assert back.encode("hello 12 ✓") == tiny_tokenizer.encode("hello 12 ✓")
    assert back.eos_token == EOS and back.bos_token == BOS
    msgs = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(msgs, tokenize=False) == "[user]hi"
    # Template stored in tokenizer_config.json (older transformers) rather than chat_template.jinja.
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "tokenizer.json").write_text((tmp_path / "ours" / "tokenizer.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "X{{ messages[0]['content'] }}"}],
         "eos_token": {"content": EOS, "special": True}}))
    legacy = Tokenizer.from_pretrained(d)
    assert legacy.render_chat(msgs) == "Xhi" and legacy.eos_token == EOS


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot parse"):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_tokenizer_config_names_the_line(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{\n  "eos_token": "x",\n  oops\n}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: line 3"):
        Tokenizer.from_pretrained(tmp_path)


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=100, show_progress=False)
