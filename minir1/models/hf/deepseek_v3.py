"""DeepSeek-V3's Hugging Face adapter: config.json <-> ModelConfig, and our parameter names <-> theirs.

A checkpoint directory written here loads in `transformers.DeepseekV3ForCausalLM` and vice versa.
The in-memory model fuses some weights for speed (gate+up projections, stacked routed experts); this
file is the one place that maps them to and from the names DeepSeek's releases use:

  ours                                   Hugging Face / DeepSeek
  embed_tokens.weight                    model.embed_tokens.weight
  layers.{i}.X                           model.layers.{i}.X
  ....gate_up_proj.weight                ....gate_proj.weight + ....up_proj.weight
  layers.{i}.mlp.experts.gate_up_proj    model.layers.{i}.mlp.experts.{j}.{gate,up}_proj.weight
  layers.{i}.mlp.experts.down_proj       model.layers.{i}.mlp.experts.{j}.down_proj.weight
  mtp.{k}.block.X                        model.layers.{L+k}.X          (L = num_hidden_layers)
  mtp.{k}.{enorm,hnorm,eh_proj}          model.layers.{L+k}.{enorm,hnorm,eh_proj}
  mtp.{k}.norm                           model.layers.{L+k}.shared_head.norm
  (shared with the main model)           model.layers.{L+k}.embed_tokens / shared_head.head

The safetensors files themselves are read and written by weights.py, the same for every family.
"""

from __future__ import annotations

import logging
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import torch
from torch import Tensor

from minir1 import files
from minir1.errors import ConfigError
from minir1.models.deepseek_v3 import YARN_KEYS, ModelConfig, Transformer
from minir1.models.hf import weights
from minir1.models.hf.weights import CONFIG_FILE

log = logging.getLogger(__name__)
MODEL = Transformer

# --------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------

# Fields a config.json must state: HF's defaults for them are the 671B shapes, never what a user meant.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                   "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                   "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok")
# Defaults of transformers' DeepseekV3Config, so an optional field absent from a file means what it
# means to transformers.
HF_DEFAULTS: dict[str, Any] = dict(q_lora_rank=1536, n_shared_experts=1, first_k_dense_replace=3, n_group=8,
                                   topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
                                   rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False, num_nextn_predict_layers=0,
                                   initializer_range=0.02, aux_loss_alpha=0.0, bos_token_id=0, eos_token_id=1,
                                   pad_token_id=None)


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    d = config.to_dict()
    d.pop("model_type")
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **d,
        "num_key_value_heads": config.num_attention_heads,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_interleave": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _check_type(name: str, value: Any, hint: str, source: str) -> None:
    ok = True
    if value is None:
        ok = "None" in hint
    elif "bool" in hint:
        ok = isinstance(value, bool)
    elif "int" in hint and "float" not in hint:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif "float" in hint:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif "dict" in hint:
        ok = isinstance(value, dict)
    elif "str" in hint:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{source}: field '{name}' has the wrong type: expected {hint}, got {value!r}")


