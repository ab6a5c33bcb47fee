"""The DeepSeek-V3 architecture in plain PyTorch, at any size.

What is here, in reading order:
  ModelConfig        hyper-parameters (names as in Hugging Face's DeepseekV3Config), validation, presets
  RMSNorm            root-mean-square layer norm
  RotaryEmbedding    RoPE on interleaved pairs, with YaRN context extension (DeepSeek-V2 §2.1.3, App. B)
  MLAttention        Multi-head Latent Attention with decoupled RoPE (DeepSeek-V2 §2.1)
  MLP                SwiGLU feed-forward (dense layers and shared experts)
  Router             sigmoid affinities, group-limited top-k, bias-based balancing (DeepSeek-V3 §2.1.2)
  MoE                shared + fine-grained routed experts, vectorised dispatch
  Block              pre-norm attention + feed-forward
  MTPModule          one multi-token-prediction depth (DeepSeek-V3 §2.2)
  Transformer        embedding, blocks, norm, head, MTP modules (minir1/models/base.py's CausalLM);
                     checkpoint I/O in minir1/models/hf/deepseek_v3.py, which imports this file

Shape legend: B batch, T tokens (query), S tokens (key), D hidden_size, H heads, E routed experts,
K experts per token, N = B*T flattened tokens, V vocabulary, C kv_lora_rank, R qk_rope_head_dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minir1.errors import ConfigError
from minir1.models.base import CausalLM, ModelOutput
from minir1.models.layers import RMSNorm, RowGather, at_positions, document_mask

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


@dataclass
class ModelConfig:
    """DeepSeek-V3 hyper-parameters. Field names and meanings follow Hugging Face's `DeepseekV3Config`.

    `rope_scaling` is None (plain RoPE) or a YaRN dict with the keys in `YARN_KEYS`.
    `aux_loss_alpha` is the weight α of the optional sequence-wise balance loss (DeepSeek-V3 eq. 17-20).
    """

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    moe_intermediate_size: int = 64
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    q_lora_rank: int | None = 64
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    n_group: int = 2
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1
    initializer_range: float = 0.02
    aux_loss_alpha: float = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    model_type: str = field(default="deepseek_v3", repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ------------------------------------------------------------------------------
    def validate(self, source: str | None = None) -> None:
        """Raise ConfigError naming the first field that breaks a rule (and `source`, e.g. a file)."""
        where = f"{source}: " if source else ""

        def fail(msg: str) -> None:
            raise ConfigError(where + msg)

        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(f"{name} ({v!r}) must be a positive integer")
        non_negative = ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace",
                        "num_nextn_predict_layers", "moe_intermediate_size")
        for name in non_negative:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(f"{name} ({v!r}) must be an integer >= 0")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail(f"q_lora_rank ({self.q_lora_rank!r}) must be a positive integer or null (no query compression)")
        if self.qk_rope_head_dim % 2:
            fail(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (RoPE rotates pairs)")
        if self.has_moe:
            if self.n_routed_experts < 1:
                fail(f"n_routed_experts ({self.n_routed_experts}) must be >= 1 when a layer is MoE "
                     f"(first_k_dense_replace {self.first_k_dense_replace} < num_hidden_layers "
                     f"{self.num_hidden_layers})")
            if self.moe_intermediate_size < 1:
                fail(f"moe_intermediate_size ({self.moe_intermediate_size}) must be >= 1 when a layer is MoE")
            if not isinstance(self.num_experts_per_tok, int) or self.num_experts_per_tok < 1:
                fail(f"num_experts_per_tok ({self.num_experts_per_tok!r}) must be a positive integer")
            if self.num_experts_per_tok > self.n_routed_experts:
                fail(f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= n_routed_experts "
                     f"({self.n_routed_experts})")
            if not isinstance(self.n_group, int) or self.n_group < 1:
                fail(f"n_group ({self.n_group!r}) must be a positive integer")
            if self.n_routed_experts % self.n_group:
                fail(f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
            if not isinstance(self.topk_group, int) or not 1 <= self.topk_group <= self.n_group:
                fail(f"topk_group ({self.topk_group!r}) must be between 1 and n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                fail(f"n_routed_experts / n_group ({per_group}) must be >= 2: a group is scored by its top-2 "
                     "affinities")
            if self.num_experts_per_tok > self.topk_group * per_group:
                fail(f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= topk_group x experts per group "
                     f"({self.topk_group} x {per_group})")
        for name in ("routed_scaling_factor", "rope_theta", "rms_norm_eps", "aux_loss_alpha", "initializer_range"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                fail(f"{name} ({v!r}) must be a finite number")
        if self.routed_scaling_factor <= 0:
            fail(f"routed_scaling_factor ({self.routed_scaling_factor}) must be > 0")
        if self.rope_theta <= 1:
            fail(f"rope_theta ({self.rope_theta}) must be > 1")
        if self.rms_norm_eps <= 0:
            fail(f"rms_norm_eps ({self.rms_norm_eps}) must be > 0")
        if self.aux_loss_alpha < 0:
            fail(f"aux_loss_alpha ({self.aux_loss_alpha}) must be >= 0")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if not isinstance(rs, dict):
                fail(f"rope_scaling ({rs!r}) must be null or an object")
            kind = rs.get("type", rs.get("rope_type", "yarn"))
            if kind != "yarn":
                fail(f"rope_scaling.type ({kind!r}) is not supported: only 'yarn' (DeepSeek-V3's) is")

            def number(v: Any) -> bool:
                return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

            if not number(rs.get("factor")) or rs["factor"] < 1:
                fail(f"rope_scaling.factor ({rs.get('factor')!r}) must be a number >= 1")
            omp = rs.get("original_max_position_embeddings")
            if not isinstance(omp, int) or isinstance(omp, bool) or omp <= 0:
                fail(f"rope_scaling.original_max_position_embeddings ({omp!r}) must be a positive integer")
            for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                v = rs.get(key)
                if v is not None and (not number(v) or v < 0):
                    fail(f"rope_scaling.{key} ({v!r}) must be null or a finite number >= 0")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and 0 <= v < self.vocab_size):
                fail(f"{name} ({v!r}) must be null or an id in [0, vocab_size={self.vocab_size})")

    # -- derived -----------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return self.first_k_dense_replace < self.num_hidden_layers + self.num_nextn_predict_layers

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers from `first_k_dense_replace` on are MoE; MTP blocks count after the main layers."""
        return layer_idx >= self.first_k_dense_replace

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # -- sizes ---------------------------------------------------------------------------------------
    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> dict[str, int]:
        """Per-token KV-cache memory: MLA's latent cache vs. the naive per-head keys and values."""
        layers = self.num_hidden_layers
        latent = (self.kv_lora_rank + self.qk_rope_head_dim) * layers * bytes_per_value
        naive = self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * layers * bytes_per_value
        return {"mla_latent": latent, "naive_mha": naive}


