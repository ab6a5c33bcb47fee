"""`minir1 serve` on a dense (Qwen2-family) checkpoint with an R1-Distill-style template (the generation prompt
opens "<think>\\n"): the `openai` client gets reasoning_content and content split, streaming and not."""

from __future__ import annotations

import pytest
import torch
from test_server import ANSWER, Server

from minir1.train import TrainConfig, train
from minir1.train.sft import SFTStage


@pytest.fixture(scope="module")
def qwen2_ckpt(tmp_path_factory, tiny_tokenizer):
    """A tiny random Qwen2ForCausalLM (saved by transformers), taught by a short SFT to answer with ANSWER."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from minir1 import Transformer
    tok = tiny_tokenizer
    torch.manual_seed(0)
    raw = tmp_path_factory.mktemp("qwen2-raw")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                 tie_word_embeddings=True)).save_pretrained(raw)
    model = Transformer.from_pretrained(raw)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]
             for q in ("What is 2 + 3?", "2 + 3?", "hello", "Add 2 and 3")]
    out = tmp_path_factory.mktemp("qwen2-served")
    train(model, tok, SFTStage(tok, 64, 8, conversations=convs * 4),
          TrainConfig(out=str(out), steps=80, batch_size=8, seq_len=64, lr=3e-3, progress=False))
    return out


@pytest.fixture(scope="module")
def client(qwen2_ckpt):
    from openai import OpenAI
    server = Server(qwen2_ckpt, "--served-model-name", "tiny-qwen2")
    yield OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    server.stop()


def test_reasoning_and_content_are_split_on_a_qwen2_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-qwen2"]
    r = client.chat.completions.create(model="tiny-qwen2", messages=[{"role": "user", "content": "What is 2 + 3?"}],
                                       temperature=0, max_tokens=40)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content, r.choices[0].finish_reason) == ("add the two", "5", "stop")
    assert r.usage.completion_tokens_details.reasoning_tokens > 0


def test_streamed_reasoning_and_content_on_a_qwen2_model(client):
    stream = client.chat.completions.create(model="tiny-qwen2", messages=[{"role": "user", "content": "2 + 3?"}],
                                            temperature=0, max_tokens=40, stream=True)
    reasoning, content = "", ""
    for chunk in stream:
        for c in chunk.choices:
            r, t = getattr(c.delta, "reasoning_content", None), c.delta.content
            assert not (r and t)
            reasoning, content = reasoning + (r or ""), content + (t or "")
    assert (reasoning.strip(), content.strip()) == ("add the two", "5")