def config_from_hf(d: dict[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
    """Read a Hugging Face / DeepSeek config dict; errors name `source` and the field."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type != "deepseek_v3":
        raise ConfigError(f"{source}: field 'model_type' is {model_type!r}; minir1 reads 'deepseek_v3' checkpoints")
    missing = [f for f in REQUIRED_FIELDS if f not in d]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(repr(m) for m in missing)}")
    d = dict(d)
    # transformers >= 5 writes `rope_parameters` (theta + scaling) instead of rope_theta/rope_scaling.
    rp = d.pop("rope_parameters", None)
    if isinstance(rp, dict):
        d.setdefault("rope_theta", rp.get("rope_theta", HF_DEFAULTS["rope_theta"]))
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind != "default" and d.get("rope_scaling") is None:
            d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    if isinstance(d.get("rope_scaling"), dict):
        rs = {k: v for k, v in d["rope_scaling"].items() if k in (*YARN_KEYS, "type", "rope_type")}
        rs["type"] = rs.pop("rope_type", rs.get("type", "yarn"))
        d["rope_scaling"] = rs
    if isinstance(d.get("eos_token_id"), list):  # several EOS ids: the first is the model's own
        d["eos_token_id"] = d["eos_token_id"][0] if d["eos_token_id"] else None
    hints = {k: str(v) for k, v in get_type_hints(ModelConfig).items()}
    kwargs: dict[str, Any] = {}
    for f in fields(ModelConfig):
        if f.name == "model_type":
            continue
        value = d.get(f.name, HF_DEFAULTS.get(f.name))
        _check_type(f.name, value, hints[f.name], source)
        kwargs[f.name] = value
    # Built without __post_init__ so that the one validation names the file.
    config = ModelConfig.__new__(ModelConfig)
    config.__dict__.update(kwargs, model_type="deepseek_v3")
    config.validate(source)
    return config


def read_config(path: Path) -> ModelConfig:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a checkpoint directory needs a {CONFIG_FILE})")
    return config_from_hf(files.read_json(path, ConfigError), source=str(path))


# --------------------------------------------------------------------------------------------------
# Parameter names
# --------------------------------------------------------------------------------------------------

_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")


def _hf_prefix(key: str, n_layers: int) -> str:
    """Our name -> its HF name, before gate/up and expert splitting."""
    m = _MTP.match(key)
    if m:
        layer, rest = n_layers + int(m.group(1)), m.group(2)
        if rest.startswith("block."):
            rest = rest.removeprefix("block.")
        elif rest.startswith("norm."):
            rest = "shared_head." + rest
        return f"model.layers.{layer}.{rest}"
    return key if key == "lm_head.weight" else "model." + key


def to_hf(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our state dict -> HF-named tensors (views where possible)."""
    out: dict[str, Tensor] = {}
    L = config.num_hidden_layers
    for key, t in state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = _hf_prefix(key, L)
        if name.endswith("experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            for j, (g, u) in enumerate(zip(*t.chunk(2, dim=1))):
                out[f"{base}{j}.gate_proj.weight"], out[f"{base}{j}.up_proj.weight"] = g, u
        elif name.endswith("experts.down_proj"):
            base = name.removesuffix("down_proj")
            for j, w in enumerate(t.unbind(0)):
                out[f"{base}{j}.down_proj.weight"] = w
        elif name.endswith("gate_up_proj.weight"):
            base = name.removesuffix("gate_up_proj.weight")
            out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = t.chunk(2, dim=0)
        else:
            out[name] = t
    for k in range(config.num_nextn_predict_layers):  # DeepSeek's MTP layers carry copies of both
        out[f"model.layers.{L + k}.embed_tokens.weight"] = state["embed_tokens.weight"]
        out[f"model.layers.{L + k}.shared_head.head.weight"] = state["lm_head.weight"]
    return out


def _optional_hf_names(config: ModelConfig) -> set[str]:
    """Names a checkpoint may hold or omit: MTP copies of shared weights, a tied head."""
    L = config.num_hidden_layers
    names = {f"model.layers.{L + k}.{n}" for k in range(config.num_nextn_predict_layers)
             for n in ("embed_tokens.weight", "shared_head.head.weight")}
    if config.tie_word_embeddings:
        names.add("lm_head.weight")
    return names


def from_hf(tensors: dict[str, Tensor], model: Transformer) -> dict[str, Tensor]:
    """HF-named tensors -> our state dict (for `model`'s parameter names)."""
    L = model.config.num_hidden_layers
    out: dict[str, Tensor] = {}
    for key, ref in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        name = _hf_prefix(key, L)
        if name.endswith("experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            out[key] = torch.stack([torch.cat((tensors[f"{base}{j}.gate_proj.weight"],
                                               tensors[f"{base}{j}.up_proj.weight"])) for j in range(ref.shape[0])])
        elif name.endswith("experts.down_proj"):
            base = name.removesuffix("down_proj")
            out[key] = torch.stack([tensors[f"{base}{j}.down_proj.weight"] for j in range(ref.shape[0])])
        elif name.endswith("gate_up_proj.weight"):
            base = name.removesuffix("gate_up_proj.weight")
            out[key] = torch.cat((tensors[base + "gate_proj.weight"], tensors[base + "up_proj.weight"]))
        else:
            out[key] = tensors[name]
    return out


# --------------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------------

def save_pretrained(model: Transformer, path: str | Path, *, max_shard_bytes: int = 5 * 2**30,
                    state: dict[str, Tensor] | None = None) -> None:
    """Write config.json and model.safetensors (or shards + index) in Hugging Face's layout. `state`: a
    full state dict to write instead of the model's own (gathered from a sharded model)."""
    state = {k: v.detach() for k, v in (model.state_dict() if state is None else state).items()}
    dtype = state["embed_tokens.weight"].dtype
    weights.save(path, to_hf(state, model.config), config_to_hf(model.config, dtype), max_shard_bytes)


def load_pretrained(path: str | Path, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> Transformer:
    """Build a Transformer from a Hugging Face-layout directory, checking every tensor against the config."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = read_config(path / CONFIG_FILE)
    by_name = weights.weight_files(path)
    L = config.num_hidden_layers
    if config.num_nextn_predict_layers and not any(n.startswith(f"model.layers.{L}.") for n in by_name):
        # transformers writes num_nextn_predict_layers but never MTP weights: load without MTP.
        log.info("%s: config.json names %d MTP module(s) but the weights hold none; loading without MTP",
                 path, config.num_nextn_predict_layers)
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: list(v.shape) for k, v in to_hf(model.state_dict(), config).items()}
    optional = _optional_hf_names(config)
    found = weights.check_names(path, by_name, expected, optional, "DeepseekV3")
    state = from_hf(weights.read_tensors(found, skip=optional), model)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state)
    model.reset_buffers()
    if dtype is not None:
        model = model.to(dtype)
    return model