PRESETS: dict[str, dict[str, Any]] = {
    # Every code path (query compression, groups, dense + MoE layers, MTP), about 1.2M parameters (+0.4M MTP).
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=512, moe_intermediate_size=96,
                 num_hidden_layers=3, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
                 max_position_embeddings=512, num_nextn_predict_layers=1),
    # The CPU demo model: 12.3M parameters, 5.4M activated per token (+2.0M MTP).
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                  num_hidden_layers=6, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=4, topk_group=2,
                  max_position_embeddings=1024, num_nextn_predict_layers=1),
    # DeepSeek-V2-Lite's published shapes (15.7B total, 2.4B activated) on the V3 architecture: its
    # softmax router is replaced by V3's sigmoid router, so its released weights are not a target.
    "deepseek-v2-lite": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                             first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                             norm_topk_prob=False, max_position_embeddings=163840,
                             rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                               beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
                             num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001),
    # DeepSeek-V3 / R1 (671B total, 37B activated, plus one 14B MTP module).
    "deepseek-v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
                        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, n_group=8,
                        topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
                        max_position_embeddings=163840,
                        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
                        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1),
}


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction, 0.1·m·ln(s) + 1 (DeepSeek-V2 App. B)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class RotaryEmbedding(nn.Module):
    """RoPE angles for the decoupled rope dimensions, with optional YaRN frequency blending."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.qk_rope_head_dim // 2), persistent=False)
        self.attention_factor, self.softmax_scale = 1.0, config.qk_head_dim ** -0.5
        rs = config.rope_scaling
        if rs is not None:
            factor = float(rs["factor"])
            mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
            if mscale and mscale_all:
                self.attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
            else:
                self.attention_factor = yarn_mscale(factor)
            if mscale_all:  # the softmax temperature correction lives in the attention scale
                self.softmax_scale *= yarn_mscale(factor, mscale_all) ** 2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg, dim = self.config, self.config.qk_rope_head_dim
        with torch.device(self.inv_freq.device if self.inv_freq.device.type != "meta" else "cpu"):
            pos_freqs = cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
            inv_freq = 1.0 / pos_freqs
            rs = cfg.rope_scaling
            if rs is not None:
                factor = float(rs["factor"])
                beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
                orig = rs["original_max_position_embeddings"]

                def correction_dim(rotations: float) -> float:
                    return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

                low = max(math.floor(correction_dim(beta_fast)), 0)
                high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
                ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)
                extrapolate = 1 - ramp.clamp(0, 1)  # 1 keeps the original frequency, 0 interpolates it
                inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
        if self.inv_freq.device.type == "meta":
            self.inv_freq = inv_freq.to("meta")
        else:
            self.inv_freq.copy_(inv_freq)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [B, T] -> (cos, sin), each [B, T, R/2], scaled by YaRN's attention factor."""
        angles = positions[..., None].float() * self.inv_freq
        return ((angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek's weights expect.

    x [B, T, ..., R]; cos/sin [B, T, R/2] broadcast over the middle dims. The result is laid out as
    [rotated evens | rotated odds]: queries and keys get the same permutation, so q·k is unchanged and
    no re-interleaving copy is needed.
    """
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 §2.1).

    Keys and values are reconstructed from one compressed latent c_KV (kv_lora_rank, RMS-normalised;
    eq. 9-11) plus one rotary key k_R shared by every head (decoupled RoPE, eq. 14-19). Queries are
    optionally compressed too (eq. 12-13). Only c_KV and k_R need caching; see minir1/engine.py.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.n_heads, self.nope_dim, self.rope_dim = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_dim, self.kv_rank, self.q_rank = c.v_head_dim, c.kv_lora_rank, c.q_lora_rank
        qk = c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)  # eps 1e-6 as in DeepSeek's release, not rms_norm_eps
            self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_attention_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=False)

    def queries(self, x: Tensor) -> Tensor:
        """x [B, T, D] -> q [B, T, H, nope + rope]."""
        q = self.q_proj(x) if self.q_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(*x.shape[:-1], self.n_heads, self.nope_dim + self.rope_dim)

    def latents(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, D] -> normalised latent c_KV [B, T, C] and rotated shared key k_R [B, T, R]."""
        latent, rope_key = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(latent), apply_rope(rope_key, cos, sin)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, scale: float, cache: Any = None,
                layer_idx: int = 0, mask: Tensor | RowGather | None = None) -> Tensor:
        B, T, _ = x.shape
        q_BTHd = self.queries(x)
        q_nope, q_rope = q_BTHd.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        latent_BTC, rope_key_BTR = self.latents(x, cos, sin)
        if cache is not None:  # decoding: attend in latent space with absorbed up-projections (engine.py)
            out_BTHv = cache.attend(self, layer_idx, q_nope, q_rope, latent_BTC, rope_key_BTR, scale)
            return self.o_proj(out_BTHv.reshape(B, T, -1))
        # Training / full-sequence path: expand the latent to per-head keys and values (eq. 10-11).
        kv = self.kv_b_proj(latent_BTC).view(B, T, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, rope_key_BTR[:, :, None, :].expand(B, T, self.n_heads, self.rope_dim)), dim=-1)
        pad = self.nope_dim + self.rope_dim - self.v_dim
        if pad > 0:  # equal head dims let SDPA take its fused (flash) kernel instead of the math path
            v = F.pad(v, (0, pad))
        if isinstance(mask, RowGather):
            out_BTHv = mask.attend(q, k, v, scale)
        else:
            out_BTHv = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      attn_mask=mask, is_causal=mask is None,
                                                      scale=scale).transpose(1, 2)
        if pad > 0:
            out_BTHv = out_BTHv[..., :self.v_dim]
        return self.o_proj(out_BTHv.reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward. gate and up projections are fused into one matmul (`gate_up_proj`); the
    checkpoint stores them apart, as `gate_proj` and `up_proj` (minir1/hf.py splits them)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Router(nn.Module):
    """DeepSeek-V3's gate (§2.1.2, eq. 13-16): sigmoid affinities; a per-expert bias that only steers
    which experts are chosen (auxiliary-loss-free balancing); group-limited top-k; normalised weights."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.n_routed_experts
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (weights [N, K], expert ids [N, K], affinities [N, E]). Routing runs in fp32."""
        scores = F.linear(x_ND.float(), self.weight.float()).sigmoid()
        # The bias picks, never weighs. NaN ranks as -inf, so that routing is total: exactly top_k distinct
        # experts for any scores (NaN, ±inf, ties), chosen as the native decode step chooses them.
        choice = _rank_key(scores.detach() + self.e_score_correction_bias.float())
        allowed = None
        if self.n_group > 1 and self.topk_group < self.n_group:
            # Rank groups by the sum of their two best biased affinities; keep topk_group of them.
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = _rank_key(grouped.topk(2, dim=-1).values.sum(-1))
            keep = _top_indices(group_scores, self.topk_group)
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            allowed = group_mask[..., None].expand_as(grouped).flatten(1)
        ids = _top_indices(choice, self.top_k, allowed)
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids, scores


def _rank_key(x: Tensor) -> Tensor:
    """Scores as ranking keys: NaN ranks lowest (as -inf)."""
    return x.masked_fill(x.isnan(), float("-inf"))


def _top_indices(keys: Tensor, k: int, allowed: Tensor | None = None) -> Tensor:
    """[N, E] -> [N, k]: the k distinct columns ranked first by (allowed, key, lower index), as the native
    kernel ranks them. topk decides every row whose k-th and (k+1)-th keys differ (the set is then unique);
    rows with a tie there (equal scores, or -inf: NaN or masked-out experts) are ranked exactly by two
    stable sorts, which cost three topk's and so run only on those rows."""
    masked = keys if allowed is None else keys.masked_fill(~allowed, float("-inf"))
    if k >= keys.shape[-1]:
        return masked.topk(k, dim=-1).indices
    values, ids = masked.topk(k + 1, dim=-1)
    tied = values[:, k - 1] == values[:, k]
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        order = keys[rows].sort(dim=-1, descending=True, stable=True).indices
        if allowed is not None:
            order = order.gather(1, allowed[rows].gather(1, order).to(torch.int8).sort(
                dim=-1, descending=True, stable=True).indices)
        ids = ids.index_copy(0, rows, order[:, :k + 1])
    return ids[:, :k]


def grouped_linear(x_sorted: Tensor, weight_EOI: Tensor, counts_E: Tensor) -> Tensor:
    """Row block e of `x_sorted` (counts_E[e] rows, blocks in expert order) times weight_EOI[e]^T.

    On the CPU, torch's grouped GEMM runs all experts in one call (forward and backward); elsewhere a
    loop over experts, each a dense matmul on its contiguous block. Under torch.compile the same
    computation is one opaque op, so the data-dependent block sizes never reach the graph.
    """
    if torch.compiler.is_compiling():
        return _grouped_linear_op(x_sorted, weight_EOI, counts_E)
    if _GROUPED_MM and x_sorted.device.type == "cpu" and x_sorted.dtype == torch.float32:
        offsets = counts_E.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x_sorted, weight_EOI.transpose(-2, -1), offs=offsets)
    outs = [F.linear(chunk, weight_EOI[e]) for e, chunk in enumerate(x_sorted.split(counts_E.tolist())) if len(chunk)]
    return torch.cat(outs) if outs else x_sorted.new_zeros(0, weight_EOI.shape[1])


