"""The native decode step and sampler (minir1/fused_decode.py, minir1/kernels/decode_step.cpp) against
the PyTorch path they replace: logits, cache contents and router loads for every kind of config,
repacking after a weight update, the same random draws, and the fallback when no compiler is there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from minir1 import ModelConfig, Transformer
from minir1.engine import Engine, SamplingParams
from minir1.engine.cache import new_cache
from minir1.engine.native.build import load
from minir1.engine.native.fused import FusedDecoder, native_sample
from minir1.engine.sampling import categorical, process_logits, token_logprobs
from minir1.models.deepseek_v3 import MoE

pytestmark = pytest.mark.skipif(load("decode_step") is None, reason="no C++ compiler: no native kernels here")

YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=128, mscale=1.0, mscale_all_dim=1.0,
            beta_fast=32, beta_slow=1)
CONFIGS = {
    "default": dict(),                                        # q_lora, group-limited routing, shared expert
    "no_q_lora": dict(q_lora_rank=None),
    "no_groups_no_shared": dict(n_group=1, topk_group=1, n_shared_experts=0),
    "odd_sizes": dict(hidden_size=100, vocab_size=250, kv_lora_rank=24, qk_rope_head_dim=6, v_head_dim=12),
    "yarn": dict(rope_scaling=YARN),
    "all_moe_4_groups": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                             first_k_dense_replace=0, norm_topk_prob=False),
    "dense_only": dict(first_k_dense_replace=3),
}


@pytest.mark.parametrize("shape", [(1, 7, 37), (1, 64, 48), (3, 33, 50), (2, 16, 16), (1, 100, 250)])
def test_packed_panels_are_the_weight_transposed_in_16_column_blocks(shape):
    """W [..., N, K] -> [..., ceil(N/16), K, 16] with zero columns past N: the decode kernels' layout, by its
    definition, for shapes that exercise the 16 x 16 register blocks and the element-by-element tails."""
    import ctypes

    from minir1.engine.native.fused import pack
    *batch, N, K = shape
    w = torch.randn(shape)
    nb = -(-N // 16)

    def expected(x: torch.Tensor) -> torch.Tensor:
        padded = torch.cat((x, x.new_zeros(*x.shape[:-2], nb * 16 - N, K)), dim=-2)
        return padded.view(*x.shape[:-2], nb, 16, K).transpose(-1, -2)

    assert torch.equal(pack(w), expected(w))
    assert torch.equal(pack(w[0]), expected(w[0]))
    dense = load("dense_step")
    for x in (w.contiguous(), w.bfloat16().contiguous()):  # the dense kernel's own copy, fp32 and bf16
        out = torch.full((*batch, nb, K, 16), 7.0, dtype=x.dtype)
        dense.minir1_dense_pack(ctypes.c_void_p(x.data_ptr()), int(x.dtype == torch.bfloat16),
                                ctypes.c_int64(batch[0]), N, K, ctypes.c_void_p(out.data_ptr()), 2)
        assert torch.equal(out, expected(x))


@pytest.mark.parametrize("name", ["default", "no_q_lora", "odd_sizes"])
def test_absorbed_projections_match_the_float64_reference(name):
    """The kernel's weight absorption (W_UK into the queries with the softmax scale, W_UV into o_proj) against
    the same products in PyTorch float64: equal to the last bit of the fp32 result, give or take one unit."""
    from minir1.engine.native.fused import absorb, absorb_reference
    model = random_model(**CONFIGS[name])
    for block in model.layers:
        got_ref = zip(absorb(block.self_attn, model.rotary.softmax_scale),
                      absorb_reference(block.self_attn, model.rotary.softmax_scale))
        for got, ref in got_ref:
            assert got.shape == ref.shape
            assert bool(((got - ref).abs() <= ref.abs() * 2.0 ** -23).all())


def random_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def forward(decoder, model, cache, ids, positions, logits_at=None):
    """The model on the cache: through the native decoder, or the PyTorch path (the reference)."""
    if decoder is not None:
        return decoder.forward(cache.kv, ids, positions, logits_at)
    cache.set_positions(positions)
    return model(ids, positions=positions, cache=cache, return_dict=True, logits_at=logits_at)


def mtp_draft(decoder, model, cache, hidden, next_ids, positions):
    if decoder is not None:
        return decoder.mtp(cache.kv, hidden, next_ids, positions)
    cache.set_positions(positions)
    return model.mtp_draft(hidden, next_ids, positions, cache)


def run_both(model: Transformer, prompts: list[list[int]], new_tokens: list[int], new_pos: list[int],
             paths: tuple = (False, True), threads: int | None = None):
    """On each path: prefill `prompts`, one decode step, then (with an MTP module) a speculative
    verification of two tokens per row and the MTP draft over them. -> per path: (prefill logits, step
    logits, verification logits and hidden states, MTP logits, cache, router loads of the step)."""
    cfg = model.config
    spec = bool(cfg.num_nextn_predict_layers)
    results = []
    for fused in paths:
        decoder = FusedDecoder.for_model(model) if fused else None
        if decoder is not None:
            decoder.threads = threads
            decoder.refresh()
        cache = new_cache(model, len(prompts), 32, extra_layers=int(spec))
        with torch.inference_mode():
            if decoder is not None and not spec:  # the unpadded native prefill
                pre_logits = decoder.prefill(cache.kv, prompts)
            else:
                T = max(len(p) for p in prompts)
                ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
                last = torch.tensor([len(p) - 1 for p in prompts])
                pre_logits = forward(decoder, model, cache, ids, torch.arange(T).expand(len(prompts), T),
                                     logits_at=last).logits[:, 0]
            out = forward(decoder, model, cache, torch.tensor(new_tokens)[:, None], torch.tensor(new_pos)[:, None])
            loads = [b.mlp.last_load.clone() for b in model.layers if isinstance(b.mlp, MoE)]
            verify = mtp = None
            if spec:
                pos = torch.tensor(new_pos)[:, None] + 1 + torch.arange(2)
                ids = torch.tensor([[5, 6], [7, 8], [9, 10], [11, 12]])
                verify = forward(decoder, model, cache, ids, pos)
                mtp = mtp_draft(decoder, model, cache, verify.hidden, ids.flip(1), pos)
        kv = cache.kv.clone()
        for row, p in enumerate(prompts):  # slots of right-padding hold garbage on the PyTorch path
            kv[:, row, len(p):new_pos[row]] = 0
            kv[:, row, new_pos[row] + 3:] = 0
        results.append((pre_logits.clone(), out.logits[:, 0].clone(),
                        None if verify is None else (verify.logits.clone(), verify.hidden.clone()),
                        None if mtp is None else mtp.clone(), kv, loads))
    return results


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_step_verification_and_mtp_match_the_pytorch_path(name):
    model = random_model(**CONFIGS[name])
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12] * 12, [40]]
    ref, got = run_both(model, prompts, [1, 2, 3, 4], [7, 2, 12, 1])
    close = dict(atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], ref[0], **close)   # prefill logits
    torch.testing.assert_close(got[1], ref[1], **close)   # decode step logits
    if model.config.num_nextn_predict_layers:
        torch.testing.assert_close(got[2][0], ref[2][0], **close)   # verification logits
        torch.testing.assert_close(got[2][1], ref[2][1], **close)   # and hidden states
        torch.testing.assert_close(got[3], ref[3], **close)         # MTP draft logits
    torch.testing.assert_close(got[4], ref[4], **close)   # every cache layer, the MTP's included
    for a, b in zip(got[5], ref[5]):
        assert torch.equal(a.long(), b.long()), "each token goes to the same experts on both paths"


@pytest.mark.parametrize("name", ["default", "all_moe_4_groups", "odd_sizes"])
def test_the_native_step_gives_the_same_bits_on_any_number_of_threads(name):
    """The step's work is shared among threads (GEMM panels, tokens, experts), never a sum: 1, 2 or 3 threads
    give the same prefill, step, verification and MTP logits, cache and expert loads, bit for bit."""
    model = random_model(**{**CONFIGS[name], "num_nextn_predict_layers": 1})
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12] * 12, [40]]
    runs = [run_both(model, prompts, [1, 2, 3, 4], [7, 2, 12, 1], paths=(True,), threads=t)[0] for t in (1, 2, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            for x, y in zip(a if isinstance(a, (tuple, list)) else [a], b if isinstance(b, (tuple, list)) else [b]):
                assert torch.equal(x, y)


def test_engine_uses_the_fused_step_and_repacks_after_an_update():
    model = random_model(1)
    engine = Engine(model)
    assert engine.fused is not None
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    greedy = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[])
    first = [o.token_ids for o in engine.generate(prompts, greedy)]
    assert first == [o.token_ids for o in Engine(model, fused=False).generate(prompts, greedy)]
    # An optimizer step changes every weight in place (as GRPO does between rollouts).
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model.train()
    model(torch.tensor([[1, 2, 3, 4]])).logsumexp(-1).mean().backward()
    opt.step()
    model.eval()
    after = [o.token_ids for o in engine.generate(prompts, greedy)]
    assert after == [o.token_ids for o in Engine(model, fused=False).generate(prompts, greedy)]
    assert after != first, "the update changed the model's greedy continuations"


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.6])
def test_native_sampler_draws_what_the_pytorch_path_draws(temperature):
    torch.manual_seed(0)
    logits = torch.randn(64, 300) * 3
    logits[:, 5] = float("-inf")  # a token outside the support is never drawn
    params = SamplingParams(temperature=temperature)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    u = torch.rand(64, generator=g1) if temperature > 0 else torch.zeros(64)
    tokens, logp = native_sample(logits, torch.full((64,), temperature), u)
    logp_ref = process_logits(logits, params)
    ref = logp_ref.argmax(-1) if temperature == 0 else categorical(logp_ref.exp(), g2)
    assert torch.equal(tokens, ref)
    assert not (tokens == 5).any()
    torch.testing.assert_close(logp, token_logprobs(logits, ref, temperature), atol=2e-6, rtol=0)


def test_native_sampler_takes_a_temperature_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    tokens, logp = native_sample(logits, torch.tensor([0.0, 100.0]), torch.tensor([0.0, 0.2]))
    assert tokens.tolist() == [1, 0]  # greedy; nearly uniform at T = 100, and u = 0.2 falls in the first third
    torch.testing.assert_close(logp, torch.stack([logits[0].log_softmax(-1)[1], (logits[1] / 100).log_softmax(-1)[0]]))


def _engine_in_subprocess(env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    code = ("import torch, logging; logging.basicConfig(level=logging.WARNING)\n"
            "from minir1 import ModelConfig, Transformer\n"
            "from minir1.engine import Engine, SamplingParams\n"
            "e = Engine(Transformer(ModelConfig()).eval())\n"
            "out = e.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[]))\n"
            "print('fused' if e.fused is not None else 'pytorch', len(out[0].token_ids))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MINIR1_CACHE": str(tmp_path), **env})


def test_disabled_or_without_a_compiler_the_engine_falls_back(tmp_path):
    off = _engine_in_subprocess({"MINIR1_NATIVE": "0"}, tmp_path / "a")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["pytorch", "4"]
    broken = _engine_in_subprocess({"CXX": "/nonexistent/g++"}, tmp_path / "b")
    assert broken.returncode == 0, broken.stderr
    assert broken.stdout.split() == ["pytorch", "4"]
    assert "native kernel 'decode_step' unavailable" in broken.stderr and "/nonexistent/g++" in broken.stderr


def test_a_compiler_without_openmp_builds_a_single_threaded_kernel(tmp_path):
    """Apple's clang, say: the first build fails on -fopenmp, the second drops it."""
    import shutil
    gxx = shutil.which("g++") or shutil.which("c++")
    fake = tmp_path / "cxx-without-openmp"
    fake.write_text('#!/bin/sh\n'
                    'for a in "$@"; do [ "$a" = -fopenmp ] && { echo "no OpenMP here" >&2; exit 1; }; done\n'
                    f'exec {gxx} "$@"\n')
    fake.chmod(0o755)
    out = _engine_in_subprocess({"CXX": str(fake)}, tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fused", "4"]
    assert "without OpenMP" in out.stderr


def test_a_fresh_cache_compiles_the_kernel(tmp_path):
    out = _engine_in_subprocess({}, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fused", "4"]
    assert len(list((tmp_path / "kernels").glob("decode_step-*.so"))) == 1


def test_out_of_range_ids_or_positions_are_a_value_error_not_a_crash():
    model = random_model(2)
    engine = Engine(model)
    kv = torch.zeros(model.config.num_hidden_layers, 2, 8, model.config.kv_lora_rank + model.config.qk_rope_head_dim)
    with torch.inference_mode():
        engine.fused.forward(kv, torch.tensor([[1], [2]]), torch.tensor([[0], [7]]))  # in range: fine
        for ids, pos in (([[1], [model.config.vocab_size]], [[0], [1]]), ([[1], [-1]], [[0], [1]]),
                         ([[1], [2]], [[0], [8]])):
            with pytest.raises(ValueError, match="token ids must be in"):
                engine.fused.forward(kv, torch.tensor(ids), torch.tensor(pos))



def test_generation_in_one_native_call_equals_the_step_loop(monkeypatch):
    from conftest import one_call_equals_step_loop
    one_call_equals_step_loop(Engine(random_model(3)), [[5, 6, 7], [8, 9, 10, 11, 12], [3]], monkeypatch)


def test_one_call_generation_refuses_bad_input():
    model = random_model(2)
    fused = Engine(model).fused
    kv = torch.zeros(model.config.num_hidden_layers, 2, 8, fused.cache_width)
    args = dict(stopped=[False, False], max_new=4, stop_ids=[], temperature=1.0, generator=None)
    with torch.inference_mode():
        tokens, _, lengths, _, steps = fused.generate(kv, [[1], [2]], positions=torch.tensor([3, 4]), **args)
        assert lengths.tolist() == [4, 4] and steps == 3 and tokens[:, 0].tolist() == [1, 2]
        for rows, pos, match in (([[1], [model.config.vocab_size]], [3, 4], "token id"),
                                 ([[1], [2]], [3, 6], "exceed the cache"),         # positions 6..8 of 8 slots
                                 ([[1], []], [3, 4], "at least one token"),
                                 ([[1, 2, 3, 4, 5], [2]], [3, 4], "longer than max_new")):
            with pytest.raises(ValueError, match=match):
                fused.generate(kv, rows, positions=torch.tensor(pos), **args)
