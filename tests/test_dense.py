"""The dense families (llama, qwen2, qwen3) against `transformers`: logits of tiny random models saved by
`transformers` in fp32 and bf16, our save loaded back by `transformers`, sharded checkpoints, greedy
generation of a ragged batch token for token, EOS lists, and clear errors for what is not supported."""

from __future__ import annotations

import json

import pytest
import torch

from minir1 import ConfigError, Engine, SamplingParams, Transformer
from minir1.errors import CheckpointError

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
CASES = {
    "llama-gqa-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-tied-llama3-bias": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                             rope_scaling=LLAMA3)),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=5000.0)),
    "qwen2-qkv-bias": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2-yarn": ("qwen2", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 64})),
    "qwen3-qk-norm-head-dim": ("qwen3", dict(head_dim=24, tie_word_embeddings=True)),
}


def hf_model(family: str, **overrides):
    """A random transformers model whose norms and biases are off their trivial init."""
    import transformers
    name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    config = getattr(transformers, f"{name}Config")(**{**BASE, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.2)
            elif n.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(params=list(CASES))
def case(request):
    family, overrides = CASES[request.param]
    return hf_model(family, **overrides)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def test_logits_match_transformers_in_fp32_and_our_save_loads_back(case, tmp_path):
    from transformers import AutoModelForCausalLM
    case.save_pretrained(tmp_path / "theirs")
    ours = Transformer.from_pretrained(tmp_path / "theirs").eval()
    assert type(ours).__name__ == "DenseTransformer" and ours.dtype == torch.float32
    ids = torch.randint(0, BASE["vocab_size"], (3, 19))
    torch.testing.assert_close(logits(ours, ids), logits(case, ids), atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, ids), logits(case, ids), atol=1e-5, rtol=0)
    if case.config.tie_word_embeddings:  # a tied checkpoint has no lm_head.weight, ours neither
        from safetensors import safe_open
        with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in set(f.keys())


def test_a_bf16_checkpoint_loads_in_bf16_and_matches(tmp_path):
    from transformers import AutoModelForCausalLM
    family, overrides = CASES["qwen3-qk-norm-head-dim"]
    hf_model(family, **overrides).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    ours = Transformer.from_pretrained(tmp_path / "bf16").eval()
    assert ours.dtype == torch.bfloat16 and ours.inv_freq.dtype == torch.float32
    ids = torch.randint(0, BASE["vocab_size"], (2, 13))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-2, rtol=0)
    # Both upcast to fp32 from the same bf16 weights: the fp32 tolerance.
    theirs32 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ours32 = Transformer.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(ours32, ids), logits(theirs32, ids), atol=1e-5, rtol=0)


def test_sharded_checkpoints_load(tmp_path):
    model = hf_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    ids = torch.randint(0, BASE["vocab_size"], (1, 9))
    torch.testing.assert_close(logits(Transformer.from_pretrained(tmp_path), ids), logits(model, ids), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("name", ["llama-tied-llama3-bias", "qwen2-qkv-bias", "qwen3-qk-norm-head-dim"])
def test_greedy_generation_of_a_ragged_batch_equals_transformers(name, tmp_path):
    family, overrides = CASES[name]
    theirs = hf_model(family, **overrides)
    theirs.save_pretrained(tmp_path)
    engine = Engine(Transformer.from_pretrained(tmp_path))
    torch.manual_seed(1)
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (3, 11, 6)]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[]))
    for prompt, out in zip(prompts, outs):
        ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref


def test_generation_stops_on_any_id_of_an_eos_list(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path)
    engine = Engine(model)
    prompt = [5, 6, 7]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[]))[0]
    second = free.token_ids[2]
    config = json.loads((tmp_path / "config.json").read_text())
    config["eos_token_id"] = [127 if second != 127 else 126, second]
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = Engine(Transformer.from_pretrained(tmp_path)).generate([prompt], SamplingParams(max_new_tokens=8,
                                                                                         temperature=0))[0]
    assert out.token_ids == free.token_ids[:3] and out.finish_reason == "stop"


def test_what_is_not_supported_is_a_clear_error(tmp_path):
    hf_model("qwen2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    def load_with(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
        return Transformer.from_pretrained(tmp_path)

    with pytest.raises(ConfigError, match=r"config.json: field 'model_type' is 'mistral'"):
        load_with(model_type="mistral")
    with pytest.raises(ConfigError, match="sliding-window attention"):
        load_with(use_sliding_window=True, sliding_window=16, max_window_layers=1, layer_types=None)
    with pytest.raises(ConfigError, match="field 'hidden_act'"):
        load_with(hidden_act="swish-beta")
    with pytest.raises(ConfigError, match="rope_type 'dynamic'"):
        load_with(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    load_with(use_sliding_window=False, sliding_window=4096)  # the fields present, the feature off: fine
    (tmp_path / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor.*model.layers.1.self_attn.k_proj.bias"):
        Transformer.from_pretrained(tmp_path)


def test_a_dense_model_at_a_presets_widths_and_its_errors():
    from minir1.errors import ConfigError
    from minir1.models.dense import DenseConfig
    cfg = DenseConfig.from_preset("qwen2", "tiny", hidden_size=64, num_attention_heads=2)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 1)
    assert cfg.qkv_bias and not cfg.qk_norm and cfg.tie_word_embeddings
    assert DenseConfig.from_preset("qwen3", "tiny").qk_norm
    with pytest.raises(ConfigError, match="unknown dense family 'gpt2'"):
        DenseConfig.from_preset("gpt2", "tiny")
    with pytest.raises(ConfigError, match="kv_lora_rank: not a field of a dense llama model"):
        DenseConfig.from_preset("llama", "tiny", kv_lora_rank=8)
