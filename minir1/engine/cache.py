"""The engine's KV caches. For MLA (DeepSeek-V2 §2.1.2), per layer and token only the compressed latent
c_KV and the shared rope key k_R, attended with the up-projections absorbed into q and o.

Shape legend: B rows in the running batch, T new tokens this step, S cached positions, H heads,
C kv_lora_rank, R qk_rope_head_dim.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from minir1.models.deepseek_v3 import MLAttention


def new_cache(model: Any, batch: int, max_len: int, extra_layers: int = 0,
              dtype: torch.dtype | None = None) -> LatentCache | KVCache:
    """An empty cache for `batch` rows of up to `max_len` positions of `model`; `extra_layers` more layers for
    the MTP module's attention (speculative decoding). `dtype`: the model's unless given (the native decode
    step keeps an fp32 cache for bf16 weights)."""
    cfg = model.config
    dtype = dtype or model.dtype
    if model.cache_kind == "mla":
        return LatentCache(cfg.num_hidden_layers + extra_layers, batch, max_len, cfg.kv_lora_rank,
                           cfg.qk_rope_head_dim, dtype, model.device)
    if model.cache_kind == "gqa":
        return KVCache(cfg.num_hidden_layers + extra_layers, batch, max_len, cfg.num_key_value_heads, cfg.dim,
                       dtype, model.device)
    raise ValueError(f"{type(model).__name__}: the engine has no {model.cache_kind!r} KV cache")


class LatentCache:
    """MLA's KV cache: for each layer and position, the normalised latent c_KV (C values) and the
    rotated shared rope key k_R (R values), in one buffer `kv` [layers, B, S, C + R].

    Positions are absolute: a row writes position p at index p, so a rejected speculative token or a
    padded prompt tail is simply overwritten later; attention only reads indices <= the query's
    position. The engine sets `positions` [B, T] before each forward.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.kv_rank = kv_rank
        self.kv = torch.zeros(n_layers, batch, max_len, kv_rank + rope_dim, dtype=dtype, device=device)
        self.positions: Tensor | None = None
        self._mask: Tensor | None = None
        self._span = 0

    def set_positions(self, positions: Tensor) -> None:
        """positions [B, T]: where this forward's tokens go; builds the attention mask once per step."""
        self.positions = positions
        B, T = positions.shape
        self._rows = torch.arange(B, device=positions.device)[:, None].expand(B, T)  # shared by every layer
        self._span = int(positions.max()) + 1
        keys = torch.arange(self._span, device=positions.device)
        hidden = keys > positions[..., None]                                      # [B, T, S]
        mask = torch.zeros(hidden.shape, dtype=self.kv.dtype, device=positions.device)
        self._mask = mask.masked_fill_(hidden, -math.inf)[:, :, None]             # [B, T, 1, S]

    def select(self, rows: Tensor) -> None:
        """Keep (or replicate) batch rows: compaction when rows finish, fan-out to n samples."""
        self.kv = self.kv.index_select(1, rows)

    def extend(self, other: LatentCache) -> None:
        """Append another cache's rows (continuous batching: newly prefilled requests join the batch);
        the shorter of the two is padded along the position axis."""
        S = max(self.kv.shape[2], other.kv.shape[2])
        pad = [F.pad(c, (0, 0, 0, S - c.shape[2])) for c in (self.kv, other.kv)]
        self.kv = torch.cat(pad, dim=1)

    def attend(self, attn: MLAttention, layer: int, q_nope: Tensor, q_rope: Tensor, latent: Tensor,
               rope_key: Tensor, scale: float) -> Tensor:
        """Write this step's latents, then attend over the cache with absorbed projections.

        DeepSeek-V2 §2.1.2: q_nope·k_nope = q_nope·(W_UK c) = (W_UK^T q_nope)·c, and the value
        up-projection W_UV moves after the attention-weighted sum of latents. Each query head thus
        attends directly over the C + R cached values, like multi-query attention with one shared head.
        """
        B, T, H, _ = q_nope.shape
        kv = self.kv[layer]
        kv[self._rows, self.positions] = torch.cat((latent, rope_key), dim=-1).to(kv.dtype)
        w = attn.kv_b_proj.weight.view(H, attn.nope_dim + attn.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, :attn.nope_dim], w[:, attn.nope_dim:]                  # [H, nope, C], [H, v, C]
        q_latent = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1), w_uk)  # [H, B*T, C]
        q = torch.cat((q_latent.transpose(0, 1).reshape(B, T, H, -1), q_rope), dim=-1)  # [B, T, H, C + R]
        keys = kv[:, :self._span]                                                 # [B, S, C + R]
        # One shared latent "head" for all query heads: a single batched matmul per step.
        scores = torch.bmm(q.view(B, T * H, -1), keys.transpose(1, 2)).view(B, T, H, -1)
        probs = torch.softmax(scores * scale + self._mask, dim=-1, dtype=torch.float32).to(q.dtype)
        out_latent = torch.bmm(probs.view(B, T * H, -1), keys[..., :self.kv_rank])  # [B, T*H, C]
        out = torch.bmm(out_latent.view(B * T, H, -1).transpose(0, 1), w_uv.transpose(1, 2))  # [H, B*T, v]
        return out.transpose(0, 1).reshape(B, T, H, -1)


class KVCache(LatentCache):
    """Grouped-query attention's cache (the dense families): for each layer and position the keys and values
    of the K key/value heads, in one buffer `kv` [layers, B, S, 2·K·Dh] (keys, then values), so positions,
    masks, compaction and continuous batching work as for the latent cache."""

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.kv = torch.zeros(n_layers, batch, max_len, 2 * kv_heads * head_dim, dtype=dtype, device=device)
        self.positions = None
        self._mask = None
        self._span = 0

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        """Write this step's keys and values, then attend: q [B, T, H, Dh]; k, v [B, T, K, Dh] (after RoPE)
        -> [B, T, H, Dh]. Each key/value head serves H / K query heads."""
        B, T, H, D = q.shape
        K = self.kv_heads
        kv = self.kv[layer]
        kv[self._rows, self.positions] = torch.cat((k.reshape(B, T, -1), v.reshape(B, T, -1)), dim=-1).to(kv.dtype)
        cached = kv[:, :self._span].view(B, self._span, 2, K, D)
        keys, values = cached[:, :, 0], cached[:, :, 1]                           # [B, S, K, Dh]
        qg = q.view(B, T, K, H // K, D)
        scores = torch.einsum("btkgd,bskd->btkgs", qg, keys) * scale + self._mask[:, :, :, None]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.einsum("btkgs,bskd->btkgd", probs, values).reshape(B, T, H, D)