_GROUPED_MM = hasattr(torch, "_grouped_mm")


@torch.library.custom_op("minir1::grouped_linear", mutates_args=())
def _grouped_linear_op(x_sorted: Tensor, weight_EOI: Tensor, counts_E: Tensor) -> Tensor:
    outs = [F.linear(chunk, weight_EOI[e]) for e, chunk in enumerate(x_sorted.split(counts_E.tolist())) if len(chunk)]
    return torch.cat(outs) if outs else x_sorted.new_zeros(0, weight_EOI.shape[1])


@_grouped_linear_op.register_fake
def _(x_sorted: Tensor, weight_EOI: Tensor, counts_E: Tensor) -> Tensor:
    return x_sorted.new_empty(x_sorted.shape[0], weight_EOI.shape[1])


@torch.library.custom_op("minir1::grouped_linear_weight_grad", mutates_args=())
def _grouped_weight_grad_op(grad: Tensor, x_sorted: Tensor, counts_E: Tensor, weight_like: Tensor) -> Tensor:
    out = torch.zeros_like(weight_like)
    sizes = counts_E.tolist()
    for e, (g, x) in enumerate(zip(grad.split(sizes), x_sorted.split(sizes))):
        if len(g):
            out[e] = g.t() @ x
    return out


@_grouped_weight_grad_op.register_fake
def _(grad: Tensor, x_sorted: Tensor, counts_E: Tensor, weight_like: Tensor) -> Tensor:
    return torch.empty_like(weight_like)


