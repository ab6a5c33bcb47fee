"""Bad checkpoints give errors that name the file and the tensor or field — never a bare KeyError."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minir1 import ConfigError, ModelConfig, Transformer
from minir1.errors import CheckpointError


@pytest.fixture
def ckpt(tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny", num_nextn_predict_layers=0))
    model.save_pretrained(tmp_path)
    return tmp_path


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint directory {tmp_path / 'nope'} does not exist"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: no such file"):
        Transformer.from_pretrained(ckpt)


def test_config_invalid_json_names_line(ckpt):
    (ckpt / "config.json").write_text('{\n "hidden_size": 128,\n "vocab_size": ,\n}')
    with pytest.raises(ConfigError, match=r"config.json: line 3"):
        Transformer.from_pretrained(ckpt)


def test_config_missing_field(ckpt):
    edit_config(ckpt, hidden_size=...)
    with pytest.raises(ConfigError, match=r"config.json: missing field\(s\) 'hidden_size'"):
        Transformer.from_pretrained(ckpt)


@pytest.mark.parametrize("field, value, message", [
    ("num_experts_per_tok", 99, "num_experts_per_tok (99) must be <= n_routed_experts (8)"),
    ("rope_theta", "big", "field 'rope_theta' has the wrong type"),
    ("q_lora_rank", -3, "q_lora_rank (-3) must be a positive integer or null"),
    ("model_type", "mistral", "field 'model_type' is 'mistral'"),  # llama, qwen2, qwen3 load since issue 16
])
def test_config_invalid_field(ckpt, field, value, message):
    edit_config(ckpt, **{field: value})
    with pytest.raises(ConfigError) as e:
        Transformer.from_pretrained(ckpt)
    assert "config.json" in str(e.value) and message in str(e.value)


def test_missing_tensor(ckpt):
    edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing tensor\(s\) "
                                              r"'model.layers.1.mlp.experts.3.up_proj.weight'"):
        Transformer.from_pretrained(ckpt)


def test_extra_tensor(ckpt):
    edit_tensors(ckpt, lambda t: t.__setitem__("model.layers.0.surprise.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="model.safetensors: unexpected tensor 'model.layers.0.surprise.weight'"):
        Transformer.from_pretrained(ckpt)


def test_misshaped_tensor(ckpt):
    edit_tensors(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.kv_b_proj.weight", torch.zeros(5, 5)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.kv_b_proj.weight' "
                                              r"has shape \[5, 5\], but config.json implies \[128, 32\]"):
        Transformer.from_pretrained(ckpt)


def test_config_shape_mismatch_is_reported_per_tensor(ckpt):
    edit_config(ckpt, hidden_size=96)
    with pytest.raises(CheckpointError, match="has shape .* but config.json implies"):
        Transformer.from_pretrained(ckpt)


def test_corrupt_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors"):
        Transformer.from_pretrained(ckpt)


def test_pickle_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickled .bin/.pt weights are never loaded"):
        Transformer.from_pretrained(ckpt)


def test_sharded_index_pointing_to_missing_shard(tmp_path):
    Transformer(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path, max_shard_bytes=1_000_000)
    first = sorted(tmp_path.glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(CheckpointError, match=f"names shard {first.name}, which does not exist"):
        Transformer.from_pretrained(tmp_path)


def test_reads_transformers_v4_style_config(ckpt):
    """rope_scaling/rope_theta (DeepSeek's own files, transformers 4.x) and rope_parameters (5.x)."""
    edit_config(ckpt, rope_scaling=None, rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 2.0,
                                                          "original_max_position_embeddings": 128}, rope_theta=...)
    model = Transformer.from_pretrained(ckpt)
    assert model.config.rope_theta == 5000.0 and model.config.rope_scaling["factor"] == 2.0
