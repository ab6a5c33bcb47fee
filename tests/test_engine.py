"""The inference engine: cache consistency, parity with transformers' generate, sampling
distributions, log-probabilities, speculative decoding, streaming, stops and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_hf_model

from minir1 import ModelConfig, Transformer
from minir1.engine import Engine, SamplingParams, process_logits, sample
from minir1.engine.native.build import load as load_kernel


def native_available() -> bool:
    return load_kernel("decode_step") is not None

RAGGED = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3] * 15, [40]]


def random_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny model with weights large enough that greedy continuations are not degenerate."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def greedy_by_recomputation(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(params=[True, False], ids=["fused", "pytorch"])
def fused(request) -> bool:
    """Both decode paths: the native fused step (minir1/fused_decode.py) and the PyTorch reference."""
    if request.param and not native_available():
        pytest.skip("no C++ compiler: the fused decode step is unavailable here")
    return request.param


def make_engine(model: Transformer, fused: bool, tokenizer=None) -> Engine:
    engine = Engine(model, tokenizer, fused=fused)
    assert (engine.fused is not None) == fused
    return engine


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=None), dict(num_nextn_predict_layers=0),
                                       dict(q_lora_rank=None, first_k_dense_replace=0)])
def test_cache_matches_full_recomputation(overrides, fused):
    model = random_model(**overrides)
    outs = make_engine(model, fused).generate(RAGGED, SamplingParams(max_new_tokens=10, temperature=0,
                                                                     stop_token_ids=[]))
    assert [o.prompt_index for o in outs] == [0, 1, 2, 3]
    for prompt, out in zip(RAGGED, outs):
        assert out.token_ids == greedy_by_recomputation(model, prompt, 10)
        assert out.finish_reason == "length"


def test_greedy_matches_transformers_generate(tmp_path, fused):
    torch.manual_seed(0)
    theirs = make_hf_model(q_lora_rank=16)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    theirs.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [100, 101, 102, 103, 104, 105, 106, 107, 108]]
    outs = make_engine(ours, fused).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0,
                                                                     stop_token_ids=[]))
    for prompt, out in zip(prompts, outs):
        ref = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                              eos_token_id=None, pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist()


# ---- sampling distributions ---------------------------------------------------------------------------

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def intended(temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> list[float]:
    """The target distribution, computed independently of the engine, step by step in plain Python."""
    w = [math.exp(v / temperature) for v in LOGITS.tolist()]
    keep = set(range(len(w)))
    if top_k:
        keep = set(sorted(keep, key=lambda i: -w[i])[:top_k])
    if top_p < 1:
        total, acc, kept = sum(w[i] for i in keep), 0.0, set()
        for i in sorted(keep, key=lambda i: -w[i]):
            if acc >= top_p:
                break
            kept.add(i)
            acc += w[i] / total
        keep = kept
    if min_p:
        top = max(w[i] for i in keep)
        keep = {i for i in keep if w[i] >= min_p * top}
    total = sum(w[i] for i in keep)
    return [w[i] / total if i in keep else 0.0 for i in range(len(w))]


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=1.7),
                                    dict(temperature=1.0, top_k=3), dict(temperature=1.0, top_p=0.8),
                                    dict(temperature=0.8, min_p=0.2), dict(temperature=1.2, top_k=5, top_p=0.9)])
@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_sampling_frequencies_match_the_intended_distribution(kwargs, native, monkeypatch):
    if native and not native_available():
        pytest.skip("no C++ compiler: the native sampler is unavailable here")
    if not native:
        monkeypatch.setattr("minir1.engine.sampling.native_sampling", lambda logits: False)
    params = SamplingParams(**kwargs)
    probs = intended(**kwargs)
    n = 40_000
    g = torch.Generator().manual_seed(1234)
    tokens, _ = sample(LOGITS.expand(n, -1), params, g)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).tolist()
    support = [i for i, p in enumerate(probs) if p > 0]
    assert all(counts[i] == 0 for i in range(len(probs)) if probs[i] == 0), counts
    chi2 = sum((counts[i] - n * probs[i]) ** 2 / (n * probs[i]) for i in support)
    assert chi2 < chi2_critical(max(len(support) - 1, 1)), (counts, probs)


def test_greedy_distribution_is_one_hot():
    logp = process_logits(LOGITS[None], SamplingParams(temperature=0))
    assert logp.exp().tolist()[0] == [1.0] + [0.0] * 7


@pytest.mark.parametrize("top_k", [20, 0])
def test_logprobs_are_temperature_scaled_log_softmax_of_recomputed_logits(top_k, fused):
    model = random_model(1)
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_k=top_k, logprobs=True, seed=3, n=2,
                            stop_token_ids=[])
    outs = make_engine(model, fused).generate(RAGGED[:2], params)
    for out in outs:
        ids = torch.tensor([RAGGED[out.prompt_index] + out.token_ids])
        with torch.no_grad():
            logits = model(ids)[0, len(RAGGED[out.prompt_index]) - 1:-1]
        expected = (logits / 0.7).log_softmax(-1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
        assert len(out.logprobs) == len(out.token_ids)
        torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-5, rtol=0)


def test_same_seed_same_tokens():
    engine = Engine(random_model(2))
    p = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=7, stop_token_ids=[])
    a, b = engine.generate(RAGGED, p), engine.generate(RAGGED, p)
    c = engine.generate(RAGGED, SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=8, stop_token_ids=[]))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    # the n samples of a prompt differ from each other
    assert len({tuple(o.token_ids) for o in a if o.prompt_index == 0}) > 1


def test_n_samples_share_the_prefill_and_agree_under_greedy():
    engine = Engine(random_model(3))
    outs = engine.generate(RAGGED, SamplingParams(max_new_tokens=6, temperature=0, n=3, stop_token_ids=[]))
    assert [(o.prompt_index, o.sample_index) for o in outs[:3]] == [(0, 0), (0, 1), (0, 2)]
    single = engine.generate(RAGGED, SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[]))
    for o in outs:
        assert o.token_ids == single[o.prompt_index].token_ids
    assert engine.last_stats["prompt_tokens"] == sum(map(len, RAGGED))  # one prefill per prompt


def test_stop_tokens_finish_rows_early_and_the_rest_continue():
    model = random_model(4)
    engine = Engine(model)
    free = engine.generate(RAGGED, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[]))
    stop = free[0].token_ids[2]  # row 0 stops at its third token
    outs = engine.generate(RAGGED, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[stop]))
    assert outs[0].token_ids == free[0].token_ids[:3] and outs[0].finish_reason == "stop"
    for o, f in zip(outs[1:], free[1:]):
        cut = f.token_ids.index(stop) + 1 if stop in f.token_ids else 10
        assert o.token_ids == f.token_ids[:cut]


# ---- text, stop strings, streaming -----------------------------------------------------------------------

def test_stream_and_stop_strings(tiny_tokenizer):
    cfg = dict(vocab_size=tiny_tokenizer.vocab_size)
    model = random_model(5, **cfg)
    engine = Engine(model, tiny_tokenizer)
    prompt = [tiny_tokenizer.encode("1 + 2 =")]
    base = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[])
    full = engine.generate(prompt, base)[0]
    assert full.text == tiny_tokenizer.decode(full.token_ids)
    events = list(engine.stream(prompt, base))
    assert [e.token_id for e in events] == full.token_ids
    assert "".join(e.text for e in events) == full.text
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
    # a stop string taken from the middle of the text
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    if stop.strip():
        params = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[], stop=[stop])
        cut = engine.generate(prompt, params)[0]
        assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
        streamed = "".join(e.text for e in engine.stream(prompt, params))
        assert streamed == cut.text


def test_eos_from_tokenizer_and_text_excludes_it(tiny_tokenizer):
    model = random_model(6, vocab_size=tiny_tokenizer.vocab_size)
    engine = Engine(model, tiny_tokenizer)
    prompt = [tiny_tokenizer.encode("7 + 3 =")]
    free = engine.generate(prompt, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[]))[0]
    eos = free.token_ids[1]
    tiny_tokenizer_eos = tiny_tokenizer.eos_token
    try:
        tiny_tokenizer.eos_token = tiny_tokenizer.backend.id_to_token(eos)
        out = engine.generate(prompt, SamplingParams(max_new_tokens=8, temperature=0))[0]
    finally:
        tiny_tokenizer.eos_token = tiny_tokenizer_eos
    assert out.token_ids == free.token_ids[:2] and out.finish_reason == "stop"
    assert out.text == tiny_tokenizer.decode(free.token_ids[:1])


# ---- speculative decoding --------------------------------------------------------------------------------

@pytest.mark.parametrize("q_lora_rank", [None, 64])
def test_speculative_greedy_is_identical_to_plain(q_lora_rank):
    engine = Engine(random_model(7, q_lora_rank=q_lora_rank))
    plain = engine.generate(RAGGED, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[]))
    spec = engine.generate(RAGGED, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[],
                                                  speculative=True))
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert 0 <= engine.last_stats["acceptance_rate"] <= 1 and engine.last_stats["proposed"] > 0


def mimic_model() -> Transformer:
    """A model whose next token depends only on the current token (attention and feed-forward outputs
    zeroed), with an MTP module wired to predict exactly what the main model will: acceptance 1."""
    model = random_model(8, num_nextn_predict_layers=1)
    D = model.config.hidden_size
    with torch.no_grad():
        for block in [*model.layers, model.mtp[0].block]:
            block.self_attn.o_proj.weight.zero_()
            if hasattr(block.mlp, "experts"):
                block.mlp.experts.down_proj.zero_()
                block.mlp.shared_experts.down_proj.weight.zero_()
            else:
                block.mlp.down_proj.weight.zero_()
        mtp = model.mtp[0]
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :D] = torch.eye(D)  # h' = enorm(Emb(t_{i+1}))
        for norm in (mtp.enorm, mtp.norm, model.norm):
            norm.weight.fill_(1.0)
    return model


def test_speculative_acceptance_is_one_when_mtp_mimics_the_model():
    engine = Engine(mimic_model())
    for temperature in (0, 1.0):
        params = SamplingParams(max_new_tokens=20, temperature=temperature, stop_token_ids=[], seed=0,
                                speculative=True)
        outs = engine.generate(RAGGED, params)
        assert engine.last_stats["acceptance_rate"] > 0.99
        assert all(len(o.token_ids) == 20 for o in outs)
        assert engine.last_stats["steps"] <= 11  # two tokens per verification step


def test_speculative_sampling_keeps_the_target_distribution():
    """Joint distribution of the first three generated tokens, plain vs speculative sampling, on a
    small vocabulary with an MTP head that disagrees with the model (so rejections happen): a
    two-sample chi-square test over the sequences."""
    model = random_model(9, vocab_size=16)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # peaked enough that sequences repeat
    engine = Engine(model)
    n = 4000
    counts = []
    for spec in (False, True):
        params = SamplingParams(max_new_tokens=3, temperature=1.0, n=n, seed=11 + spec, stop_token_ids=[],
                                speculative=spec)
        hist: dict[tuple, int] = {}
        for o in engine.generate([[1, 2, 3]], params):
            hist[tuple(o.token_ids)] = hist.get(tuple(o.token_ids), 0) + 1
        counts.append(hist)
        if spec:
            assert 0.02 < engine.last_stats["acceptance_rate"] < 0.9
    common = [k for k in set(counts[0]) | set(counts[1]) if counts[0].get(k, 0) + counts[1].get(k, 0) >= 20]
    a = [counts[0].get(k, 0) for k in common] + [n - sum(counts[0].get(k, 0) for k in common)]
    b = [counts[1].get(k, 0) for k in common] + [n - sum(counts[1].get(k, 0) for k in common)]
    chi2 = sum((x - y) ** 2 / (x + y) for x, y in zip(a, b) if x + y)
    assert len(common) > 5
    assert chi2 < chi2_critical(len(common)), (chi2, len(common))


# ---- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, params, message", [
    ([[1, 2], []], SamplingParams(max_new_tokens=4), "prompt 1: empty prompt"),
    ([[1, 2], [3, 5000]], SamplingParams(max_new_tokens=4), "prompt 1: token id 5000 is outside the vocabulary"),
    ([[1, -1]], SamplingParams(max_new_tokens=4), "prompt 0: token id -1 is outside"),
    ([[1] * 500], SamplingParams(max_new_tokens=20), "prompt 0: 500 prompt tokens + max_new_tokens 20 = 520 "
                                                     "exceeds max_position_embeddings 512"),
    ([[1, 2]], SamplingParams(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    ([[1, 2]], SamplingParams(temperature=-1), "temperature must be >= 0"),
    ([[1, 2]], SamplingParams(top_p=0), "top_p must be in (0, 1]"),
    ([[1, 2]], SamplingParams(n=0), "n must be a positive integer"),
    ([[1, 2]], SamplingParams(stop=["x"]), "stop strings need an Engine with a tokenizer"),
])
def test_bad_input_is_a_clear_value_error(prompts, params, message):
    engine = Engine(random_model(10))
    with pytest.raises(ValueError) as e:
        engine.generate(prompts, params)
    assert message in str(e.value)
    # the engine is unharmed: the good rows still generate afterwards
    good = [p for p in prompts if p and all(0 <= t < 1024 for t in p) and len(p) < 100]
    if good:
        assert engine.generate(good, SamplingParams(max_new_tokens=2, temperature=0))


def test_speculative_needs_mtp():
    engine = Engine(random_model(11, num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="speculative=True needs a model with MTP"):
        engine.generate([[1]], SamplingParams(speculative=True))


def test_check_prompt_rejects_one_row_alone():
    engine = Engine(random_model(12))
    params = SamplingParams(max_new_tokens=4)
    assert engine.check_prompt(3, [1, 2], params) is None
    assert engine.check_prompt(3, [], params) == "prompt 3: empty prompt (it needs at least one token)"


def test_generation_restores_training_mode_and_leaves_balancing_untouched():
    model = random_model(13).train()
    Engine(model).generate(RAGGED, SamplingParams(max_new_tokens=3))
    assert model.training
    assert all(m.load_since_update.sum() == 0 for m in model.moe_layers())
