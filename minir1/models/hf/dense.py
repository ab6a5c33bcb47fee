"""The dense families' Hugging Face adapter (llama, qwen2, qwen3): config.json <-> DenseConfig, and parameter
names (ours are theirs less the leading "model."). The safetensors files are read and written by weights.py.

Every config field that changes the math is read or refused: a field minir1 does not implement, with a value
that would change the output, is a ConfigError naming the file and the field — never a silent wrong answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minir1.errors import ConfigError
from minir1.models.dense import DenseConfig, DenseTransformer
from minir1.models.hf import weights
from minir1.models.hf.weights import CONFIG_FILE

MODEL = DenseTransformer
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# transformers' defaults for optional fields, per family, so that a field absent from a file means what it
# means to transformers.
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                  attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=None),
    "qwen3": dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
                  attention_bias=False, tie_word_embeddings=False, head_dim=128, bos_token_id=None,
                  eos_token_id=None),
}


def _rope(d: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either spelling: transformers 4's rope_theta + rope_scaling, or 5's
    rope_parameters."""
    theta = d.get("rope_theta")
    rp = d.get("rope_parameters")
    rs = d.get("rope_scaling")
    if isinstance(rp, dict):
        theta = rp.get("rope_theta", theta)
        if rs is None:
            rs = {k: v for k, v in rp.items() if k != "rope_theta"}
    if isinstance(rs, dict):
        rs = dict(rs)
        kind = rs.pop("rope_type", rs.pop("type", "default"))
        if rs.get("partial_rotary_factor", 1.0) != 1.0 or d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: field 'partial_rotary_factor' is not supported (RoPE on part of a head)")
        rs = None if kind == "default" else {"rope_type": kind, **rs}
    elif rs is not None:
        raise ConfigError(f"{source}: field 'rope_scaling' must be an object or null, got {rs!r}")
    return float(theta if theta is not None else 10000.0), rs


def _sliding_window(d: dict[str, Any], source: str, layers: int, context: int) -> None:
    """Sliding-window attention is refused when a layer would really use it (a window shorter than the
    context); Qwen's configs carry the fields with the feature off."""
    types = d.get("layer_types")
    if isinstance(types, list):
        sliding = [i for i, t in enumerate(types) if t != "full_attention"]
    elif d.get("use_sliding_window"):
        start = d.get("max_window_layers", 28)
        sliding = [i for i in range(layers) if i >= start]
    else:
        sliding = []
    window = d.get("sliding_window")
    if sliding and (window is None or window < context):
        raise ConfigError(f"{source}: field 'layer_types' / 'use_sliding_window' makes layer(s) {sliding[:4]} use "
                          f"sliding-window attention (window {window}), which minir1 does not implement")


def config_from_hf(d: dict[str, Any], source: str = CONFIG_FILE) -> DenseConfig:
    """Read a Hugging Face llama / qwen2 / qwen3 config dict; errors name `source` and the field."""
    family = d.get("model_type")
    if family not in ARCHITECTURES:
        raise ConfigError(f"{source}: field 'model_type' is {family!r}; this adapter reads {', '.join(ARCHITECTURES)}")
    missing = [f for f in REQUIRED_FIELDS if f not in d]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(repr(m) for m in missing)}")
    get = {**DEFAULTS[family], **{k: v for k, v in d.items() if v is not None or k in ("bos_token_id",
                                                                                       "eos_token_id")}}.get
    if get("hidden_act") not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        raise ConfigError(f"{source}: field 'hidden_act' is {get('hidden_act')!r}, which minir1 does not implement")
    theta, scaling = _rope(d, source)
    heads = get("num_attention_heads")
    kw: dict[str, Any] = dict(
        model_type=family, vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"), num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=heads, num_key_value_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim"), hidden_act=get("hidden_act"), max_position_embeddings=get("max_position_embeddings"),
        rms_norm_eps=get("rms_norm_eps"), rope_theta=theta, rope_scaling=scaling,
        attention_bias=bool(get("attention_bias", False)), qkv_bias=family == "qwen2",
        mlp_bias=bool(get("mlp_bias", False)), qk_norm=family == "qwen3",
        tie_word_embeddings=bool(get("tie_word_embeddings")), initializer_range=get("initializer_range", 0.02),
        bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"), pad_token_id=get("pad_token_id"))
    if family == "qwen2":
        kw["head_dim"] = None  # Qwen2 always splits hidden_size over the heads
    if isinstance(kw["eos_token_id"], list) and len(kw["eos_token_id"]) == 1:
        kw["eos_token_id"] = kw["eos_token_id"][0]
    _sliding_window(d, source, kw["num_hidden_layers"], kw["max_position_embeddings"])
    config = DenseConfig.__new__(DenseConfig)  # validated once below, naming the file
    config.__dict__.update(kw)
    config.validate(source)
    return config


def config_to_hf(config: DenseConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    d = config.to_dict()
    d.pop("qkv_bias")
    d.pop("qk_norm")
    rs = d.pop("rope_scaling")
    if config.model_type == "qwen2":
        d.pop("head_dim")
        d.pop("attention_bias")
        d.pop("mlp_bias")
    else:
        d["head_dim"] = config.dim
    if config.model_type == "qwen3":
        d.pop("mlp_bias")
    return {"architectures": [ARCHITECTURES[config.model_type]], **d,
            "rope_scaling": None if rs is None else {**rs, "type": rs["rope_type"]},
            "attention_dropout": 0.0, "torch_dtype": str(dtype).removeprefix("torch.")}


def read_config(path: Path) -> DenseConfig:
    from minir1 import files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a checkpoint directory needs a {CONFIG_FILE})")
    return config_from_hf(files.read_json(path, ConfigError), source=str(path))


def to_hf(state: dict[str, Tensor], config: DenseConfig) -> dict[str, Tensor]:
    return {(k if k == "lm_head.weight" else "model." + k): t for k, t in state.items()
            if not (k == "lm_head.weight" and config.tie_word_embeddings)}


def save_pretrained(model: DenseTransformer, path: str | Path, *, max_shard_bytes: int = 5 * 2**30,
                    state: dict[str, Tensor] | None = None) -> None:
    state = {k: v.detach() for k, v in (model.state_dict() if state is None else state).items()}
    dtype = state["embed_tokens.weight"].dtype
    weights.save(path, to_hf(state, model.config), config_to_hf(model.config, dtype), max_shard_bytes)


def load_pretrained(path: str | Path, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> DenseTransformer:
    """Build a dense model from a Hugging Face-layout directory, every tensor checked against the config.
    The weights keep their stored dtype (bf16 stays bf16) unless `dtype` is given."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = read_config(path / CONFIG_FILE)
    by_name = weights.weight_files(path)
    with torch.device("meta"):
        model = DenseTransformer(config)
    expected = {k: list(v.shape) for k, v in to_hf(model.state_dict(), config).items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    found = weights.check_names(path, by_name, expected, optional, ARCHITECTURES[config.model_type])
    # Each tensor is read once and becomes the parameter itself (assign=True): never two copies of the weights.
    tensors = weights.read_tensors(found, skip=set(), dtype=dtype)
    state = {(k.removeprefix("model.") if k != "lm_head.weight" else k): t for k, t in tensors.items()}
    del tensors
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = torch.empty(config.dim // 2)   # the one buffer, still on the meta device
    model.reset_buffers()
    return model.to(device)