def _grouped_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
    x_sorted, weight_EOI, counts_E = ctx.saved_tensors
    grad_x = _grouped_linear_op(grad, weight_EOI.transpose(1, 2).contiguous(), counts_E)
    return grad_x, _grouped_weight_grad_op(grad, x_sorted, counts_E, weight_EOI), None


_grouped_linear_op.register_autograd(_grouped_backward, setup_context=_grouped_setup)


DENSE_MOE_MAX_TOKENS = 64  # decode batches up to this size may run every expert densely (see MoE)


class MoE(nn.Module):
    """DeepSeekMoE (DeepSeek-V3 §2.1.2, eq. 12): shared experts + top-k of many fine-grained experts.

    Routed experts live in two stacked tensors, `gate_up_proj` [E, 2I, D] and `down_proj` [E, D, I];
    dispatch sorts the N·K (token, expert) pairs by expert and runs one dense matmul per expert on a
    contiguous slice: no loop over tokens, no padding, no one-hot masks.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts, self.top_k, self.aux_alpha = E, config.num_experts_per_tok, config.aux_loss_alpha
        self.gate = Router(config)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.experts.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.shared_experts = MLP(D, I * config.n_shared_experts) if config.n_shared_experts > 0 else None
        # Tokens routed to each expert: in the last forward, and summed since the last bias update.
        self.register_buffer("last_load", torch.zeros(E), persistent=False)
        self.register_buffer("load_since_update", torch.zeros(E), persistent=False)
        self.aux_loss: Tensor | None = None
        self.counted: Tensor | None = None  # [B, T] real tokens of the current forward (see Transformer.forward)

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        weights_NK, ids_NK, scores_NE = self.gate(x_ND)
        flat_ids = ids_NK.flatten()
        load = torch.zeros(self.n_experts, dtype=torch.long, device=flat_ids.device)
        load.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))  # a bincount of static shape
        with torch.no_grad():
            self.last_load.copy_(load)
            if self.training:  # only training forwards steer the balancing (not rollouts or eval)
                counted = self.counted
                if counted is not None and counted.numel() == x_ND.shape[0]:  # padding does not count
                    real = flat_ids[counted.reshape(-1).repeat_interleave(self.top_k)]
                    self.load_since_update.add_(torch.zeros_like(load).scatter_add_(0, real, torch.ones_like(real)))
                else:
                    self.load_since_update.add_(load)
        if self._dense_is_cheaper(x_ND.shape[0]):
            return self._dense_forward(x_ND, weights_NK, ids_NK).view(B, T, D)
        order = flat_ids.argsort(stable=True)
        token_of = order // self.top_k  # which token each sorted (token, expert) pair belongs to
        x_sorted = x_ND.index_select(0, token_of)
        gate, up = grouped_linear(x_sorted, self.experts.gate_up_proj, load).chunk(2, dim=-1)
        # The routing weight scales the expert's output; applying it before the (linear) down
        # projection is the same product on a narrower tensor.
        h = F.silu(gate) * up * weights_NK.flatten()[order, None].to(x_ND.dtype)
        y_sorted = grouped_linear(h, self.experts.down_proj, load)
        y_ND = torch.zeros_like(x_ND).index_add_(0, token_of, y_sorted)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        self.aux_loss = None
        if self.aux_alpha > 0 and self.training:
            self.aux_loss = self.sequence_balance_loss(scores_NE.view(B, T, -1), ids_NK.view(B, T, -1))
        return y_ND.view(B, T, D)

    def _dense_is_cheaper(self, n_tokens: int) -> bool:
        """Decoding a few tokens with few experts (E ≤ 4·top-k), without gradients: every expert on every
        token in two batched matmuls costs less than dispatching (sort, gather, one small GEMM per expert,
        scatter), where per-call overhead dominates. Unselected experts get weight 0: the same sum."""
        return (not torch.is_grad_enabled() and n_tokens <= DENSE_MOE_MAX_TOKENS
                and self.n_experts <= 4 * self.top_k)

    def _dense_forward(self, x_ND: Tensor, weights_NK: Tensor, ids_NK: Tensor) -> Tensor:
        E, N = self.n_experts, x_ND.shape[0]
        w_EN = torch.zeros(N, E, dtype=x_ND.dtype, device=x_ND.device).scatter_(
            1, ids_NK, weights_NK.to(x_ND.dtype)).t()
        h = torch.bmm(x_ND.expand(E, N, -1), self.experts.gate_up_proj.transpose(1, 2))   # [E, N, 2I]
        gate, up = h.chunk(2, dim=-1)
        y_ND = torch.bmm(F.silu(gate) * up * w_EN[..., None], self.experts.down_proj.transpose(1, 2)).sum(0)
        self.aux_loss = None
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        return y_ND

    def sequence_balance_loss(self, scores_BTE: Tensor, ids_BTK: Tensor) -> Tensor:
        """Complementary sequence-wise balance loss, α·Σ_i f_i·P_i per sequence (DeepSeek-V3 eq. 17-20)."""
        T, E, K = scores_BTE.shape[1], self.n_experts, self.top_k
        counts = torch.zeros(scores_BTE.shape[0], E, device=scores_BTE.device)
        counts.scatter_add_(1, ids_BTK.flatten(1), torch.ones_like(ids_BTK.flatten(1), dtype=counts.dtype))
        f = counts * E / (K * T)
        p = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(1)
        return self.aux_alpha * (f * p).sum(-1).mean()


class Block(nn.Module):
    """Pre-norm decoder layer: x + Attn(norm(x)), then + FFN(norm(x)), FFN dense or MoE by layer index."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (MoE(config) if config.is_moe_layer(layer_idx)
                               else MLP(config.hidden_size, config.intermediate_size))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, scale: float, cache: Any = None,
                mask: Tensor | RowGather | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, scale, cache, self.layer_idx, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """One multi-token-prediction depth k (DeepSeek-V3 §2.2, eq. 21-23).

    h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], then one Transformer block, then the
    shared output head behind this depth's own norm. The concatenation order (embedding first) is that
    of DeepSeek's released MTP weights. Embedding and head are the main model's (not owned here).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = Block(config, layer_idx)
        self.norm = RMSNorm(D, config.rms_norm_eps)  # `shared_head.norm` in DeepSeek's checkpoints

    def forward(self, hidden: Tensor, next_embeds: Tensor, cos: Tensor, sin: Tensor, scale: float,
                cache: Any = None, mask: Tensor | None = None) -> Tensor:
        h = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
        return self.block(h, cos, sin, scale, cache, mask)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class Transformer(CausalLM):
    """DeepSeek-V3: embedding, `num_hidden_layers` blocks, final norm, output head, and
    `num_nextn_predict_layers` MTP modules sharing the embedding and head.

    `model(input_ids)` returns logits [B, T, V]. With `mtp=True` or `return_dict=True` it returns a
    ModelOutput holding the MTP logits, the balance loss and the router loads of the same forward.
    """

    cache_kind = "mla"  # MLA's latent cache (DeepSeek-V2 §2.1.2)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # On the meta device (where checkpoints are loaded) the embedding is given its empty weight, so it skips its
        # own normal_ init, which there would import torch._dynamo: 2 s of every start-up. Elsewhere it draws as
        # usual, so a seed gives the same fresh weights as it always has.
        weight = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=weight if weight.is_meta else None)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        L = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(config, L + k) for k in range(config.num_nextn_predict_layers))
        self.reset_parameters()

    # -- construction --------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.embed_tokens.weight.is_meta:  # shapes only (a checkpoint's weights come next): nothing to draw
            return
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or ".enorm." in name or ".hnorm." in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for m in self.moe_layers():
            m.gate.e_score_correction_bias.zero_()
            m.last_load.zero_()
            m.load_since_update.zero_()
        self.rotary.reset_parameters()

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after `to_empty`, e.g. when loading from the meta device)."""
        self.rotary.reset_parameters()
        for m in self.moe_layers():
            m.last_load.zero_()
            m.load_since_update.zero_()

    # -- the forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, *, positions: Tensor | None = None, cache: Any = None,
                mtp: bool = False, return_dict: bool = False, logits_at: Tensor | None = None,
                doc_ids: Tensor | None = None, counted: Tensor | None = None,
                gather: RowGather | None = None) -> Tensor | ModelOutput:
        """input_ids [B, T] -> logits [B, T, V], or only at the positions `logits_at` of each row: [B] gives
        [B, 1, V], [B, K] gives [B, K, V] (the head and its gradient skip every other position).

        `positions` [B, T] defaults to 0..T-1. `cache` (an engine cache) switches attention to the
        latent-cache decoding path. `mtp=True` also runs the MTP modules over the same hidden states.
        `doc_ids` [B, T] marks the documents packed in each row: attention never crosses them (pass
        positions that restart at each document too). `counted` [B, T] (bool) marks the real tokens: only they
        count in the expert loads that steer the balancing bias (padding does not). `gather` (input_ids [1, N]:
        tokens that several sequences share, stored once) runs attention over the sequences it lists
        (layers.RowGather: GRPO's prefix trees, minir1/train/prefix_tree.py).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        mask: Tensor | RowGather | None = None if doc_ids is None else document_mask(doc_ids)
        if gather is not None:
            if mtp:
                raise ValueError("gather: MTP reads the sequences' next tokens, which a shared layout does not hold")
            mask = gather
        if counted is None:
            return self._forward(input_ids, positions, cache, mtp, return_dict, logits_at, mask)
        moe = self.moe_layers()
        for m in moe:
            m.counted = counted
        try:
            return self._forward(input_ids, positions, cache, mtp, return_dict, logits_at, mask)
        finally:
            for m in moe:
                m.counted = None

    def _forward(self, input_ids: Tensor, positions: Tensor | None, cache: Any, mtp: bool, return_dict: bool,
                 logits_at: Tensor | None, mask: Tensor | RowGather | None) -> Tensor | ModelOutput:
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        scale = self.rotary.softmax_scale
        for layer in self.layers:
            x = layer(x, cos, sin, scale, cache, mask)
        hidden = x
        logits = self.lm_head(self.norm(at_positions(x, logits_at)))  # e.g. each prompt's last token
        if not (mtp or return_dict):
            return logits
        out = ModelOutput(logits=logits, hidden=hidden)
        if mtp:
            out.mtp_logits = self.mtp_forward(hidden, input_ids, cos, sin, mask)
        moe = self.moe_layers()
        if moe:
            out.router_load = torch.stack([m.last_load for m in moe])
            losses = [m.aux_loss for m in moe if m.aux_loss is not None]
            out.aux_loss = torch.stack(losses).sum() if losses else None
        return out

    @property
    def num_mtp_modules(self) -> int:
        return len(self.mtp)

    def mtp_draft(self, hidden: Tensor, next_ids: Tensor, positions: Tensor, cache: Any) -> Tensor:
        """MTP depth 1 on the cache (speculative decoding): hidden h_i and token t_{i+1} -> logits for t_{i+2}."""
        if not len(self.mtp):
            return super().mtp_draft(hidden, next_ids, positions, cache)
        module = self.mtp[0]
        cos, sin = self.rotary(positions, hidden.dtype)
        h = module(hidden, self.embed_tokens(next_ids), cos, sin, self.rotary.softmax_scale, cache)
        return self.lm_head(module.norm(h))

    def mtp_forward(self, hidden: Tensor, input_ids: Tensor, cos: Tensor, sin: Tensor,
                    mask: Tensor | None = None) -> list[Tensor]:
        """Sequential MTP depths over a full sequence (training): depth k sees positions 0..T-1-k."""
        logits, h = [], hidden
        for k, module in enumerate(self.mtp, start=1):
            T = h.shape[1] - 1
            if T <= 0:
                break
            next_embeds = self.embed_tokens(input_ids[:, k:k + T])
            h = module(h[:, :T], next_embeds, cos[:, :T], sin[:, :T], self.rotary.softmax_scale,
                       mask=None if mask is None else mask[..., :T, :T])
            logits.append(self.lm_head(module.norm(h)))
        return logits

    # -- auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2) ----------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def router_load(self) -> Tensor | None:
        """[MoE layers, E]: tokens routed to each expert in the last forward."""
        moe = self.moe_layers()
        return torch.stack([m.last_load for m in moe]) if moe else None

    @torch.no_grad()
    def update_route_bias(self, speed: float) -> Tensor | None:
        """After an optimizer step: move each expert's bias by `speed` (γ) toward balance — down if it
        took more than the mean load since the last update, up if less. Returns the max/mean load ratio
        per MoE layer. Loads are summed across processes when torch.distributed is initialised."""
        moe = self.moe_layers()
        if not moe:
            return None
        loads = torch.stack([m.load_since_update for m in moe])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loads)
        mean = loads.mean(-1, keepdim=True)
        for m, load, layer_mean in zip(moe, loads, mean):
            m.gate.e_score_correction_bias.add_(speed * torch.sign(layer_mean - load))
            m.load_since_update.zero_()
        return (loads.max(-1).values / mean.squeeze(-1).clamp_min(1e-9))

    # -- sizes ---------------------------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: `total` (main model), `activated` per token, and `mtp` (the MTP modules,
        whose embedding and head are shared and not counted again). Works on the meta device."""
        cfg = self.config
        mtp = sum(p.numel() for p in self.mtp.parameters())
        total = sum(p.numel() for p in self.parameters()) - mtp
        expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        idle = sum((cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
                   for layer in self.layers if isinstance(layer.mlp, MoE))
        return {"total": total, "activated": total - idle, "mtp": mtp}
