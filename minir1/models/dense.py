"""The dense families of the open reasoning checkpoints: Llama (Llama-3, SmolLM2, DeepSeek-R1-Distill-Llama),
Qwen2 (Qwen2.5, DeepSeek-R1-Distill-Qwen) and Qwen3, in plain PyTorch, field for field as `transformers`
computes them.

What is here:
  DenseConfig      the fields that change the math (names as in Hugging Face's configs), validation
  rope_inv_freq    RoPE frequencies: default, linear, llama3 and YaRN scaling
  DenseAttention   grouped-query attention (num_key_value_heads), optional q/k/v(/o) biases, Qwen3's
                   per-head q/k RMSNorm before RoPE, head_dim that need not be hidden / heads
  DenseMLP         gated feed-forward (SwiGLU for silu), optional biases
  DenseTransformer embedding, blocks, norm, head (tied or not)

The three families differ only in fields: Qwen2 is Llama with biases on q, k and v; Qwen3 is Llama with
q/k norms and a free head_dim. RoPE rotates the two halves of each head ("rotate_half"), as these
checkpoints expect (DeepSeek-V3 rotates interleaved pairs instead).

Shape legend: B batch, T tokens, S cached positions, H query heads, K key/value heads, Dh head_dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minir1.errors import ConfigError
from minir1.models.base import CausalLM, ModelOutput
from minir1.models.layers import RMSNorm, RowGather, at_positions, document_mask

FAMILIES = ("llama", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "relu": F.relu}


@dataclass
class DenseConfig:
    model_type: str = "llama"                # llama | qwen2 | qwen3
    vocab_size: int = 32000
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None              # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None   # {"rope_type": linear | llama3 | yarn, "factor": ..., ...}
    attention_bias: bool = False             # q, k, v and o (Llama, Qwen3)
    qkv_bias: bool = False                   # q, k and v only (Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False                    # Qwen3: RMSNorm over each head of q and k, before RoPE
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def dim(self) -> int:
        """The head dimension."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, list) else [e]

    def validate(self, source: str | None = None) -> None:
        where = f"{source}: " if source else ""

        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"{where}field '{name}' {msg}")

        if self.model_type not in FAMILIES:
            fail("model_type", f"is {self.model_type!r}; the dense families are {', '.join(FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(name, f"must be a positive integer (got {v!r})")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"({self.num_key_value_heads}) must divide num_attention_heads "
                                        f"({self.num_attention_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail("hidden_size", f"({self.hidden_size}) must be a multiple of num_attention_heads "
                                f"({self.num_attention_heads}) when head_dim is not given")
        if self.dim % 2:
            fail("head_dim", f"({self.dim}) must be even for RoPE")
        if self.hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"is {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                fail(name, f"must be a finite number > 0 (got {v!r})")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ROPE_TYPES:
                fail("rope_scaling", f"has rope_type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
            if kind != "default" and not (isinstance(rs.get("factor"), (int, float)) and rs["factor"] > 0):
                fail("rope_scaling", f"needs a 'factor' > 0 for rope_type {kind!r}")
            if kind == "llama3":
                for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if not isinstance(rs.get(k), (int, float)):
                        fail("rope_scaling", f"needs {k!r} for rope_type 'llama3'")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and 0 <= v):
                fail(name, f"must be a token id (got {v!r})")
        if any(not isinstance(e, int) or e < 0 for e in self.eos_ids):
            fail("eos_token_id", f"must be a token id or a list of them (got {self.eos_token_id!r})")

    def replace(self, **changes: Any) -> DenseConfig:
        return replace(self, **changes)

    @classmethod
    def from_preset(cls, model_type: str, preset: str, **overrides: Any) -> DenseConfig:
        """A new dense model of `model_type` at the widths of a DeepSeek-V3 preset (minir1/models/deepseek_v3.py):
        its vocabulary, hidden size, layers, heads, dense feed-forward width and context, with half as many
        key/value heads as query heads (GQA), tied embeddings, and each family's own fields (Qwen2's q/k/v
        biases, Qwen3's q/k norms). `overrides` are DenseConfig fields."""
        from minir1.models.deepseek_v3 import PRESETS
        if model_type not in FAMILIES:
            raise ConfigError(f"unknown dense family {model_type!r}; choose one of {', '.join(FAMILIES)}")
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        known = {f for f in cls.__dataclass_fields__}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ConfigError(f"{', '.join(bad)}: not a field of a dense {model_type} model (MLA and MoE settings "
                              "belong to deepseek_v3)")
        t = {**PRESETS[preset], **{k: v for k, v in overrides.items() if k in PRESETS[preset]}}
        heads = overrides.get("num_attention_heads", t["num_attention_heads"])
        base = dict(model_type=model_type, vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                    intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
                    num_attention_heads=heads, num_key_value_heads=max(1, heads // 2) if heads % 2 == 0 else heads,
                    max_position_embeddings=t["max_position_embeddings"], rms_norm_eps=1e-6,
                    tie_word_embeddings=True, qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3")
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> dict[str, int]:
        per_layer = 2 * self.num_key_value_heads * self.dim
        full = 2 * self.num_attention_heads * self.dim
        return {"gqa": per_layer * self.num_hidden_layers * bytes_per_value,
                "naive_mha": full * self.num_hidden_layers * bytes_per_value}


# --------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------

def rope_inv_freq(cfg: DenseConfig) -> tuple[Tensor, float]:
    """-> (inverse frequencies [Dh/2], attention factor that scales cos and sin), as transformers' RoPE
    initialisers compute them for rope_type default, linear, llama3 and yarn."""
    dim, base = cfg.dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        return inv_freq / float(rs["factor"]), 1.0
    if kind == "llama3":
        factor, low, high = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        factor = float(rs["factor"])
        orig = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = rs.get("attention_factor")
        if attention is None:
            m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def correction(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = correction(beta_fast), correction(beta_slow)
        if rs.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extrapolate = 1 - ramp
        return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, float(attention)
    return inv_freq, 1.0


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the two halves of each head: x [B, T, heads, Dh]; cos/sin [B, T, Dh/2]."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------

class DenseAttention(nn.Module):
    def __init__(self, cfg: DenseConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.dim, cfg.hidden_size, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Any = None,
                mask: Tensor | RowGather | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        scale = self.dim ** -0.5
        if cache is not None:  # the engine's GQA cache (minir1/engine/cache.py) writes and attends
            out = cache.attend(self.layer_idx, q, k, v, scale)
        elif isinstance(mask, RowGather):
            out = mask.attend(q, k, v, scale, enable_gqa=self.kv_heads != self.heads)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, heads, T, Dh]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                 enable_gqa=self.kv_heads != self.heads).transpose(1, 2)
        return self.o_proj(out.reshape(B, T, self.heads * self.dim))


class DenseMLP(nn.Module):
    def __init__(self, cfg: DenseConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DenseBlock(nn.Module):
    def __init__(self, cfg: DenseConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DenseAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DenseMLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Any = None,
                mask: Tensor | RowGather | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------

class DenseTransformer(CausalLM):
    """Embedding, `num_hidden_layers` pre-norm blocks, final norm, output head (tied to the embedding when
    `tie_word_embeddings`). `model(input_ids)` returns logits [B, T, V]."""

    cache_kind = "gqa"

    def __init__(self, config: DenseConfig) -> None:
        super().__init__()
        self.config = config
        # On the meta device (where checkpoints are loaded) the embedding is given its empty weight, so it skips its
        # own normal_ init, which there would import torch._dynamo: 2 s of every start-up. Elsewhere it draws as
        # usual, so a seed gives the same fresh weights as it always has.
        weight = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=weight if weight.is_meta else None)
        self.layers = nn.ModuleList(DenseBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", torch.empty(config.dim // 2), persistent=False)
        self.attention_factor = 1.0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.embed_tokens.weight.is_meta:  # shapes only (a checkpoint's weights come next): nothing to draw
            return
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        # fp32 whatever the weights' dtype, as transformers keeps it: bf16 frequencies would shift every angle.
        inv_freq, self.attention_factor = rope_inv_freq(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = positions[..., None].float() * self.inv_freq.float()
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)

    def forward(self, input_ids: Tensor, *, positions: Tensor | None = None, cache: Any = None,
                mtp: bool = False, return_dict: bool = False, logits_at: Tensor | None = None,
                doc_ids: Tensor | None = None, counted: Tensor | None = None,
                gather: RowGather | None = None) -> Tensor | ModelOutput:
        """As DeepSeek-V3's Transformer.forward (minir1/models/deepseek_v3.py); `mtp` and `counted` (for expert
        balancing) have nothing to act on here."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        mask: Tensor | RowGather | None = None if doc_ids is None else document_mask(doc_ids)
        if gather is not None:
            mask = gather
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mask)
        hidden = x
        logits = self.lm_head(self.norm(at_positions(x, logits_at)))
        if not (mtp or return_dict):
            return logits
        return ModelOutput(logits=logits, hidden=hidden)

    def num_parameters(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "activated": total, "mtp": 0}


__all__ = ["DenseConfig", "DenseTransformer", "rope_inv_freq"]
