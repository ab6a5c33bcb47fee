"""Logit parity with transformers' DeepseekV3ForCausalLM on the same weights, both directions."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_model
from safetensors import safe_open

from minir1 import ModelConfig, Transformer

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8}

VARIANTS = {
    "base": {},
    "q_lora": dict(q_lora_rank=24),
    "groups_1": dict(n_group=1, topk_group=1),
    "groups_4_top2": dict(n_group=4, topk_group=2),
    "yarn": dict(rope_scaling=YARN, max_position_embeddings=256),
    "all_moe": dict(first_k_dense_replace=0),
    "two_dense": dict(first_k_dense_replace=2),
    "tied": dict(tie_word_embeddings=True),
    "no_norm_topk": dict(norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers_both_ways(name, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    theirs = make_hf_model(**VARIANTS[name])
    theirs.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 128, (3, 48))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    assert got.shape == (3, 48, 128)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    ours.save_pretrained(tmp_path / "ours")
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, got, atol=1e-5, rtol=0)


def test_yarn_beyond_original_context(tmp_path):
    """YaRN matters past original_max_position_embeddings: compare there too."""
    torch.manual_seed(1)
    theirs = make_hf_model(rope_scaling=YARN, max_position_embeddings=256, q_lora_rank=16)
    theirs.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (1, 200))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)


def test_nonzero_bias_changes_the_routing(tmp_path):
    """The parity fixtures' random e_score_correction_bias is load-bearing: zeroing it changes logits."""
    torch.manual_seed(2)
    theirs = make_hf_model()
    theirs.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        before = ours(ids)
        for m in ours.moe_layers():
            m.gate.e_score_correction_bias.zero_()
        assert not torch.allclose(ours(ids), before, atol=1e-4)


def test_mtp_weights_round_trip_unchanged(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    cfg = ModelConfig.from_preset("tiny", num_nextn_predict_layers=2)
    torch.manual_seed(3)
    model = Transformer(cfg)
    model.save_pretrained(tmp_path)
    L = cfg.num_hidden_layers
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for k in range(2):  # DeepSeek's layout for MTP modules
        for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                  "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                  "mlp.experts.7.down_proj.weight", "mlp.gate.e_score_correction_bias"):
            assert f"model.layers.{L + k}.{n}" in names
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.config.num_nextn_predict_layers == 2
    ref, got = model.state_dict(), loaded.state_dict()
    mtp_keys = [k for k in ref if k.startswith("mtp.")]
    assert mtp_keys
    for k in mtp_keys:
        assert torch.equal(ref[k], got[k]), k
    # transformers ignores the MTP layers but still loads the main model with identical logits.
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, loaded.eval()(ids), atol=1e-5, rtol=0)


def test_sharded_checkpoint_round_trip(tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny"))
    model.save_pretrained(tmp_path, max_shard_bytes=1_000_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    loaded = Transformer.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_bf16_load_and_forward(tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny"))
    model.save_pretrained(tmp_path)
    m16 = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        ref, got = model.eval()(ids), m16(ids).float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99
