"""The dense families' native decode step (minir1/engine/native/dense_step.cpp) against the PyTorch path,
which is the reference (itself checked against transformers in test_dense.py)."""

from __future__ import annotations

import pytest
import torch

from minir1 import Engine, SamplingParams
from minir1.engine.cache import new_cache
from minir1.engine.native import DenseDecoder, load
from minir1.models.dense import DenseConfig, DenseTransformer

pytestmark = pytest.mark.skipif(load("dense_step") is None, reason="no C++ compiler: the native path is off")

BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)
CASES = {
    "llama-gqa": dict(model_type="llama"),
    "llama-mha-biases-tied-gelu-yarn": dict(model_type="llama", num_key_value_heads=4, attention_bias=True,
                                            mlp_bias=True, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
                                            rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 16}),
    "llama-mqa-llama3": dict(model_type="llama", num_key_value_heads=1,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2-qkv-bias": dict(model_type="qwen2", qkv_bias=True),
    "qwen3-qk-norm-head-dim": dict(model_type="qwen3", qk_norm=True, head_dim=24),
}
PROMPTS = [[1, 5, 7, 9, 11], [3, 4], [8, 8, 8, 8, 8, 8, 8, 8, 2, 17, 40]]


def model(name: str, dtype: torch.dtype = torch.float32) -> DenseTransformer:
    torch.manual_seed(0)
    m = DenseTransformer(DenseConfig(**{**BASE, **CASES[name]})).eval()
    with torch.no_grad():  # norms and biases off their trivial init, so a dropped one shows
        for n, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "norm" in n or n.endswith("bias") else 0.05))
    return m.to(dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_native_logits_equal_the_pytorch_path_at_prefill_and_every_decode_step(name):
    m = model(name)
    decoder = DenseDecoder.for_model(m)
    assert decoder is not None
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        ref = m(ids)[0]                                          # [T, V], every position
    kv = new_cache(m, 1, 32, dtype=torch.float32).kv
    first = decoder.prefill(kv, [PROMPTS[2][:4]])[0]             # the first 4 tokens at once ...
    torch.testing.assert_close(first, ref[3], rtol=1e-5, atol=1e-5)
    for t in range(4, len(PROMPTS[2])):                          # ... then one decode step per token
        out = decoder.forward(kv, ids[:, t:t + 1], torch.tensor([[t]])).logits[0, 0]
        torch.testing.assert_close(out, ref[t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_native_generation_of_a_ragged_batch_equals_the_pytorch_path(name):
    m = model(name)
    native, reference = Engine(m), Engine(m, fused=False)
    assert native.fused is not None and reference.fused is None
    for params in (SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[], logprobs=True),
                   SamplingParams(max_new_tokens=10, temperature=1.0, seed=3, n=2, stop_token_ids=[], logprobs=True)):
        got, want = native.generate(PROMPTS, params), reference.generate(PROMPTS, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        for a, b in zip(got, want):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-qk-norm-head-dim"])
def test_bf16_weights_run_natively_in_fp32_arithmetic(name):
    m = model(name, torch.bfloat16)
    decoder = DenseDecoder.for_model(m)
    assert decoder is not None
    decoder.weights.pack()
    assert {t.dtype for t in decoder.weights._buffers.values()} == {torch.bfloat16}  # half the bytes, not fp32
    upcast = model(name)
    upcast.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    with torch.no_grad():
        ref = upcast(torch.tensor([PROMPTS[2]]))[0, -1]
    got = decoder.prefill(new_cache(m, 1, 32, dtype=torch.float32).kv, [PROMPTS[2]])[0]
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    assert [o.token_ids for o in Engine(m).generate(PROMPTS, params)] == \
        [o.token_ids for o in Engine(upcast, fused=False).generate(PROMPTS, params)]


def test_a_weight_update_is_repacked_and_fp16_runs_on_the_pytorch_path():
    m = model("llama-gqa")
    engine = Engine(m)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[])
    before = engine.generate(PROMPTS, params)
    with torch.no_grad():
        m.lm_head.weight.mul_(-1.0)   # in place: the version counter moves, the storage stays
    after = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in after] == [o.token_ids for o in Engine(m, fused=False).generate(PROMPTS, params)]
    assert [o.token_ids for o in after] != [o.token_ids for o in before]
    assert DenseDecoder.for_model(model("llama-gqa", torch.float16)) is None


def test_bad_input_is_refused_before_the_kernel_reads_memory():
    m = model("llama-gqa")
    decoder = DenseDecoder.for_model(m)
    kv = new_cache(m, 1, 8, dtype=torch.float32).kv
    with pytest.raises(ValueError, match="token ids must be in"):
        decoder.prefill(kv, [[1, 2, 101]])
    with pytest.raises(ValueError, match="positions in"):
        decoder.forward(kv, torch.tensor([[1]]), torch.tensor([[8]]))
    with pytest.raises(ValueError, match="the cache must be"):
        decoder.prefill(new_cache(m, 1, 8).kv.to(torch.bfloat16), [[1, 2]])


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-qk-norm-head-dim"])
def test_generation_in_one_native_call_equals_the_step_loop(name, monkeypatch):
    from conftest import one_call_equals_step_loop
    one_call_equals_step_loop(Engine(model(name)), PROMPTS, monkeypatch)
