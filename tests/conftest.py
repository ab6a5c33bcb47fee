"""Shared fixtures: tiny random `transformers` DeepseekV3 models and a tiny trained tokenizer, built
in-process (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HF_BASE: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    first_k_dense_replace=1, n_group=4, topk_group=2, max_position_embeddings=256, routed_scaling_factor=2.5,
)


def make_hf_model(**overrides: Any):
    """A random DeepseekV3ForCausalLM whose norms and routing biases are not at their trivial init,
    so that a mistake in either shows up in the logits."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**{**HF_BASE, **overrides}, attn_implementation="eager")
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from minir1 import Tokenizer

    corpus = [f"<think>\n{a} + {b} = {a + b}\n</think>\n<answer>{a + b}</answer>" for a in range(60) for b in range(7)]
    corpus += ["The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 数学 😀"] * 20
    return Tokenizer.train(corpus, vocab_size=400, show_progress=False)


@pytest.fixture
def tmp_ckpt(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"


def one_call_equals_step_loop(engine: Any, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """`Engine.generate` decoding every row in native calls (DecodeBatch.finish; here in chunks of 5 steps)
    gives the step loop's completions exactly (tokens, log-probabilities, text, finish reasons), and takes
    that path where it applies and not where it does not (truncated sampling)."""
    from minir1.engine import SamplingParams
    from minir1.engine.batch import DecodeBatch
    from minir1.engine.native import fused

    monkeypatch.setattr(fused, "GENERATE_CHUNK_STEPS", 5)  # 12 new tokens: calls of 5, 5 and 1 steps, resumed
    finish, calls = DecodeBatch.finish, []

    def spy(self: DecodeBatch) -> bool:
        ran = finish(self)
        calls.append(ran)
        return ran

    def run(params: SamplingParams, one_call: bool) -> list[tuple]:
        monkeypatch.setattr(DecodeBatch, "finish", spy if one_call else lambda self: False)
        return [(c.token_ids, c.logprobs, c.text, c.finish_reason) for c in engine.generate(prompts, params)]

    stop = run(SamplingParams(max_new_tokens=6, temperature=0), False)[0][0][2]  # a token greedy decoding reaches
    cases = [dict(temperature=0.0, stop_token_ids=[]), dict(temperature=1.0, n=3, seed=4),
             dict(temperature=0.7, n=2, seed=1, stop_token_ids=[stop]), dict(temperature=1.3, max_new_tokens=1, seed=2),
             dict(temperature=0.0, stop_token_ids=[stop])]
    for case in cases:
        params = {"max_new_tokens": 12, "logprobs": True, **case}
        want = run(SamplingParams(**params), False)
        calls.clear()
        assert run(SamplingParams(**params), True) == want, case
        assert calls == [True], case
    assert want[0][3] == "stop" and len(want[0][0]) <= 3  # the last case: greedy stops on `stop`
    calls.clear()
    run(SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=0), True)
    assert calls == [False]  # truncated sampling: the step loop
